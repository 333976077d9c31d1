"""Twisted's private names that the agent relies on, all in one place.

Each name here is an implementation detail of Twisted or Conch, not API: a
release may rename or change it without a deprecation period.  Every use in
``coderagent`` goes through this module, so a Twisted upgrade has one file
to review, and ``tests/test_compat.py`` checks each one against the
installed Twisted (that it exists and still behaves as relied on), so a
change fails there, loudly, rather than somewhere in a session.  For the
same reason ``setup.cfg`` keeps Twisted below its next major release.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.conch.ssh.transport import SSHServerTransport, SSHTransportBase
from twisted.internet import process, tcp, unix
from twisted.internet.process import Process, PTYProcess, _getFileActions
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from coderagent.files import openPrivate

#: Where ``ClientService`` logs "Scheduling retry ..." (a private module):
#: the namespace to quieten, as its own loggers are named after it.
CLIENT_SERVICE_LOG_NAMESPACE = "twisted.application._client_service"


# -- Conch's key exchange ---------------------------------------------------------


def inKeyExchange(transport: SSHTransportBase) -> bool:
    """Whether ``transport`` is in a key exchange (from KEXINIT until NEWKEYS).

    Conch enters one only in ``sendKexInit``, for a first exchange and in
    answer to the peer's KEXINIT alike, and leaves it in ``_newKeys``.
    """
    state: str = transport._keyExchangeState
    return state != transport._KEY_EXCHANGE_NONE


def holdForKeyExchange(
    transport: SSHTransportBase, messageType: int, parts: Iterable[bytes | memoryview]
) -> bool:
    """Queue a packet that may not be sent during the key exchange in progress.

    Does what Conch's own ``sendPacket`` does for a transport that sends its
    packets itself: a packet held here is sent by Conch, in order, once the
    exchange has finished.  Returns whether the packet was held; if not, it
    may be sent now.  Call it only while :func:`inKeyExchange`.
    """
    if transport._allowedKeyExchangeMessageType(messageType):
        return False
    transport._blockedByKeyExchange.append((messageType, b"".join(parts)))
    return True


def answerKexInit(transport: SSHTransportBase) -> None:
    """Enter the key exchange the peer's KEXINIT (just negotiated) starts.

    What the end of Conch's ``ssh_KEXINIT`` does, for a transport that reads
    the KEXINIT itself: if this side has sent its own KEXINIT already (the
    first exchange, where both send at once) the exchange is now under way;
    otherwise the peer started a re-key and ours goes out now, through
    ``sendKexInit``.
    """
    if transport._keyExchangeState == transport._KEY_EXCHANGE_REQUESTED:
        transport._keyExchangeState = transport._KEY_EXCHANGE_PROGRESSING
    else:
        transport.sendKexInit()


def setPeerSupportsExtensions(transport: SSHTransportBase, supported: bool) -> None:
    """Record whether the peer's KEXINIT said ``ext-info-c`` (RFC 8308).

    Conch's ``sendExtInfo`` (which the server transport calls after its
    first NEWKEYS, to send ``server-sig-algs``) sends only when this is set.
    """
    transport._peerSupportsExtensions = supported


def skipNextKexPacket(transport: SSHServerTransport) -> None:
    """Drop the client's next key exchange packet: its guess was wrong.

    RFC 4253 section 7: a KEXINIT with ``first_kex_packet_follows`` whose
    preferred method or host key type is not the one agreed is followed by a
    key exchange packet for the wrong method, which must be ignored.
    Conch's server key exchange handlers drop one packet while this is set.
    """
    transport.ignoreNextPacket = True


# -- strports ------------------------------------------------------------------


def parseServerDescription(description: str) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Read a strports server description without a reactor and without listening.

    Returns ``(kind, args, kwargs)``: ``kind`` is the upper-case type of a
    built-in endpoint (``"TCP"``, ``"UNIX"``, ...) or the plugin parsing it;
    for TCP ``args[0]`` is the port.  Raises whatever the description's
    parser raises for text it cannot use.  ``serverFromString`` reads
    descriptions with this same function.
    """
    from twisted.internet import endpoints

    kind, args, kwargs = endpoints._parseServer(description, None)
    return kind, tuple(args), dict(kwargs)


# -- listening ports --------------------------------------------------------------


