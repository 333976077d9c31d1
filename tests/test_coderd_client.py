# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The coderd client against coderd-dev's server side, in one reactor, over real sockets.

The server half is coderd-dev's own code (``coderagent.devcoderd``), which the
golden vectors tie to Go's bytes at the yamux and DRPC layers; here the whole
stack runs end to end: upgrade, token, headers, calls, reconnects, timeouts.
Where the point is timing, the same stack runs in memory on a ``task.Clock``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from coderagent.coderd.client import CoderdClient, CoderdUnavailable, retryDelay
from coderagent.coderd.drpc import DRPCError
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from tests.localcoderd import TOKEN, Coderd

TIMEOUT = 15


def client(port: int, token: str = TOKEN, **kw: Any) -> CoderdClient:
    c = CoderdClient(url=f"http://127.0.0.1:{port}", token=token, reactor=reactor, **kw)
    c.startService()
    return c


async def stopped(c: CoderdClient) -> None:
    await c.stopService()


# -- the schedule -----------------------------------------------------------------------


def test_retry_schedule_is_coder_retry() -> None:
    assert [round(retryDelay(n), 4) for n in range(1, 12)] == [
        0.1618,
        0.2618,
        0.4236,
        0.6854,
        1.1089,
        1.7942,
        2.903,
        4.6971,
        7.5999,
        10.0,
        10.0,
    ]


