"""The SSH server: host keys, authentication, avatar, sessions and SFTP."""
