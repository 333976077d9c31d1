# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Property: every frame the codec accepts reaches coderd exactly as it was sent.

Random valid frames (``tests/boundaryframes.py``) go through the real path in
one process: the socket protocol's parser and decoder, the proxy's accept,
the spool (written, closed, reopened from disk, read back), the forwarder's
request building, and coderd-dev's ReportBoundaryLogs handler.  What coderd
recorded must be, for every boundary session, the logs that were sent, in
the order they were sent, each with its session id and process name.
"""

from __future__ import annotations

import random
from collections import defaultdict
from io import StringIO
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from coderagent.boundary.forwarder import (
    MAX_LOGS_PER_REQUEST,
    MAX_TAKE_BYTES,
    MAX_TAKE_LOGS,
    requests,
)
from coderagent.boundary.server import BoundaryLogProxy, BoundaryWriter
from coderagent.boundary.spool import Spool
from coderagent.devcoderd.api import DevAgentAPI
from coderagent.devcoderd.workspace import Workspace
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2
from coderagent.unixsocket import ServedSockets
from tests.boundaryframes import exactFrame, frame

FRAMES = 2000
SEED = 20261201

Key = tuple[str, str]
Sent = dict[Key, list[bytes]]


def expectedOf(sent: list[agent_pb2.ReportBoundaryLogsRequest]) -> Sent:
    out: Sent = defaultdict(list)
    for request in sent:
        for entry in request.logs:
            out[request.session_id, request.confined_process_name].append(
                entry.SerializeToString(deterministic=True)
            )
    return dict(out)


async def roundTrip(tmp_path: Path, stream: bytes, rng: random.Random) -> tuple[Sent, DevAgentAPI]:
    """Feed ``stream`` to the socket's protocol in random pieces; return what coderd got."""
    metrics = AgentMetrics()
    spool = Spool(tmp_path / "spool", reactor=reactor, onDrop=metrics.boundaryDropped)
    await spool.open()
    proxy = BoundaryLogProxy(
        path=str(tmp_path / "unused.sock"),
        spool=spool,
        metrics=metrics,
        reactor=Clock(),
        served=ServedSockets(),
    )
    writer = BoundaryWriter(proxy)
    at = 0
    while at < len(stream):
        step = rng.choice((1, 3, 4, 5, 1000, 32772, 100_000))
        writer.dataReceived(stream[at : at + step])
        at += step
    assert writer.parser.error is None and writer.parser.buffered == 0
    await spool.close()

    again = Spool(tmp_path / "spool", reactor=reactor, onDrop=metrics.boundaryDropped)
    await again.open()
    api = DevAgentAPI(Workspace(), out=StringIO())
    handler = api.handlers["/coder.agent.v2.Agent/ReportBoundaryLogs"]
    got: Sent = defaultdict(list)
    while records := await again.take(MAX_TAKE_LOGS, MAX_TAKE_BYTES):
        for payload, logs, _ in requests(records):
            handler(payload)
            request = api.boundaryRequests[-1]
            assert len(request.logs) == logs <= MAX_LOGS_PER_REQUEST
            got[request.session_id, request.confined_process_name] += [
                entry.SerializeToString(deterministic=True) for entry in request.logs
            ]
        again.ack(records)
    assert again.pendingRecords == 0
    await again.close()
    for reason in ("buffer_full", "spool_full", "spool_unreadable"):
        assert not metrics.value("agent_boundary_log_proxy_logs_dropped_total", reason=reason)
    return dict(got), api


@pytest_twisted.ensureDeferred
async def test_random_valid_frames_reach_coderd_byte_for_byte(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    sent, frames = [], []
    for _ in range(FRAMES):
        request, data = frame(rng)
        sent.append(request)
        frames.append(data)
    got, _ = await roundTrip(tmp_path, b"".join(frames), rng)
    expected = expectedOf(sent)
    wrong = [key for key in expected.keys() | got.keys() if got.get(key) != expected.get(key)]
    assert not wrong, (
        f"seed {SEED}: {len(wrong)} of {len(expected)} sessions differ, e.g. session of "
        f"{len(wrong[0][0])} characters: sent {len(expected.get(wrong[0], []))} logs, "
        f"coderd got {len(got.get(wrong[0], []))}"
    )


@pytest.mark.parametrize("tag", [1, 2])
@pytest_twisted.ensureDeferred
async def test_a_full_size_frame_with_a_32k_process_name(tmp_path: Path, tag: int) -> None:
    request, data = exactFrame("0b6f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1c", tag)
    assert len(data) == 4 + 32768
    got, api = await roundTrip(tmp_path, data, random.Random(tag))
    assert got == expectedOf([request])
    [received] = api.boundaryRequests
    assert received.confined_process_name == request.confined_process_name
    assert len(received.confined_process_name) > 32_000


@pytest_twisted.ensureDeferred
async def test_sessions_that_differ_only_where_a_nul_would_split_them(tmp_path: Path) -> None:
    """A key built by joining the two names with NUL would merge these two sessions."""
    first = agent_pb2.ReportBoundaryLogsRequest(session_id="a\0b", confined_process_name="c")
    second = agent_pb2.ReportBoundaryLogsRequest(session_id="a", confined_process_name="b\0c")
    for i, request in enumerate((first, second)):
        request.logs.add(sequence_number=i).http_request.url = f"https://example.com/{i}"
    from coderagent.boundary.codec import TAG_V1, encodeFrame

    stream = b"".join(encodeFrame(TAG_V1, r.SerializeToString()) for r in (first, second))
    got, _ = await roundTrip(tmp_path, stream, random.Random(0))
    assert got == expectedOf([first, second])
