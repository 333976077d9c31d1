"""The local control socket (``--socket-server-enabled``) and the ``coder-agent status`` command."""
