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
from collections.abc import Iterable
from typing import Any

from twisted.conch.ssh.transport import SSHServerTransport, SSHTransportBase
from twisted.internet import process, tcp, unix
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
    script that times out.  ``process.Process`` is what the reactor builds;
    this subclass forks instead of using ``posix_spawnp`` (which Twisted
    calls without ``setsid``) and starts the session in the child before
    Twisted sets up the child's descriptors.
    """
    return _SessionLeader(reactor, executable, args, env, path, protocol)
