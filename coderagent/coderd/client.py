"""The agent's connection to coderd: WebSocket, yamux, one DRPC stream per call.

One :class:`CoderdClient` owns the connection for the agent's whole life.  It
dials ``<agent-url>/api/v2/workspaceagents/me/rpc?version=2.7`` as upstream
does (cookie ``coder_session_token``, header ``Coder-Session-Token``, the
``--agent-header`` and header-command headers), runs yamux as the client on
the WebSocket's byte stream, and carries each call on a yamux stream of its
own, as coder's ``drpcsdk.MultiplexedConn`` does.

It reconnects forever with upstream's schedule (``coder/retry`` from 100 ms,
times phi, capped at 10 s; the first attempt is immediate), as a Twisted
``ClientService``.  Unlike upstream, the delay starts again from the bottom
once a connection succeeded: after a coderd restart the agent is back within
a fraction of a second, not 10 s.

:meth:`CoderdClient.call` waits for a connection if there is none, and fails
after its timeout: a call never hangs, and the caller decides whether to
retry (the boundary log forwarder does, a lifecycle report does).

Services that talk to coderd (the lifecycle reporter, the boundary log
forwarder) are children of the client: they are stopped *before* the
connection is, so that a graceful shutdown can still report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import Message
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.coderd.api import API_VERSION, RPC_PATH, RPCS
from coderagent.coderd.drpc import DRPCClientProtocol
from coderagent.coderd.headers import dialHeaders, runHeaderCommand
from coderagent.coderd.websocket import Headers, WebSocketClientEndpoint
from coderagent.coderd.yamux import YamuxSession, YamuxStream
from coderagent.coderd.yamuxframe import YamuxError
from coderagent.netaddr import bracketHost

log = Logger()

#: coder/retry as the agent's runLoop uses it: retry.New(100ms, 10s), times phi.
RETRY_FLOOR = 0.1
RETRY_CAP = 10.0
PHI = 1.618

#: How long a call may wait for a connection and an answer, by default.
CALL_TIMEOUT = 30.0

#: Bound on connecting plus the WebSocket upgrade.
CONNECT_TIMEOUT = 30.0


def retryDelay(failedAttempts: int) -> float:
    """Seconds to wait after ``failedAttempts`` failures in a row (1, 2, …)."""
    return float(min(RETRY_CAP, RETRY_FLOOR * PHI**failedAttempts))


class CoderdUnavailable(Exception):
    """A call could not be made: no connection in time, or it broke under the call."""


@dataclass(frozen=True)
class DialTarget:
    """Where the RPC WebSocket is, from ``--agent-url``."""

    url: str
    tls: bool
    host: str
    port: int
    #: The ``Host`` header: the host, with the port when it is not the default.
    authority: str
    #: Path and query of the upgrade request.
    target: str

    @classmethod
    def fromURL(cls, url: str) -> DialTarget:
        parts = urlsplit(url)
        tls = parts.scheme.lower() == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        shownHost = bracketHost(host)
        authority = shownHost if parts.port is None else f"{shownHost}:{port}"
        target = f"{parts.path.rstrip('/')}{RPC_PATH}?version={API_VERSION}"
        return cls(url, tls, host, port, authority, target)

    def endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        """TCP, wrapped in TLS with certificate and host name verification for https."""
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=CONNECT_TIMEOUT)
        if not self.tls:
            return tcp
        from twisted.internet.ssl import optionsForClientTLS

        return wrapClientTLS(optionsForClientTLS(self.host), tcp)


class _AgentSession(YamuxSession):
    """yamux on the RPC WebSocket, as the client; says when the connection is gone."""

    def __init__(self, client: CoderdClient) -> None:
        super().__init__(client=True, clock=client.reactor, onStream=_refuseStream)
        self.coderd = client

    @property
    def session(self) -> _AgentSession:
        """This session itself, also through the proxy ClientService wraps it in."""
        return self

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.coderd._disconnected(self, reason)


def _refuseStream(stream: YamuxStream) -> None:
    # coderd never opens streams towards the agent on this connection.
    stream.abortConnection()


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, client: CoderdClient) -> None:
        self.client = client

    def buildProtocol(self, addr: IAddress | None) -> _AgentSession:
        return _AgentSession(self.client)


@implementer(IStreamClientEndpoint)
class _LoggedAttempts:
    """The endpoint, remembering why an attempt failed for the retry line."""

    def __init__(self, client: CoderdClient, endpoint: IStreamClientEndpoint) -> None:
        self.client = client
        self.endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting: Deferred[IProtocol] = self.endpoint.connect(factory)
        return connecting.addErrback(self.client._attemptFailed)


ConnectHook = Callable[["CoderdClient"], "Deferred[Any] | None"]


class CoderdClient(MultiService):
    """The agent's reconnecting connection to coderd, and the calls made over it."""

    def __init__(
        self,
        *,
        url: str,
        token: str | Callable[[], str],
        headers: Sequence[tuple[str, str]] = (),
        headerCommand: str = "",
        reactor: Any,
        environ: Mapping[str, str] | None = None,
        callTimeout: float = CALL_TIMEOUT,
        transport: IStreamClientEndpoint | None = None,
    ) -> None:
        """``token`` may be a function, called once when the service starts (it reads
        a token file, say).  ``transport`` replaces the TCP (or TLS) endpoint derived
        from ``url``."""
        super().__init__()
        self.target = DialTarget.fromURL(url)
        self.reactor = reactor
        self.callTimeout = callTimeout
        self._tokenSource = token
        self._token = token if isinstance(token, str) else ""
        self._staticHeaders = list(headers)
        self._headerCommand = headerCommand
        self._environ = dict(environ or {})
        self._hooks: list[ConnectHook] = []
        self._lastFailure = ""
        self._justLost = False
        self._current: _AgentSession | None = None
        endpoint = WebSocketClientEndpoint(
            transport if transport is not None else self.target.endpoint(reactor),
            host=self.target.authority,
            target=self.target.target,
            headers=self._headers,
        )
        self._connector = ClientService(
            _LoggedAttempts(self, endpoint),
            _SessionFactory(self),
            retryPolicy=self._retryDelay,
            clock=reactor,
            prepareConnection=self._connected,
        )

    # -- what other services use ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._current is not None

    def onConnect(self, hook: ConnectHook) -> None:
        """Run ``hook(client)`` on every new connection (and now, if connected).

        If its Deferred fails, the connection is dropped and made again, as
        upstream restarts its routines when one of them errors.
        """
        self._hooks.append(hook)
        if self._current is not None:
            self._runHook(hook, self._current)

    def call(
        self, name: str, request: Message | bytes, *, timeout: float | None = None
    ) -> Deferred[Any]:
        """Call ``/coder.agent.v2.Agent/<name>``; fires with the decoded response.

        ``request`` is the request message, or its encoding (for callers that
        hold bytes already, like the boundary spool).  Fails with
        :class:`CoderdUnavailable` when there is no connection within
        ``timeout`` (or the connection breaks), with
        :class:`~coderagent.coderd.drpc.DRPCError` when coderd answers with an
        error.
        """
        rpc = RPCS[name]
        if isinstance(request, bytes):
            payload = request
        elif isinstance(request, rpc.request):
            payload = request.SerializeToString()
        else:
            raise TypeError(f"{name} takes {rpc.request.__name__}, not {type(request).__name__}")
        limit = self.callTimeout if timeout is None else timeout
        d: Deferred[Any] = self._connector.whenConnected()
        d.addCallback(lambda conn: self._invoke(conn, rpc.path, payload))
        d.addCallback(rpc.response.FromString)

        def timedOut(result: object, seconds: float) -> Failure:
            return Failure(CoderdUnavailable(f"{name}: no answer from coderd within {seconds:g}s"))

        d.addTimeout(limit, self.reactor, onTimeoutCancel=timedOut)
        return d

    # -- connection machinery ---------------------------------------------------------

    def _invoke(self, session: _AgentSession, path: str, payload: bytes) -> Deferred[bytes]:
        try:
            stream = session.openStream()
        except YamuxError as e:
            return fail(CoderdUnavailable(f"the connection to coderd is closing: {e}"))
        drpc = DRPCClientProtocol()
        stream.attach(drpc)
        d = drpc.invoke(path, payload)

        def finished(result: object) -> object:
            stream.loseConnection()
            if isinstance(result, Failure) and result.check(ConnectionLost):
                return Failure(CoderdUnavailable(f"connection to coderd lost during {path}"))
            return result

        return d.addBoth(finished)

    def _headers(self) -> Deferred[Headers]:
        if not self._headerCommand:
            return succeed(dialHeaders(self._token, self._staticHeaders))
        d = runHeaderCommand(self.reactor, self._headerCommand, self.target.url, self._environ)
        return d.addCallback(lambda extra: dialHeaders(self._token, self._staticHeaders + extra))

    def _attemptFailed(self, reason: Failure) -> Failure:
        self._lastFailure = reason.getErrorMessage()
        return reason

    def _connected(self, proxy: Any) -> None:
        session: _AgentSession = proxy.session
        self._current = session
        log.info(
            "connected to coderd at {url} (agent API {version})",
            url=self.target.url,
            version=API_VERSION,
        )
        for hook in list(self._hooks):
            self._runHook(hook, session)

    def _retryDelay(self, failedAttempts: int) -> float:
        delay = retryDelay(failedAttempts)
        if self._justLost:
            self._justLost = False
            log.info("reconnecting to coderd in {delay:.3g}s", delay=delay)
            return delay
        log.warn(
            "cannot connect to coderd at {url}: {reason}; retrying in {delay:.3g}s",
            url=self.target.url,
            reason=self._lastFailure or "connection lost",
            delay=delay,
            attempt=failedAttempts,
        )
        self._lastFailure = ""
        return delay

    def _runHook(self, hook: ConnectHook, session: _AgentSession) -> None:
        def failed(reason: Failure) -> None:
            if session is not self._current:
                return  # the connection went anyway
            log.warn(
                "talking to coderd failed: {error}; reconnecting", error=reason.getErrorMessage()
            )
            session.close()

        maybeDeferred(hook, self).addErrback(failed)

    def _disconnected(self, session: _AgentSession, reason: Failure) -> None:
        if session is self._current:
            self._current = None
            self._justLost = True
            log.info("disconnected from coderd: {reason}", reason=reason.getErrorMessage())

    # -- service ----------------------------------------------------------------------

    def startService(self) -> None:
        if not isinstance(self._tokenSource, str):
            self._token = self._tokenSource()
        self._connector.startService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        # Children first, while the connection still works; then the connection.
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addBoth(lambda _: self._connector.stopService())
        return d

