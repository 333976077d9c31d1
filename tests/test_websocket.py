# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The WebSocket byte stream, client and server, over real loopback sockets.

A raw wsproto peer (not our code) checks what is on the wire: the upgrade
request's headers, one binary message per write, answers to ping and close.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from coderagent.coderd.websocket import (
    HandshakeFailed,
    HandshakeRejected,
    WebSocketClientEndpoint,
)
from coderagent.devcoderd.websocketserver import WebSocketServerProtocol

TIMEOUT = 10


class Collector(Protocol):
    """An inner protocol that keeps what it is given."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.waiters: list[tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for n, d in list(self.waiters):
            if len(self.received) >= n:
                self.waiters.remove((n, d))
                d.callback(bytes(self.received))

    def until(self, n: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiters.append((n, d))
        self.dataReceived(b"")
        return d.addTimeout(TIMEOUT, reactor)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)


class Server:
    """Our WebSocket server on an ephemeral port; remembers requests and inner protocols."""

    def __init__(self, verdict: Any = None) -> None:
        self.requests: list[Request] = []
        self.inners: list[Collector] = []
        self.verdict = verdict
        self.port: Any = None

    def accept(self, request: Request) -> Any:
        self.requests.append(request)
        if self.verdict is not None:
            return self.verdict
        inner = Collector()
        self.inners.append(inner)
        return inner

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: WebSocketServerProtocol(self.accept))


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    if s.port is not None:
        s.port.stopListening()


async def listen(server: Server) -> int:
    server.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        server.factory()
    )
    return int(server.port.getHost().port)


def endpoint(port: int, headers: Any = None) -> WebSocketClientEndpoint:
    return WebSocketClientEndpoint(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        host=f"127.0.0.1:{port}",
        target="/api/v2/x?version=2.7",
        headers=lambda: defer.succeed(headers or []),
    )


async def connectCollector(port: int, headers: Any = None) -> Collector:
    proto = await endpoint(port, headers).connect(Factory.forProtocol(Collector))
    assert isinstance(proto, Collector)
    return proto


@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways_with_the_request_headers(server: Server) -> None:
    port = await listen(server)
    client = await connectCollector(port, [(b"Cookie", b"coder_session_token=t"), (b"X-A", b"1")])
    [request] = server.requests
    assert request.target == "/api/v2/x?version=2.7"
    assert (b"cookie", b"coder_session_token=t") in request.extra_headers
    assert (b"x-a", b"1") in request.extra_headers
    client.transport.write(b"hello ")
    client.transport.writeSequence([b"wor", b"ld"])
    [inner] = server.inners
    assert await inner.until(11) == b"hello world"
    inner.transport.write(b"x" * 100_000)
    assert await client.until(100_000) == b"x" * 100_000


@pytest_twisted.ensureDeferred
async def test_a_3_mib_write_arrives_whole(server: Server) -> None:
    port = await listen(server)
    client = await connectCollector(port)
    payload = os.urandom(3 * 1024 * 1024)
    client.transport.write(payload)
    assert await server.inners[0].until(len(payload)) == payload


@pytest_twisted.ensureDeferred
async def test_a_refused_upgrade_reports_status_and_body() -> None:
    refusing = Server(verdict=(401, "Workspace agent not authorized."))
    port = await listen(refusing)
    try:
        with pytest.raises(HandshakeRejected) as e:
            await connectCollector(port)
        assert e.value.status == 401
        assert e.value.body == b'{"message": "Workspace agent not authorized."}'
        assert str(e.value) == (
            'websocket upgrade refused: HTTP 401: {"message": "Workspace agent not authorized."}'
        )
    finally:
        refusing.port.stopListening()


class Silent(Protocol):
    """A server that closes without answering."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_server_that_hangs_up_is_a_failed_handshake() -> None:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Silent)
    )
    try:
        with pytest.raises(HandshakeFailed, match="before the websocket upgrade"):
            await connectCollector(port.getHost().port)
    finally:
        port.stopListening()


class RawPeer(Protocol):
    """A wsproto server driven by hand: what a Go peer would send."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.events: list[Any] = []
        self.waiting: list[tuple[Any, defer.Deferred[None]]] = []

    def waitFor(self, condition: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((condition, d))
        self._check()
        return d.addTimeout(TIMEOUT, reactor)

    def _check(self) -> None:
        for condition, d in list(self.waiting):
            if condition(self.events):
                self.waiting.remove((condition, d))
                d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            self.events.append(event)
            self.handle(event)
        self._check()

    def handle(self, event: Any) -> None:
        if isinstance(event, Request):
            self.transport.write(self.ws.send(AcceptConnection()))
            self.transport.write(self.ws.send(Ping(payload=b"p1")))
            self.transport.write(self.ws.send(BytesMessage(data=b"from go")))


@pytest_twisted.ensureDeferred
async def test_ping_is_answered_and_each_write_is_one_binary_message() -> None:
    peers: list[RawPeer] = []

    def build() -> RawPeer:
        peers.append(RawPeer())
        return peers[-1]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build)
    )
    try:
        client = await connectCollector(port.getHost().port)
        assert await client.until(7) == b"from go"
        await peers[0].waitFor(lambda events: any(isinstance(e, Pong) for e in events))
        pong = next(e for e in peers[0].events if isinstance(e, Pong))
        assert pong.payload == b"p1"
        client.transport.write(b"one")
        client.transport.write(b"two")
        await peers[0].waitFor(
            lambda events: sum(isinstance(e, BytesMessage) for e in events) == 2
        )
        messages = [bytes(e.data) for e in peers[0].events if isinstance(e, BytesMessage)]
        assert messages == [b"one", b"two"]
        # A Close from the peer is answered, and the inner protocol sees the end.
        peers[0].transport.write(peers[0].ws.send(CloseConnection(code=1000, reason="bye")))
        await client.lost.addTimeout(TIMEOUT, reactor)
        assert client.reason is not None
        assert "peer closed the websocket (1000 bye)" in client.reason.getErrorMessage()
    finally:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_text_message_closes_the_stream() -> None:
    class Texter(RawPeer):
        def handle(self, event: Any) -> None:
            if isinstance(event, Request):
                self.transport.write(self.ws.send(AcceptConnection()))
                self.transport.write(self.ws.send(TextMessage(data="no")))

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Texter)
    )
    try:
        client = await connectCollector(port.getHost().port)
        await client.lost.addTimeout(TIMEOUT, reactor)
        assert client.received == b""
    finally:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_closing_the_inner_transport_closes_the_connection(server: Server) -> None:
    port = await listen(server)
    client = await connectCollector(port)
    client.transport.loseConnection()
    await client.lost.addTimeout(TIMEOUT, reactor)
    await server.inners[0].lost.addTimeout(TIMEOUT, reactor)
