"""Where a relay's socket comes from: dialled for ``direct-*``, accepted for ``forwarded-*``.

TCP and Unix-socket forwarding differ in how they parse, bind and connect,
not in what happens around a socket, so that part is written once here:

* :func:`dial` connects an endpoint and answers the client's ``direct-*``
  open with a :class:`~.relay.RelayChannel` once connected, or with the
  open failure (``connect failed`` and the reason, as OpenSSH shows it).
* :class:`ForwardedFactory` accepts connections on a reverse forward's
  listener; each becomes an :class:`AcceptedSocket` subclass that opens its
  ``forwarded-*`` channel to the client, naming the listener.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.conch.error import ConchError
from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.ssh.forwarding.registry import Forwards
from coderagent.ssh.forwarding.relay import RelayChannel, SocketSide

log = Logger()

#: How long a ``direct-*`` connect may take before the open fails.
CONNECT_TIMEOUT = 30.0


def describeConnectError(e: BaseException | None, host: str) -> str:
    """A Go-like reason for a failed connect, for the open-failure text."""
    if isinstance(e, error.DNSLookupError):
        return f"lookup {host}: no such host"
    if isinstance(e, error.TimeoutError | defer.TimeoutError | error.ConnectingCancelledError):
        return "i/o timeout"
    number = getattr(e, "osError", None)
    if isinstance(number, int):
        return "connect: " + os.strerror(number).lower()
    if isinstance(e, error.ConnectionRefusedError):
        return "connect: connection refused"
    return str(e) or type(e).__name__


class OneSocketFactory(Factory):
    """Hands out one prepared protocol: ``connectProtocol`` without its log lines."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.prepared = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.prepared


def dial(
    forwards: Forwards,
    endpoint: IStreamClientEndpoint,
    *,
    request: str,
    failureText: Callable[[BaseException | None], str],
    remoteWindow: int,
    remoteMaxPacket: int,
    avatar: Any,
) -> Deferred[RelayChannel]:
    """Connect ``endpoint`` for a ``direct-*`` open of ``request``.

    Fires with the channel to confirm once connected.  A failed connect
    fails with ``ConchError(failureText(reason), OPEN_CONNECT_FAILED)``,
    logged at INFO; a cancellation (the SSH connection went away first)
    passes through unlogged.
    """
    sock = SocketSide()

    def connected(_: object) -> RelayChannel:
        return RelayChannel(
            sock, remoteWindow=remoteWindow, remoteMaxPacket=remoteMaxPacket, avatar=avatar
        )

    def failed(reason: Failure) -> Failure:
        if reason.check(CancelledError):
            return reason
        message = failureText(reason.value)
        log.info(
            "{request} from {peer} failed: {message}",
            request=request,
            peer=forwards.peer(),
            message=message,
        )
        return Failure(ConchError(message, OPEN_CONNECT_FAILED))

    connecting = endpoint.connect(OneSocketFactory(sock))
    return connecting.addCallbacks(connected, failed)


@implementer(IStreamClientEndpoint)
class FirstOf:
    """Connects through each endpoint in turn until one connects (else the last failure):
    a name that resolves to several allowed addresses tries them in order."""

    def __init__(self, endpoints: list[IStreamClientEndpoint]) -> None:
        self.endpoints = endpoints

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        remaining = list(self.endpoints)
        current: list[Deferred[IProtocol]] = []

        def cancel(_: Deferred[IProtocol]) -> None:
            remaining.clear()
            if current:
                current[0].cancel()

        result: Deferred[IProtocol] = Deferred(cancel)

        def attempt(failure: Failure | None) -> None:
            if result.called:
                return
            if not remaining:
                result.errback(failure or Failure(error.ConnectError("no address to connect to")))
                return
            connecting = remaining.pop(0).connect(factory)
            current[:] = [connecting]
            connecting.addCallbacks(result.callback, attempt)

        attempt(None)
        return result


class ForwardedFactory(Factory):
    """Accepts connections on a reverse forward's listener.

    ``accepted`` is the :class:`AcceptedSocket` subclass each connection
    becomes.  ``address`` is what the client asked to listen on (a host or a
    path) and ``boundPort`` the port actually bound (0 for a Unix socket);
    both go into the ``forwarded-*`` open.  Nothing is accepted once the SSH
    connection is gone, nor beyond the connection's limits (the socket is
    closed at once).
    """

    noisy = False

    def __init__(self, forwards: Forwards, accepted: type[AcceptedSocket], address: str) -> None:
        self.forwards = forwards
        self.accepted = accepted
        self.address = address
        self.boundPort = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        conn = getattr(self.forwards.avatar, "conn", None)
        if self.forwards.closed or conn is None:
            return None
        if not self.forwards.admitsForwardedConnection():
            return None
        return self.accepted(self, conn)


class AcceptedSocket(SocketSide):
    """One accepted connection: opens a ``channelName`` channel to the client for it."""

    #: The channel type opened for each accepted connection.
    channelName: ClassVar[bytes]

    def __init__(self, factory: ForwardedFactory, conn: Any) -> None:
        self.factory = factory
        self.conn = conn

    def channelData(self) -> bytes:
        """The type-specific data of the channel open."""
        raise NotImplementedError

    def connectionMade(self) -> None:
        super().connectionMade()
        chan = RelayChannel(
            self, name=self.channelName, conn=self.conn, avatar=self.factory.forwards.avatar
        )
        self.conn.openChannel(chan, self.channelData())