def closeUnixPortKeepingFile(port: unix.Port, reason: Failure) -> None:
    """Finish closing a Unix listening port as ``unix.Port`` does, but leave its file.

    ``unix.Port.connectionLost`` unlinks the socket's path and then runs
    ``tcp.Port.connectionLost``, which closes the socket and fires what
    ``stopListening`` returned.  Call this from a ``unix.Port`` subclass's
    ``connectionLost`` that decides about the file itself.
    """
    tcp.Port.connectionLost(port, reason)


# -- log files ------------------------------------------------------------------------


class PrivateLogFile(LogFile):
    """Twisted's rotating ``LogFile``, each file it opens made 0600 without the umask.

    ``LogFile._openFile`` (called when the file is first opened and after
    each rotation) makes a new file private by setting the *process's* umask
    to 0777 around its ``open``: a file another thread creates meanwhile (an
    SFTP upload, the spool's) gets mode 0.  Here the file is opened with
    :func:`coderagent.files.openPrivate` instead, which sets the mode on the
    file itself (always 0600, whatever ``defaultMode`` says).
    """

    def _openFile(self) -> None:
        self.closed = False
        fd = openPrivate(self.path, os.O_RDWR)
        self._file = os.fdopen(fd, "rb+", 0)
        self._file.seek(0, os.SEEK_END)
        self.size = self._file.tell()  # what LogFile's own _openFile adds to BaseLogFile's


# -- child processes ---------------------------------------------------------------


def reactorChildren() -> set[int]:
    """PIDs of the child processes the reactor started and has yet to reap."""
    return set(process.reapProcessHandlers)


# -- bytes written to a socket ------------------------------------------------------


def countWrites(transport: Any, counter: Any) -> bool:
    """Add what ``transport`` writes to its socket to ``counter.txBytes``, per write.

    Twisted's socket transports buffer ``write``s and send them from
    ``doWrite`` through ``self.writeSomeData``, once per ``send`` however many
    writes were buffered: wrapping that method on the instance counts the
    bytes that really left, at one call per system call rather than per
    ``write``.  Returns False (nothing counted) for a transport without it.
    """
    send = getattr(transport, "writeSomeData", None)
    if send is None:
        return False

    def writeSomeData(data: bytes) -> Any:
        written = send(data)
        if type(written) is int:  # else a ConnectionLost to hand back
            counter.txBytes += written
        return written

    transport.writeSomeData = writeSomeData
    return True


class _SessionLeader(process.Process):
    """A ``process.Process`` whose child calls ``setsid()`` (see :func:`spawnInNewSession`)."""

    def _trySpawnInsteadOfFork(self, *args: Any, **kw: Any) -> bool:
        return False

    def _setupChild(self, *args: Any, **kw: Any) -> None:
        os.setsid()
        super()._setupChild(*args, **kw)


def spawnInNewSession(
    reactor: Any,
    protocol: Any,
    executable: str,
    args: list[str],
    env: dict[str, str],
    path: str | None,
) -> Any:
    """``reactor.spawnProcess`` (pipes for 0, 1 and 2), but the child calls ``setsid()``.

    The child leads a process group of its own, so everything it starts can
    be signalled at once (``os.killpg(pid, …)``), as upstream does to a
    script that times out.  This is :func:`coderagent.launch.spawnProcess`'s
    fallback where ``posix_spawnp`` cannot be used: ``process.Process`` is
    what the reactor builds, and this subclass forks (Twisted's own
    ``posix_spawnp`` path has no ``setsid``) and starts the session in the
    child before Twisted sets up the child's descriptors.
    """
    return _SessionLeader(reactor, executable, args, env, path, protocol)


# -- starting child processes ------------------------------------------------------

#: Starts a child: ``(executable, args, environment, path, fdmap, tty)`` ->
#: PID, where ``fdmap`` maps the child's descriptors to the parent's (pipes)
#: and ``tty`` is the PTY slave's path (``fdmap`` is then None).  Raises
#: ``OSError`` if the child cannot be started.
ChildStarter = Callable[
    [bytes, list[bytes], dict[bytes, bytes], bytes | None, dict[int, int] | None, bytes | None],
    int,
]


