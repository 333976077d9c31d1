"""Files and directories that hold secrets or audit data: private whatever the umask.

Host keys, the boundary spool, logs and sockets are created by the agent and
read by nobody else.  ``open(..., 0o600)`` and ``mkdir(..., 0o700)`` are only
as private as the process's umask allows (a umask never adds bits, but
``os.makedirs`` gives the directories it creates on the way ``0o777 & ~umask``),
so every such file gets its mode set explicitly, here.
"""

from __future__ import annotations

import os

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
#: Unix sockets the agent serves: only its user (and root) may connect.
PRIVATE_SOCKET_MODE = 0o600


def ensurePrivateDir(path: str | os.PathLike[str]) -> None:
    """``path`` exists and is 0700 (it is the agent's own), as are the parents
    this had to create."""
    makePrivateDirs(path)
    os.chmod(path, PRIVATE_DIR_MODE)


def makePrivateDirs(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and any missing parents, each one it creates 0700; what
    exists already is left as it is."""
    path = os.fspath(path)
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        os.chmod(directory, PRIVATE_DIR_MODE)


def openPrivate(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` with ``O_CREAT`` and mode 0600 set on the file whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
