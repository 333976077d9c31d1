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

from collections.abc import Iterable
from typing import Any

from twisted.conch.ssh.transport import SSHTransportBase
from twisted.internet import tcp, unix
from twisted.python.failure import Failure

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


# -- child processes ---------------------------------------------------------------


def reactorChildren() -> set[int]:
    """PIDs of the child processes the reactor started and has yet to reap."""
    from twisted.internet import process

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
