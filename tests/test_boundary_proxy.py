# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Socket to spool to coderd, in one reactor: real Unix sockets, a real spool, coderd-dev's side.

Writers here are Twisted clients on the real socket, so that a thousand of
them can run at once; the process-level tests (a writer process, the agent
and coderd-dev as processes) are in ``tests/integration/test_boundary.py``.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from coderagent.boundary.codec import TAG_V1, TAG_V2, encodeFrame
from coderagent.boundary.forwarder import Forwarder, requests
from coderagent.boundary.server import STALL_TIMEOUT, BoundaryLogProxy
from coderagent.boundary.service import BoundaryService
from coderagent.boundary.spool import Record, Spool, sessionKey
from coderagent.coderd.client import CoderdClient, retryDelay
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2, boundary_pb2
from coderagent.unixsocket import ServedSockets
from tests.localcoderd import TOKEN, Coderd

TIMEOUT = 20


def batch(
    session: str, first: int, n: int, process: str = "claude"
) -> agent_pb2.ReportBoundaryLogsRequest:
    request = agent_pb2.ReportBoundaryLogsRequest(session_id=session, confined_process_name=process)
    for seq in range(first, first + n):
        entry = request.logs.add(allowed=seq % 3 != 0, sequence_number=seq)
        entry.http_request.method = "GET" if seq % 2 else "POST"
        entry.http_request.url = f"https://example.com/{session}/{seq}"
        if entry.allowed:
            entry.http_request.matched_rule = "*.example.com"
        entry.time.FromNanoseconds(1_767_366_245_000_000_000 + seq * 1000)
    return request


def v1(request: agent_pb2.ReportBoundaryLogsRequest) -> bytes:
    return encodeFrame(TAG_V1, request.SerializeToString())


def v2(request: agent_pb2.ReportBoundaryLogsRequest) -> bytes:
    return encodeFrame(TAG_V2, boundary_pb2.BoundaryMessage(logs=request).SerializeToString())


def arrived(coderd: Coderd) -> list[tuple[str, str, int, str]]:
    """Every log coderd got: (session, process, sequence, url), in arrival order."""
    return [
        (r.session_id, r.confined_process_name, e.sequence_number, e.http_request.url)
        for r in coderd.api.boundaryRequests
        for e in r.logs
    ]


def expected(*requests: agent_pb2.ReportBoundaryLogsRequest) -> list[tuple[str, str, int, str]]:
    return [
        (r.session_id, r.confined_process_name, e.sequence_number, e.http_request.url)
        for r in requests
        for e in r.logs
    ]


@dataclass
class Proxy:
    path: str
    spool: Spool
    metrics: AgentMetrics
    service: BoundaryService
    proxy: BoundaryLogProxy
    client: CoderdClient
    forwarder: Forwarder
    coderd: Coderd

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.value(name, **labels) or 0.0

    def accepted(self, logs: int) -> defer.Deferred[None]:
        """Fires once the socket has accepted ``logs`` logs in all."""
        done: defer.Deferred[None] = defer.Deferred()
        accept = self.proxy.accept
        seen = [0]

        def counting(message: Any) -> None:
            accept(message)
            seen[0] += len(message.request.logs)
            if seen[0] >= logs and not done.called:
                done.callback(None)

        self.proxy.accept = counting  # type: ignore[method-assign]
        return done.addTimeout(TIMEOUT, reactor)

    async def stop(self) -> None:
        # The boundary service is the client's child: it stops first, the spool last.
        await self.client.stopService()


async def startProxy(
    tmp_path: Path,
    coderd: Coderd,
    port: int | None = None,
    clock: Any = None,
    **spoolArgs: Any,
) -> Proxy:
    metrics = AgentMetrics()
    spool = Spool(tmp_path / "spool", reactor=reactor, onDrop=metrics.boundaryDropped, **spoolArgs)
    path = str(tmp_path / "boundary.sock")
    announced: list[str] = []
    if port is None:
        port = coderd.port.getHost().port
    client = CoderdClient(url=f"http://127.0.0.1:{port}", token=TOKEN, reactor=reactor)
    service = BoundaryService(
        spool=spool,
        client=client,
        metrics=metrics,
        reactor=reactor,
        socketPath=path,
        served=ServedSockets(),
        announce=announced.append,
        clock=clock,
    )
    service.setServiceParent(client)
    client.startService()
    await service.whenStarted()
    assert announced == [path]
    assert service.proxy is not None
    return Proxy(path, spool, metrics, service, service.proxy, client, service.forwarder, coderd)


