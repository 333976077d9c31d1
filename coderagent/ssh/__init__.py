"""The SSH server: host keys, authentication, transport, connection, sessions, forwarding, SFTP."""
