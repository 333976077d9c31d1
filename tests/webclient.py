# Twisted is partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False
"""Real HTTP against the agent's sites: an ephemeral loopback port and Twisted's own client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Site

TIMEOUT = 10


@dataclass
class Response:
    code: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


@asynccontextmanager
async def serving(site: Site) -> AsyncIterator[str]:
    """``site`` on 127.0.0.1 (an ephemeral port) while the block runs; yields its base URL."""
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        await port.stopListening()


class _Body(Protocol):
    """The whole body (``readBody`` warns about the transport Agent gives it)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def request(url: str, method: bytes = b"GET") -> Deferred[Response]:
    """One request on a fresh connection; cancelling it drops the connection."""

    async def go() -> Response:
        response = await agent.request(method, url.encode())
        body = _Body()
        response.deliverBody(body)
        data = await body.done
        headers = {
            name.decode().lower(): b", ".join(values).decode()
            for name, values in response.headers.getAllRawHeaders()
        }
        return Response(response.code, headers, data)

    agent = Agent(reactor)
    return Deferred.fromCoroutine(go())


async def get(url: str, method: bytes = b"GET") -> Response:
    return await request(url, method).addTimeout(TIMEOUT, reactor)