class StartedProcess(Process):
    """Twisted's ``Process`` (pipes), its child started by ``start`` instead of ``fork``.

    ``Process.__init__`` makes the pipes, then calls ``_fork(path, uid, gid,
    executable, args, environment, fdmap=...)`` to start the child, then
    wraps the parent's ends and registers the PID for reaping; only the
    middle step is replaced.
    """

    def __init__(
        self,
        start: ChildStarter,
        reactor: Any,
        executable: bytes,
        args: list[bytes],
        environment: dict[bytes, bytes],
        path: bytes | None,
        proto: Any,
    ) -> None:
        self._start = start
        super().__init__(reactor, executable, args, environment, path, proto)

    def _fork(
        self,
        path: Any,
        uid: Any,
        gid: Any,
        executable: Any,
        args: Any,
        environment: Any,
        **kwargs: Any,
    ) -> None:
        # kwargs: fdmap (child descriptor -> the parent's)
        self.pid = self._start(executable, args, environment, path, kwargs["fdmap"], None)
        self.status = -1


class StartedPTYProcess(PTYProcess):
    """Twisted's ``PTYProcess`` on ``usePTY`` (master, slave, slave's path), started by ``start``.

    ``PTYProcess.__init__`` calls ``_fork(path, uid, gid, executable, args,
    environment, masterfd=, slavefd=)``, then closes the slave, reads the
    master and registers the PID for reaping.
    """

    def __init__(
        self,
        start: ChildStarter,
        reactor: Any,
        executable: bytes,
        args: list[bytes],
        environment: dict[bytes, bytes],
        path: bytes | None,
        proto: Any,
        usePTY: tuple[int, int, str],
    ) -> None:
        self._start = start
        self._tty = os.fsencode(usePTY[2])
        super().__init__(reactor, executable, args, environment, path, proto, usePTY=usePTY)

    def _fork(
        self,
        path: Any,
        uid: Any,
        gid: Any,
        executable: Any,
        args: Any,
        environment: Any,
        **kwargs: Any,
    ) -> None:
        # kwargs: masterfd, slavefd (the child opens the slave by its path)
        pid: Any = self._start(executable, args, environment, path, None, self._tty)
        self.pid = pid
        self.status = -1


def spawnFileActions(
    fdState: list[tuple[int, bool]], childToParent: dict[int, int], close: int, dup2: int
) -> list[tuple[int, ...]]:
    """The ``posix_spawn`` file actions Twisted would use for ``childToParent``.

    ``fdState`` is every open descriptor with its close-on-exec flag; the
    result is ``(close, fd)`` and ``(dup2, fd, newfd)`` tuples, in order,
    that give the child exactly ``childToParent`` (relocating a parent
    descriptor a mapping would overwrite first) and close every other
    inheritable descriptor.
    """
    actions: list[tuple[int, ...]] = _getFileActions(fdState, childToParent, close, dup2)
    return actions


# -- writing to sockets ----------------------------------------------------------------


def sendNow(transport: Any, pieces: list[bytes], counter: Any = None) -> None:
    """``transport.writeSequence(pieces)``, sent at once when nothing else is waiting.

    Twisted's ``FileDescriptor`` buffers every write until the reactor's next
    turn: each burst adds the socket to epoll's writers and removes it again
    (two ``epoll_ctl`` calls), costs a loop turn, and joins the pieces into
    one copy before ``send``.  When the transport's buffers are empty
    (``dataBuffer``, ``_tempDataBuffer``), the pieces go out here with one
    ``sendmsg``, uncopied; whatever the kernel does not take (or everything,
    on any error, which Twisted's own write then meets and reports) goes to
    ``writeSequence`` and keeps its order.  Only for a plain TCP or Unix
    connection (``tcp.Connection``) not using TLS.  What ``sendmsg`` sent is
    added to ``counter.txBytes`` if given (Twisted's later sends are counted
    by :func:`countWrites`).
    """
    if (
        transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport.TLS
    ):
        transport.writeSequence(pieces)
        return
    try:
        sent = transport.socket.sendmsg(pieces)
    except OSError:
        sent = 0
    if sent and counter is not None:
        counter.txBytes += sent
    if sent:
        for index, piece in enumerate(pieces):
            if sent < len(piece):
                pieces = [piece[sent:], *pieces[index + 1 :]]
                break
            sent -= len(piece)
        else:
            return
    transport.writeSequence(pieces)


def canSendNow(transport: Any) -> bool:
    """Whether :func:`sendNow` may be used on ``transport`` (a plain TCP or Unix connection)."""
    return isinstance(transport, tcp.Connection) and hasattr(transport, "socket")
