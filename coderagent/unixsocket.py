"""Unix socket files: the agent's own, and what may be replaced at a path.

A crash leaves the socket file behind, and binding then fails; upstream
removes whatever is at the path first.  That would also take the path from
under another process still serving it (or delete a regular file), so here a
file is replaced only if it is a **stale socket**: a socket on which
connecting is refused, because nothing listens on it any more.  A regular
file, a directory, a symbolic link (whatever it points to) and a socket that
answers are never removed.

The same rule decides what a ``streamlocal-forward@openssh.com`` may replace
(:mod:`coderagent.ssh.forwarding.streamlocal`), which in addition may never
take a path in :class:`ServedSockets`: the agent's own sockets, registered
when their services are built, so a forward cannot claim one even before it
is bound.

Every socket the agent listens on is created private (``PRIVATE_SOCKET_MODE``)
whatever the umask: the mode is set on the socket before ``bind`` creates
the file (Linux honours it), not only by a ``chmod`` afterwards, so there is
no moment at which another user could connect.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from enum import Enum
from typing import Any

from twisted.internet import defer, unix
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from coderagent.files import PRIVATE_SOCKET_MODE
from coderagent.listening import ListeningService

log = Logger()

#: The longest path a ``sockaddr_un`` holds with its terminating NUL (``sun_path``
#: is 108 bytes on Linux, 104 on the BSDs and macOS); OpenSSH and Go refuse longer.
SUN_PATH_MAX = (104 if sys.platform == "darwin" or "bsd" in sys.platform else 108) - 1


def fitsSunPath(path: str) -> bool:
    """Whether ``path`` can be bound or connected to as a Unix socket."""
    return 0 < len(os.fsencode(path)) <= SUN_PATH_MAX


class Occupant(Enum):
    """What is at a path, as far as replacing it with a socket is concerned."""

    NOTHING = "nothing"
    STALE_SOCKET = "a stale socket"
    LIVE_SOCKET = "a socket in use"
    SYMLINK = "a symbolic link"
    DIRECTORY = "a directory"
    OTHER = "a file that is not a socket"

    @property
    def replaceable(self) -> bool:
        """Whether a socket may be bound at the path (after removing a stale one)."""
        return self in (Occupant.NOTHING, Occupant.STALE_SOCKET)


def answers(path: str) -> bool:
    """Whether the Unix socket ``path`` may be in use: only a refused connect says no.

    The probe never blocks: a listener whose backlog is full (``EAGAIN``) is
    in use, as is one this process may not connect to (``EACCES``) or a path
    that cannot be a socket address.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def occupant(path: str) -> Occupant:
    """What is at ``path`` (the last component is not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Occupant.NOTHING
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return Occupant.SYMLINK
    if stat.S_ISDIR(mode):
        return Occupant.DIRECTORY
    if not stat.S_ISSOCK(mode):
        return Occupant.OTHER
    return Occupant.LIVE_SOCKET if answers(path) else Occupant.STALE_SOCKET


def removeStale(path: str) -> Occupant:
    """Make room for a socket at ``path`` if only a stale socket is in the way.

    Returns what was there; unless it is :meth:`~Occupant.replaceable`,
    nothing was touched.  Raises :class:`OSError` if a stale socket could not
    be removed.
    """
    found = occupant(path)
    if found is Occupant.STALE_SOCKET:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return found


def removeStaleSocket(path: str, what: str) -> None:
    """Unlink ``path`` if it is a socket nobody serves; log why not otherwise.

    For the agent's own sockets: whatever else is at the path (or a path that
    cannot be looked at) is left for ``bind`` to report.
    """
    try:
        found = occupant(path)
    except OSError:
        return
    if found is Occupant.LIVE_SOCKET:
        log.error(
            "{what}: {path} is in use by another process; not replacing it", what=what, path=path
        )
    elif found is Occupant.STALE_SOCKET:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn(
                "{what}: cannot remove stale socket {path}: {error}",
                what=what,
                path=path,
                error=e,
            )


def _canonical(path: str) -> str:
    """``path`` absolute, with its directory's symbolic links resolved (not its last part)."""
    absolute = os.path.normpath(os.path.abspath(path))
    head, tail = os.path.split(absolute)
    return os.path.join(os.path.realpath(head), tail)


class ServedSockets:
    """The Unix socket paths the agent serves, or will once its services start.

    One instance per agent, built by ``tap`` and given to every service that
    listens on a Unix socket (through :func:`agentSocket`) and to the SSH
    sessions' context, whose forwards must not take any of these paths.
    """

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    def add(self, path: str, what: str) -> None:
        """Record that the agent serves ``what`` at ``path``."""
        self._paths[os.path.normpath(os.path.abspath(path))] = what

    def servedAs(self, path: str) -> str | None:
        """What the agent serves at ``path`` (however it is spelled), or ``None``."""
        wanted = _canonical(path)
        for served, what in self._paths.items():
            if _canonical(served) == wanted or _sameFile(served, path):
                return what
        return None


def _sameFile(a: str, b: str) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class PrivateUnixPort(unix.Port):
    """A Unix listener whose socket file never exists with more than its mode.

    Twisted binds, then ``chmod``s; under a permissive umask the file is
    briefly world-connectable.  Setting the mode on the socket first makes
    Linux create the file with it (elsewhere the ``chmod`` after ``bind``
    still applies).
    """

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()
        try:
            os.fchmod(skt.fileno(), self.mode)
        except OSError:
            pass  # not supported on this platform's sockets; chmod after bind remains
        return skt


@implementer(IStreamServerEndpoint)
class PrivateUnixEndpoint:
    """Listens on ``path`` with a :class:`PrivateUnixPort` (mode ``PRIVATE_SOCKET_MODE``)."""

    def __init__(self, reactor: Any, path: str, backlog: int = 50) -> None:
        self.reactor = reactor
        self.path = path
        self.backlog = backlog

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        port = PrivateUnixPort(
            os.fsencode(self.path),
            factory,
            backlog=self.backlog,
            mode=PRIVATE_SOCKET_MODE,
            reactor=self.reactor,
        )
        port.startListening()
        return port


def agentSocket(
    *,
    reactor: Any,
    path: str,
    factory: IProtocolFactory,
    what: str,
    served: ServedSockets,
    backlog: int = 50,
) -> ListeningService:
    """Serve ``factory`` on the agent's socket ``path``: the one way the agent does so.

    The path joins ``served`` at once; when the service starts, a stale
    socket file there is replaced (a live one is not) and the socket is
    created mode 0600.  A path that cannot be bound is logged and the agent
    runs on without it.
    """
    served.add(path, what)
    return ListeningService(
        reactor=reactor,
        description=path,
        factory=factory,
        what=what,
        required=False,
        endpoint=PrivateUnixEndpoint(reactor, path, backlog),
        prepare=lambda: removeStaleSocket(path, what),
    )