class Writer(Protocol):
    def __init__(self, data: bytes, close: bool = True) -> None:
        self.data = data
        self.close = close
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        if self.close:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


async def write(path: str, data: bytes, close: bool = True) -> Writer:
    writer = Writer(data, close)
    await UNIXClientEndpoint(reactor, path).connect(Factory.forProtocol(lambda: writer))
    return writer


async def until(coderd: Coderd, n: int) -> None:
    await coderd.api.when(
        lambda api: sum(len(r.logs) for r in api.boundaryRequests) >= n
    ).addTimeout(TIMEOUT, reactor)


# -- the socket -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_v1_and_v2_frames_reach_coderd_with_every_field(
    tmp_path: Path, coderd: Coderd
) -> None:
    p = await startProxy(tmp_path, coderd)
    try:
        first, second = batch("s-1", 0, 3), batch("s-1", 3, 2)
        await write(p.path, v1(first) + v2(second))
        await until(coderd, 5)
        await p.forwarder.drained().addTimeout(TIMEOUT, reactor)
        assert arrived(coderd) == expected(first, second)
        got = [e for r in coderd.api.boundaryRequests for e in r.logs]
        assert got == list(first.logs) + list(second.logs)  # every field, as sent
        assert p.value("agent_boundary_log_proxy_batches_forwarded_total") == 2
        assert "decision=allow" in coderd.lines.getvalue()
    finally:
        await p.stop()


@pytest_twisted.ensureDeferred
async def test_the_socket_is_private_replaces_a_stale_one_and_goes_on_stop(
    tmp_path: Path, coderd: Coderd
) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "boundary.sock"))
    stale.close()  # a socket file nobody serves: what a crash leaves
    p = await startProxy(tmp_path, coderd)
    assert p.proxy.serving
    assert stat.S_IMODE(os.stat(p.path).st_mode) == 0o600
    await p.stop()
    assert not os.path.exists(p.path)


@pytest_twisted.ensureDeferred
async def test_a_socket_another_agent_serves_is_left_alone(tmp_path: Path, coderd: Coderd) -> None:
    first = await startProxy(tmp_path, coderd)
    try:
        metrics = AgentMetrics()
        other = BoundaryLogProxy(
            path=first.path,
            spool=first.spool,
            metrics=metrics,
            reactor=reactor,
            served=ServedSockets(),
        )
        other.startService()
        assert not other.serving  # logged, and the agent runs on
        writer = await write(first.path, v1(batch("s", 0, 1)))
        await writer.lost
        await until(coderd, 1)
        await other.stopService()
    finally:
        await first.stop()


@pytest_twisted.ensureDeferred
async def test_an_unbindable_path_is_an_error_not_a_crash(tmp_path: Path, coderd: Coderd) -> None:
    metrics = AgentMetrics()
    spool = Spool(tmp_path / "spool", reactor=reactor)
    await spool.open()
    proxy = BoundaryLogProxy(
        path=str(tmp_path / "no-such-dir" / "b.sock"),
        spool=spool,
        metrics=metrics,
        reactor=reactor,
        served=ServedSockets(),
    )
    proxy.startService()
    assert not proxy.serving
    await proxy.stopService()
    await spool.close()


