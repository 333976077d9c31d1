"""coderd-dev's server side for tests: on an ephemeral port, or in memory on a clock.

The reactor is imported where it is used: conftest imports this module, and
pytest-twisted must install the reactor first.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.test import iosim
from zope.interface import implementer

from coderagent.coderd.client import CoderdClient
from coderagent.devcoderd.api import DevAgentAPI
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.workspace import Workspace

TOKEN = "dev-token"


class Coderd:
    """coderd-dev's server side on an ephemeral port."""

    def __init__(self, workspace: Workspace | None = None, **api: Any) -> None:
        #: coderd's boundary_request lines, as they would reach its stderr.
        self.lines = io.StringIO()
        self.api = DevAgentAPI(workspace or Workspace(), out=self.lines, **api)
        from twisted.internet import reactor

        self.factory = DevCoderdFactory(self.api, TOKEN, reactor)
        self.port: Any = None
        self.requests: list[Any] = []
        accept = self.factory.accept

        def recording(request: Any, peer: str) -> Any:
            self.requests.append(request)
            return accept(request, peer)

        self.factory.accept = recording  # type: ignore[method-assign]
        self.connections: list[Any] = []
        build = self.factory.buildProtocol

        def building(addr: Any) -> Any:
            proto = build(addr)
            self.connections.append(proto)
            return proto

        self.factory.buildProtocol = building  # type: ignore[method-assign]

    async def start(self, port: int = 0) -> int:
        from twisted.internet import reactor

        self.port = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(
            self.factory
        )
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a coderd that exits does."""
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        connections, self.connections = self.connections, []
        for proto in connections:
            if proto.transport is None:
                continue
            try:
                proto.transport.abortConnection()
            except AttributeError:
                pass  # Twisted's TLS transport cannot abort once it is closed


@implementer(IStreamClientEndpoint)
class Loopback:
    """Connects to coderd-dev's factory in memory; bytes move only when the test pumps."""

    def __init__(self, server: DevCoderdFactory, clock: task.Clock) -> None:
        self.server = server
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        client = factory.buildProtocol(None)
        server = self.server.buildProtocol(None)
        assert client is not None
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return defer.succeed(client)


class InMemoryCoderd:
    """A :class:`CoderdClient` and coderd-dev's API joined in memory, all on one ``task.Clock``.

    Nothing moves until the test says so: :meth:`settle` delivers every byte
    in flight (and what the answers cause), :meth:`advance` moves time first.
    """

    def __init__(self, workspace: Workspace | None = None, **apiOptions: Any) -> None:
        self.clock = task.Clock()
        self.api = DevAgentAPI(
            workspace or Workspace(), clock=self.clock.seconds, out=io.StringIO(), **apiOptions
        )
        self.loopback = Loopback(DevCoderdFactory(self.api, TOKEN, self.clock), self.clock)
        self.client = CoderdClient(
            url="http://coderd.test", token=TOKEN, reactor=self.clock, transport=self.loopback
        )

    def settle(self) -> None:
        """Move bytes both ways until nothing is left to move."""
        for _ in range(10_000):
            if not any(pump.pump() for pump in list(self.loopback.pumps)):
                return
        raise AssertionError("the connection never settled")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def disconnect(self) -> None:
        """Drop the current connection, as a coderd that went away does."""
        pump = self.loopback.pumps[-1]
        pump.client.transport.loseConnection()
        pump.server.transport.loseConnection()
        self.settle()
