"""Unix socket files the agent serves: replace a stale one, never a live one.

A crash leaves the socket file behind, and binding then fails; upstream
removes whatever is at the path first.  That would also take the path from
under another agent still serving it, so here a file is removed only if it
is a socket and nothing answers on it.
"""

from __future__ import annotations

import os
import socket
import stat

from twisted.logger import Logger

log = Logger()


def answers(path: str) -> bool:
    """Whether something listens on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def removeStaleSocket(path: str, what: str) -> None:
    """Unlink ``path`` if it is a socket nobody serves; log why not otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # nothing there, or binding will say what is wrong
    if not stat.S_ISSOCK(st.st_mode):
        return
    if answers(path):
        log.error(
            "{what}: {path} is in use by another process; not replacing it", what=what, path=path
        )
        return
    try:
        os.unlink(path)
    except OSError as e:
        log.warn(
            "{what}: cannot remove stale socket {path}: {error}", what=what, path=path, error=e
        )