@implementer(IStreamClientEndpoint)
class Refusing:
    """A TCP endpoint whose every connect is refused, and when it was asked."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        return defer.fail(ConnectionRefusedError())


def test_reconnect_attempts_follow_the_schedule_on_a_fake_clock() -> None:
    clock = task.Clock()
    refusing = Refusing(clock)
    c = CoderdClient(url="http://coderd.invalid", token=TOKEN, reactor=clock, transport=refusing)
    c.startService()
    for _ in range(12):
        [retry] = clock.getDelayedCalls()
        clock.advance(retry.getTime() - clock.seconds())
    gaps = [round(b - a, 4) for a, b in zip(refusing.attempts, refusing.attempts[1:], strict=False)]
    assert refusing.attempts[0] == 0  # the first attempt is immediate
    assert gaps[:9] == [0.1618, 0.2618, 0.4236, 0.6854, 1.1089, 1.7942, 2.903, 4.6971, 7.5999]
    assert set(gaps[9:]) == {10.0}
    c.stopService()
    assert not clock.getDelayedCalls()


# -- calls --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_calls_reach_coderd_with_the_token_and_headers(coderd: Coderd) -> None:
    c = client(
        coderd.port.getHost().port,
        headers=[("X-Static", "one")],
        headerCommand="echo X-From-Command=$CODER_URL; echo X-Second=2",
    )
    try:
        manifest = await c.call("GetManifest", agent_pb2.GetManifestRequest())
        assert manifest.agent_id == coderd.api.workspace.agentID.bytes
        assert manifest.agent_name == "main"
        [request] = coderd.requests
        assert request.target == "/api/v2/workspaceagents/me/rpc?version=2.7"
        headers = dict(request.extra_headers)
        assert headers[b"coder-session-token"] == TOKEN.encode()
        assert headers[b"cookie"] == b"coder_session_token=" + TOKEN.encode()
        assert headers[b"x-static"] == b"one"
        port = coderd.port.getHost().port
        assert headers[b"x-from-command"] == f"http://127.0.0.1:{port}".encode()
        assert headers[b"x-second"] == b"2"
    finally:
        await stopped(c)


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_refused_and_calls_time_out(coderd: Coderd) -> None:
    c = client(coderd.port.getHost().port, token="wrong")
    try:
        with pytest.raises(CoderdUnavailable, match="GetManifest: no answer from coderd within 1s"):
            await c.call("GetManifest", agent_pb2.GetManifestRequest(), timeout=1)
        assert len(coderd.requests) >= 2  # refused, then tried again
        assert not c.connected
    finally:
        await stopped(c)


@pytest_twisted.ensureDeferred
async def test_200_concurrent_calls_complete(coderd: Coderd) -> None:
    c = client(coderd.port.getHost().port)
    try:
        calls = [
            c.call(
                "UpdateStats",
                agent_pb2.UpdateStatsRequest(stats=agent_pb2.Stats(connection_count=i)),
            )
            for i in range(200)
        ]
        results = await defer.gatherResults(calls)
        assert all(r.report_interval.seconds == 30 for r in results)
        assert sorted(s.connection_count for s in coderd.api.stats) == list(range(200))
    finally:
        await stopped(c)


@pytest_twisted.ensureDeferred
async def test_3_mib_messages_both_ways() -> None:
    big = "x" * (3 * 1024 * 1024)
    server = Coderd(Workspace(environmentVariables={"BIG": big}), logLimit=4 * 1024 * 1024)
    port = await server.start()
    c = client(port)
    try:
        manifest = await c.call("GetManifest", agent_pb2.GetManifestRequest())
        assert manifest.environment_variables["BIG"] == big
        log = agent_pb2.Log(output=big, level=agent_pb2.Log.INFO)
        external = uuid.UUID(int=0).bytes
        request = agent_pb2.BatchCreateLogsRequest(log_source_id=external, logs=[log])
        assert not (await c.call("BatchCreateLogs", request)).log_limit_exceeded
        assert server.api.logs[0].output == big
    finally:
        await stopped(c)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_coderd_errors_come_back_as_drpc_errors(coderd: Coderd) -> None:
    c = client(coderd.port.getHost().port)
    try:
        logs = [agent_pb2.BoundaryLog(allowed=True) for _ in range(1001)]
        with pytest.raises(DRPCError) as e:
            await c.call("ReportBoundaryLogs", agent_pb2.ReportBoundaryLogsRequest(logs=logs))
        assert e.value.message == "batch size 1001 exceeds maximum of 1000"
        with pytest.raises(DRPCError) as e:
            await c.call("GetServiceBanner", agent_pb2.GetServiceBannerRequest())
        assert e.value.message == (
            'protocol error: unknown rpc: "/coder.agent.v2.Agent/GetServiceBanner"'
        )
        # The connection survives both.
        await c.call("GetManifest", agent_pb2.GetManifestRequest())
    finally:
        await stopped(c)


def test_a_request_of_the_wrong_type_is_a_programming_error() -> None:
    c = CoderdClient(url="http://127.0.0.1:9", token=TOKEN, reactor=reactor)
    with pytest.raises(TypeError, match="GetManifest takes GetManifestRequest"):
        c.call("GetManifest", agent_pb2.UpdateStatsRequest())


# -- reconnecting -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_call_made_while_coderd_is_down_waits_for_it() -> None:
    server = Coderd()
    port = await server.start()
    await server.stop()  # the port is free again; nobody listens yet
    c = client(port)
    try:
        pending = c.call("GetManifest", agent_pb2.GetManifestRequest(), timeout=TIMEOUT)
        await failedAttempts(3)
        assert not pending.called
        await server.start(port)
        manifest = await pending
        assert manifest.agent_name == "main"
    finally:
        await stopped(c)
        await server.stop()


def failedAttempts(n: int) -> defer.Deferred[None]:
    """Fires once the client has logged ``n`` failed connection attempts."""
    seen = []
    done: defer.Deferred[None] = defer.Deferred()

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.coderd.client" and "attempt" in event:
            seen.append(event)
            if len(seen) == n:
                globalLogPublisher.removeObserver(observe)
                # Not from inside the client's state machine, which is logging.
                reactor.callLater(0, done.callback, None)

    globalLogPublisher.addObserver(observe)
    return done.addTimeout(TIMEOUT, reactor)


# -- TLS ----------------------------------------------------------------------------------------


async def _tlsCoderd(tmp_path: Any) -> tuple[Coderd, int, Any]:
    from tests.certs import makePKI

    pki = makePKI(tmp_path)
    server = Coderd()
    server.port = await serverFromString(
        reactor,
        f"ssl:0:interface=127.0.0.1:privateKey={pki.keyFile}:certKey={pki.certFile}",
    ).listen(server.factory)
    return server, server.port.getHost().port, pki


@pytest_twisted.ensureDeferred
async def test_https_verifies_the_certificate(tmp_path: Any, monkeypatch: Any) -> None:
    server, port, pki = await _tlsCoderd(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.caFile))
    c = CoderdClient(url=f"https://localhost:{port}", token=TOKEN, reactor=reactor)
    c.startService()
    try:
        manifest = await c.call("GetManifest", agent_pb2.GetManifestRequest(), timeout=TIMEOUT)
        assert manifest.agent_name == "main"
    finally:
        await stopped(c)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_https_refuses_a_certificate_nobody_vouches_for(
    tmp_path: Any, monkeypatch: Any
) -> None:
    server, port, _ = await _tlsCoderd(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    reasons: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.coderd.client" and "reason" in event:
            reasons.append(str(event["reason"]))

    globalLogPublisher.addObserver(observe)
    c = CoderdClient(url=f"https://localhost:{port}", token=TOKEN, reactor=reactor)
    c.startService()
    try:
        await failedAttempts(1)
        assert server.requests == []  # no request ever reached coderd
        assert any("certificate verify failed" in r for r in reasons), reasons
    finally:
        globalLogPublisher.removeObserver(observe)
        await stopped(c)
        await server.stop()
