"""The SFTP subsystem: the agent user's own filesystem, served without blocking.

Twisted ships ``twisted.conch.unix.SFTPServerForUnixConchUser``, but it cannot
serve an agent: every call goes through ``_runAsUser``, which ``seteuid(0)``s
and so fails for an unprivileged agent; it breaks when ``getHomeDir()`` is a
``str`` (Twisted #9845); it creates symlinks the wrong way round for OpenSSH
clients; and it does its disk I/O on the reactor thread, where one slow NFS
``stat`` would freeze every terminal of the workspace.

This server behaves like OpenSSH's ``sftp-server`` started as the agent's
user.  There is no jail: absolute paths work and the operating system's
permissions are the access control, exactly as for a shell on the same
session.  Relative paths are resolved against ``home``, the session's working
directory.

Every filesystem call runs through ``runInThread`` (``deferToThread`` unless a
test passes something else), so the reactor only ever parses packets.

Conch's ``FileTransferServer`` drives the server; several of its habits shape
the code here and are explained where they matter:

* a handle is ``str(hash(fileObj))``, so files define ``__hash__`` to make
  handles unique for the life of the process and findable by the
  ``fsync``/``fstatvfs`` extensions, which only see the raw handle bytes;
* an extended request's return value is always sent as
  ``SSH_FXP_EXTENDED_REPLY``, but OpenSSH's client aborts unless rename, link
  and fsync answer ``SSH_FXP_STATUS``; raising ``SFTPError(FX_OK, …)`` is the
  only way to get a success status out of Conch;
* errors other than ENOENT/EACCES/EEXIST are logged as critical failures, and
  messages must be ASCII, so every ``OSError`` is turned into an ``SFTPError``
  with OpenSSH's status code and an ASCII message;
* a directory iterator may not yield Deferreds (Conch then answers with a
  ``TypeError``), so a listing is read whole in the thread at OPENDIR time.

The package is split by role: :mod:`.server` answers requests on paths (the
``ISFTPServer``), :mod:`.handles` holds open files and directory listings,
:mod:`.fs` the blocking filesystem calls and SFTP's attributes, and
:mod:`.errors` turns an ``OSError`` into OpenSSH's status.
"""

from __future__ import annotations

from coderagent.ssh.sftp.server import AgentSFTPServer

__all__ = ["AgentSFTPServer"]
