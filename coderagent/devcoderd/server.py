"""coderd-dev: the server side of the agent API, in memory, for development and tests.

It serves what a real coderd serves at ``/api/v2/workspaceagents/me/rpc``:
the same WebSocket upgrade (token checked, 401 otherwise), yamux as the
server, one DRPC connection per stream, and the Agent RPCs the agent uses,
answered from a manifest and recorded.  Every boundary audit log is written
to stderr the way coderd writes it (``coderd.agentrpc: boundary_request
owner=…``, the line coderd's ``agentapi`` logs per boundary log), so what
reaches "coderd" can be read off its log.

Nothing here is used by the agent itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto.events import Request

from coderagent.coderd.api import RPC_PATH, UNAUTHORIZED_MESSAGE
from coderagent.coderd.yamux import YamuxSession, YamuxStream
from coderagent.devcoderd.api import DevAgentAPI, Handler
from coderagent.devcoderd.drpcserver import DRPCServerProtocol
from coderagent.devcoderd.websocketserver import Acceptance, WebSocketServerProtocol

log = Logger()

#: Agent API versions coderd-dev accepts (major 2, minors up to this).
MAX_MINOR_VERSION = 13

_SECRET_HEADERS = frozenset({b"cookie", b"coder-session-token", b"authorization"})


def _requestToken(request: Request) -> str:
    for name, value in request.extra_headers:
        if name.lower() == b"coder-session-token":
            return value.decode("utf-8", "replace")
    for name, value in request.extra_headers:
        if name.lower() == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                continue
            morsel = jar.get("coder_session_token")
            if morsel is not None:
                return morsel.value
    return ""


def _supportedVersion(query: Mapping[str, list[str]]) -> bool:
    versions = query.get("version") or ["2.0"]
    major, dot, minor = versions[0].partition(".")
    return major == "2" and (not dot or (minor.isdigit() and int(minor) <= MAX_MINOR_VERSION))


class DevCoderdFactory(Factory):
    """Accepts agent connections: checks path, version and token, then serves the API."""

    noisy = False

    def __init__(self, api: DevAgentAPI, token: str, reactor: Any) -> None:
        self.api = api
        self.token = token
        self.reactor = reactor

    def buildProtocol(self, addr: IAddress | None) -> WebSocketServerProtocol:
        peer = f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
        return WebSocketServerProtocol(lambda request: self.accept(request, peer))

    def accept(self, request: Request, peer: str) -> Acceptance:
        parts = urlsplit(request.target)
        if parts.path != RPC_PATH:
            return 404, f"Route {parts.path} not found."
        if not _supportedVersion(parse_qs(parts.query)):
            return 400, "Unknown or unsupported API version"
        if _requestToken(request) != self.token:
            log.warn("refused agent connection from {peer}: bad or missing token", peer=peer)
            return 401, UNAUTHORIZED_MESSAGE
        shown = [
            f"{name.decode('latin-1')}={value.decode('utf-8', 'replace')}"
            for name, value in request.extra_headers
            if name.lower() not in _SECRET_HEADERS and name.lower().startswith(b"x-")
        ]
        log.info(
            "agent connected from {peer}{headers}",
            peer=peer,
            headers=f" with headers {', '.join(shown)}" if shown else "",
        )
        return _AgentSession(self.api.handlers, peer, self.reactor)


class _AgentSession(YamuxSession):
    """The server end of one agent's yamux session: each stream is one DRPC connection."""

    def __init__(self, handlers: Mapping[str, Handler], peer: str, reactor: Any) -> None:
        super().__init__(client=False, clock=reactor, onStream=self._serve)
        self._handlers = handlers
        self._peer = peer

    def _serve(self, stream: YamuxStream) -> None:
        stream.attach(DRPCServerProtocol(self._handlers))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        log.info("agent {peer} disconnected", peer=self._peer)
