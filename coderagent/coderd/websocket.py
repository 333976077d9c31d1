"""A WebSocket as a byte stream, on Twisted with wsproto: the agent's side.

coderd serves the agent API at ``/api/v2/workspaceagents/me/rpc`` as a
WebSocket whose binary messages together form one byte stream (Go's
``websocket.NetConn``): message boundaries mean nothing, and yamux runs on
top.  So this module does no more than that: the HTTP upgrade (with the
agent's cookie and headers), then every write of the inner protocol becomes
one binary message and every received data frame, whole or partial, is
handed to the inner protocol as it arrives.

Why wsproto: it is a sans-I/O protocol engine (RFC 6455 framing, masking,
the h11-based handshake, close and ping handling) with no opinion about the
event loop, so the Twisted glue stays small and flow control stays
Twisted's own: the inner protocol's producer is registered directly
with the TCP transport.  autobahn would bring its own protocol and factory
hierarchy, txaio and message-oriented callbacks that buffer whole messages,
which is the opposite of what a byte stream wants.

:class:`WebSocketClientProtocol` wraps one inner
:class:`~twisted.internet.interfaces.IProtocol` (a yamux session), which sees
an ordinary transport.  :class:`WebSocketStream` is the part a server shares
(framing, ping, close); coderd-dev's server protocol builds on it in
:mod:`coderagent.devcoderd.websocketserver`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError
from zope.interface import implementer

from coderagent.netaddr import describePeer

log = Logger()

Headers = Sequence[tuple[bytes, bytes]]

#: Most of a rejected upgrade's response body kept for the error message.
MAX_REJECT_BODY = 4096

#: Close code for a normal close (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003


class HandshakeRejected(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        detail = f": {text}" if text else ""
        super().__init__(f"websocket upgrade refused: HTTP {status}{detail}")
        self.status = status
        self.body = body


class HandshakeFailed(Exception):
    """The connection ended, or broke the protocol, before the upgrade completed."""


@implementer(ITransport, IConsumer)
class _MessageTransport:
    """What the inner protocol writes to: one binary message per write."""

    def __init__(self, outer: WebSocketStream) -> None:
        self._outer = outer

    def write(self, data: bytes) -> None:
        if data:
            self._outer._sendMessage(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._outer._closeWebSocket(CLOSE_NORMAL, "")

    def abortConnection(self) -> None:
        transport = self._outer.transport
        if transport is not None:
            transport.abortConnection()

    def getPeer(self) -> IAddress:
        peer: IAddress = self._outer.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        host: IAddress = self._outer.transport.getHost()
        return host

    # Flow control is the TCP connection's: a producer registered here is
    # paused when the socket's buffer fills, and pausing us pauses reading.
    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._outer.transport.registerProducer(producer, streaming)
        self._outer._innerProducer = True

    def unregisterProducer(self) -> None:
        self._outer._innerProducer = False
        self._outer.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._outer.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._outer.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._outer.transport.stopProducing()


class WebSocketStream(Protocol):
    """The part client and server share: framing, ping, close, the inner protocol.

    A subclass sets ``_ws`` (a wsproto connection of its side), handles the
    upgrade in ``_handshakeEvent`` and calls ``_attach`` once it succeeded.
    """

    transport: Any
    inner: IProtocol | None = None
    _ws: WSConnection
    _open = False  # the upgrade succeeded and the inner protocol is attached
    _closing = False  # we sent a Close frame
    _innerLost = False
    _innerProducer = False  # the inner protocol's producer is on our transport

    def dataReceived(self, data: bytes) -> None:
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                self._handle(event)
                if self.transport is None:
                    return
        except (RemoteProtocolError, LocalProtocolError) as e:
            self._protocolError(str(e))

    def _handle(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            if self.inner is not None and event.data:
                self.inner.dataReceived(bytes(event.data))
        elif isinstance(event, Ping):
            self._send(event.response())
        elif isinstance(event, CloseConnection):
            if not self._closing:
                self._closing = True
                self._send(event.response())
            detail = f"{event.code} {event.reason}" if event.reason else f"{event.code}"
            self._closeReason = f"peer closed the websocket ({detail})"
            self._endTransport()
        elif isinstance(event, TextMessage):
            self._closeWebSocket(CLOSE_UNSUPPORTED_DATA, "text messages are not part of the stream")
        else:
            self._handshakeEvent(event)

    def _handshakeEvent(self, event: Event) -> None:
        raise NotImplementedError

    def _protocolError(self, message: str) -> None:
        log.warn("websocket protocol error from {peer}: {error}", peer=self._peer(), error=message)
        self._closeReason = f"websocket protocol error: {message}"
        if self._open:
            self._closeWebSocket(CLOSE_PROTOCOL_ERROR, "protocol error")
        else:
            self.transport.loseConnection()

    def _peer(self) -> str:
        return describePeer(self.transport)

    def _send(self, event: Event) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError as e:
            log.debug("websocket: not sending {event}: {e}", event=type(event).__name__, e=e)
            return
        if data and self.transport is not None:
            self.transport.write(data)

    def _sendMessage(self, data: bytes) -> None:
        if self._open and not self._closing:
            self._send(BytesMessage(data=data))

    def _closeWebSocket(self, code: int, reason: str) -> None:
        if self.transport is None:
            return
        if self._open and not self._closing:
            self._closing = True
            self._send(CloseConnection(code=code, reason=reason))
        self._endTransport()

    def _endTransport(self) -> None:
        # Go's side answers the Close; we do not wait for it to end the
        # stream.  A TLS transport will not close while a producer is still
        # registered, so the inner protocol's goes first.
        if self._innerProducer:
            self._innerProducer = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _attach(self, inner: IProtocol) -> None:
        self._open = True
        self.inner = inner
        inner.makeConnection(_MessageTransport(self))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        inner, self.inner = self.inner, None
        if inner is not None and not self._innerLost:
            self._innerLost = True
            why = getattr(self, "_closeReason", None)
            inner.connectionLost(Failure(error.ConnectionLost(why)) if why else reason)


class WebSocketClientProtocol(WebSocketStream):
    """Upgrade to a WebSocket, then carry an inner protocol's bytes in binary messages.

    ``makeInner()`` builds the inner protocol once the server accepted, so a
    refused or broken upgrade never starts (or stops) one.  ``handshake``
    fires with the inner protocol, or fails with :class:`HandshakeRejected`
    (the HTTP status and body, e.g. coderd's 401 for a bad token) or
    :class:`HandshakeFailed`.
    """

    def __init__(
        self, makeInner: Callable[[], IProtocol], *, host: str, target: str, headers: Headers
    ) -> None:
        self._makeInner = makeInner
        self._host = host
        self._target = target
        self._headers = list(headers)
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._rejectStatus = 0
        self._rejectBody = bytearray()
        self.handshake: Deferred[IProtocol] = Deferred()

    def connectionMade(self) -> None:
        self._send(Request(host=self._host, target=self._target, extra_headers=self._headers))

    def _handshakeEvent(self, event: Event) -> None:
        if isinstance(event, AcceptConnection):
            try:
                inner = self._makeInner()
            except HandshakeFailed as e:
                self._fail(e)
                self.transport.loseConnection()
                return
            self._attach(inner)
            if not self.handshake.called:
                self.handshake.callback(inner)
        elif isinstance(event, RejectConnection):
            self._rejectStatus = event.status_code
            if not event.has_body:
                self._reject()
        elif isinstance(event, RejectData):
            room = MAX_REJECT_BODY - len(self._rejectBody)
            self._rejectBody += bytes(event.data)[: max(0, room)]
            if event.body_finished:
                self._reject()

    def _reject(self) -> None:
        self._fail(HandshakeRejected(self._rejectStatus, bytes(self._rejectBody)))
        self.transport.loseConnection()

    def _fail(self, error: Exception) -> None:
        if not self.handshake.called:
            self.handshake.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._open:
            why = getattr(self, "_closeReason", None) or reason.getErrorMessage()
            self._fail(HandshakeFailed(f"connection ended before the websocket upgrade: {why}"))
        super().connectionLost(reason)


@implementer(IStreamClientEndpoint)
class WebSocketClientEndpoint:
    """An endpoint whose connections are WebSockets: connected once the upgrade succeeded.

    ``connect(factory)`` dials ``transport``, sends the upgrade request for
    ``target`` with the headers ``headers()`` supplies at that moment (so
    short-lived credentials are fresh for every attempt), and fires with the
    protocol ``factory`` builds, which sees only the byte stream.  A refused
    upgrade is a failed connection attempt, like a refused TCP connect.
    """

    def __init__(
        self,
        transport: IStreamClientEndpoint,
        *,
        host: str,
        target: str,
        headers: Callable[[], Deferred[Headers]],
    ) -> None:
        self._transport = transport
        self._host = host
        self._target = target
        self._headers = headers

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        ws: list[WebSocketClientProtocol] = []

        def cancel(d: Deferred[IProtocol]) -> None:
            if ws and ws[0].transport is not None:
                ws[0].transport.abortConnection()

        result: Deferred[IProtocol] = Deferred(cancel)

        def dial(headers: Headers) -> Deferred[Any]:
            def build(addr: IAddress) -> WebSocketClientProtocol:
                proto = WebSocketClientProtocol(
                    lambda: _built(protocolFactory, addr),
                    host=self._host,
                    target=self._target,
                    headers=headers,
                )
                ws.append(proto)
                return proto

            connecting: Deferred[Any] = self._transport.connect(_OneShotFactory(build))
            return connecting.addCallback(lambda proto: proto.handshake)

        d = self._headers().addCallback(dial)
        d.chainDeferred(result)
        return result


def _built(factory: IProtocolFactory, addr: IAddress) -> IProtocol:
    proto = factory.buildProtocol(addr)
    if proto is None:
        raise HandshakeFailed("the protocol factory refused the connection")
    return proto


class _OneShotFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[IAddress], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        return self._build(addr)