@pytest_twisted.ensureDeferred
async def test_bad_input_costs_only_itself(tmp_path: Path, coderd: Coderd) -> None:
    p = await startProxy(tmp_path, coderd)
    try:
        good = [batch(f"s-{i}", 0, 2) for i in range(6)]
        writers = [
            # Undecodable protobuf: that frame is skipped, the next one arrives.
            await write(p.path, encodeFrame(TAG_V1, b"\xff\xff\xff") + v1(good[0])),
            # An unsupported tag closes the connection after what came before.
            await write(
                p.path, v1(good[1]) + bytes.fromhex("07000001") + b"x" + v1(batch("lost", 0, 1))
            ),
            # 32769 bytes: too large, the connection is closed.
            await write(p.path, v2(good[2]) + bytes.fromhex("01008001") + b"y" * 32769),
            # Garbage from the first byte.
            await write(p.path, b"\x00\x00\x00\x05hello" + b"garbage" * 100),
            # A status envelope: counted, not forwarded.
            await write(
                p.path,
                encodeFrame(
                    TAG_V2,
                    boundary_pb2.BoundaryMessage(
                        status=boundary_pb2.BoundaryStatus(
                            dropped_channel_full=7, dropped_batch_full=2
                        )
                    ).SerializeToString(),
                )
                + v1(good[3]),
            ),
            # A truncated last frame: what was complete arrives.
            await write(p.path, v1(good[4]) + v1(good[5])[:-3]),
        ]
        for writer in writers:
            await writer.lost.addTimeout(TIMEOUT, reactor)
        await until(coderd, 10)
        assert sorted(arrived(coderd)) == sorted(expected(*good[:5]))
        assert all(s != "lost" for s, *_ in arrived(coderd))
        assert p.value("agent_boundary_log_proxy_frames_rejected_total", reason="undecodable") == 1
        assert (
            p.value("agent_boundary_log_proxy_frames_rejected_total", reason="unsupported_tag") == 2
        )
        assert p.value("agent_boundary_log_proxy_frames_rejected_total", reason="too_large") == 1
        assert (
            p.value("agent_boundary_log_proxy_logs_dropped_total", reason="boundary_channel_full")
            == 7
        )
        assert (
            p.value("agent_boundary_log_proxy_logs_dropped_total", reason="boundary_batch_full")
            == 2
        )
        # The agent is still listening.
        writer = await write(p.path, v1(batch("after", 0, 1)))
        await writer.lost
        await until(coderd, 11)
    finally:
        await p.stop()


@pytest_twisted.ensureDeferred
async def test_a_writer_that_stalls_mid_frame_blocks_nobody_and_is_closed(
    tmp_path: Path, coderd: Coderd
) -> None:
    clock = Clock()
    p = await startProxy(tmp_path, coderd, clock=clock)
    try:
        stalled = await write(p.path, v1(batch("half", 0, 5))[:20], close=False)
        other = await write(p.path, v1(batch("whole", 0, 5)))
        await other.lost
        await until(coderd, 5)  # the stalled writer held up nobody
        clock.advance(STALL_TIMEOUT - 1)
        assert not stalled.lost.called
        clock.advance(1)
        await stalled.lost.addTimeout(TIMEOUT, reactor)  # and is closed for stalling
        assert p.value("agent_boundary_log_proxy_frames_rejected_total", reason="stalled") == 1
    finally:
        await p.stop()


@pytest_twisted.ensureDeferred
async def test_a_thousand_concurrent_writers(tmp_path: Path, coderd: Coderd) -> None:
    p = await startProxy(tmp_path, coderd)
    try:
        sent = [batch(f"w{i:04d}", 0, 3) for i in range(1000)]
        writers = await defer.gatherResults(
            [defer.ensureDeferred(write(p.path, v1(b))) for b in sent]
        )
        await defer.gatherResults([w.lost for w in writers])
        await until(coderd, 3000)
        assert sorted(arrived(coderd)) == sorted(expected(*sent))
        for request in coderd.api.boundaryRequests:  # each writer's logs in its order
            assert [e.sequence_number for e in request.logs] == list(range(len(request.logs)))
    finally:
        await p.stop()


# -- delivery ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_while_coderd_is_down_batches_wait_and_arrive_in_order(tmp_path: Path) -> None:
    coderd = Coderd()
    port = await coderd.start()
    await coderd.stop()  # nobody listens there now
    p = await startProxy(tmp_path, coderd, port=port)
    try:
        sent = [batch("s", i * 10, 10) for i in range(100)]
        accepted = p.accepted(1000)
        await write(p.path, b"".join(v1(b) for b in sent))
        await accepted
        await p.spool.commit()
        assert p.spool.pendingLogs == 1000
        await coderd.start(port)
        await until(coderd, 1000)
        assert arrived(coderd) == expected(*sent)
        assert all(len(r.logs) <= 1000 for r in coderd.api.boundaryRequests)
        await p.forwarder.drained().addTimeout(TIMEOUT, reactor)
        assert p.spool.pendingRecords == 0
    finally:
        await p.stop()
        await coderd.stop()


@pytest_twisted.ensureDeferred
async def test_coderd_refusing_a_batch_five_times_drops_only_it(
    tmp_path: Path, coderd: Coderd
) -> None:
    refuse = {"poison"}
    handler = coderd.api.handlers["/coder.agent.v2.Agent/ReportBoundaryLogs"]

    def picky(data: bytes) -> bytes:
        from coderagent.coderd.drpc import DRPCError

        if agent_pb2.ReportBoundaryLogsRequest.FromString(data).session_id in refuse:
            raise DRPCError(0, "no thanks")
        return handler(data)

    coderd.api.handlers["/coder.agent.v2.Agent/ReportBoundaryLogs"] = picky
    clock = NextTurnClock()
    p = await startProxy(tmp_path, coderd)
    p.forwarder.clock = clock  # only the retries: a stall timer must not fire next turn
    try:
        before, poison, after = batch("a", 0, 2), batch("poison", 0, 3), batch("b", 0, 2)
        writer = await write(p.path, v1(before) + v1(poison) + v1(after))
        await writer.lost
        await until(coderd, 4)
        await p.forwarder.drained().addTimeout(TIMEOUT, reactor)  # poison given up too
        assert arrived(coderd) == expected(before, after)
        assert (
            p.value("agent_boundary_log_proxy_batches_dropped_total", reason="forward_failed") == 1
        )
        assert p.value("agent_boundary_log_proxy_logs_dropped_total", reason="forward_failed") == 3
        # Four waits between five attempts, on upstream's schedule.
        assert clock.delays == [retryDelay(n) for n in range(1, 5)]
    finally:
        await p.stop()


class NextTurnClock:
    """A clock whose delayed calls run at the reactor's next turn; it records the delays."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def seconds(self) -> float:
        return float(reactor.seconds())

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        self.delays.append(delay)
        return reactor.callLater(0, f, *args, **kw)


def _record(seq: int, session: str, logs: int) -> Record:
    request = batch(session, seq * 100, logs)
    return Record(seq, logs, sessionKey(session, "claude"), request.SerializeToString())


def test_a_sessions_batches_travel_together_up_to_1000_logs_sessions_in_order() -> None:
    records = [
        _record(1, "a", 400),
        _record(2, "a", 500),
        _record(3, "b", 10),  # another session in between
        _record(4, "a", 200),  # would make 1100
        _record(5, "a", 2500),  # more than 1000 on its own: split
    ]
    out = list(requests(records))
    assert [(logs, [r.seq for r in done]) for _, logs, done in out] == [
        (900, [1, 2]),
        (200, [4]),
        (1000, []),
        (1000, []),
        (500, [5]),
        (10, [3]),
    ]
    first = agent_pb2.ReportBoundaryLogsRequest.FromString(out[0][0])
    assert first.session_id == "a" and len(first.logs) == 900
    assert [e.sequence_number for e in first.logs] == list(range(100, 500)) + list(range(200, 700))
    parts = [agent_pb2.ReportBoundaryLogsRequest.FromString(payload) for payload, _, _ in out[2:5]]
    assert [e.sequence_number for part in parts for e in part.logs] == list(range(500, 3000))
    assert {p.session_id for p in parts} == {"a"}
    assert agent_pb2.ReportBoundaryLogsRequest.FromString(out[5][0]).session_id == "b"


@pytest_twisted.ensureDeferred
async def test_batches_over_coderds_limit_are_split_on_the_way(
    tmp_path: Path, coderd: Coderd
) -> None:
    p = await startProxy(tmp_path, coderd)
    try:
        big = agent_pb2.ReportBoundaryLogsRequest(session_id="big")
        for seq in range(2200):  # minimal logs, so that 2200 fit in one frame
            big.logs.add(sequence_number=seq).http_request.method = "G"
        assert len(big.SerializeToString()) <= 32768
        writer = await write(p.path, v1(big))
        await writer.lost
        await until(coderd, 2200)
        assert [len(r.logs) for r in coderd.api.boundaryRequests] == [1000, 1000, 200]
        assert arrived(coderd) == expected(big)
    finally:
        await p.stop()
