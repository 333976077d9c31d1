# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Script logs to coderd (coderd-dev in memory, on a clock): batching, order, bounds, limit."""

from __future__ import annotations

import io
import uuid
from typing import Any

from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from coderagent.coderd.client import CoderdClient
from coderagent.devcoderd.api import DevAgentAPI
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from coderagent.scripts.logsender import (
    ERROR,
    FLUSH_INTERVAL,
    INFO,
    MAX_BYTES_PER_BATCH,
    MAX_BYTES_QUEUED,
    MAX_LINE_BYTES,
    MAX_LINES_QUEUED,
    MAX_REJECTIONS,
    OVERHEAD_PER_LOG,
    LogSender,
)
from tests.localcoderd import TOKEN, Loopback

A = uuid.UUID("10000000-0000-4000-8000-00000000000a").bytes
B = uuid.UUID("10000000-0000-4000-8000-00000000000b").bytes
UNKNOWN = uuid.UUID("10000000-0000-4000-8000-0000000000ff").bytes


class Harness:
    """A LogSender talking to coderd-dev's server side in memory; time moves when told."""

    def __init__(self, **api: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(1767366245)
        scripts = [
            agent_pb2.WorkspaceAgentScript(log_source_id=A, id=A, display_name="a"),
            agent_pb2.WorkspaceAgentScript(log_source_id=B, id=B, display_name="b"),
        ]
        self.api = DevAgentAPI(Workspace(scripts=scripts), out=io.StringIO(), **api)
        self.loopback = Loopback(DevCoderdFactory(self.api, TOKEN, self.clock), self.clock)
        self.client = CoderdClient(
            url="http://coderd.test", token=TOKEN, reactor=self.clock, transport=self.loopback
        )
        self.drops: list[tuple[str, int]] = []
        self.sender = LogSender(
            self.client,
            self.clock,
            onDrop=lambda reason, n: self.drops.append((reason, n)),
            wallClock=self.clock.seconds,
        )
        self.sender.setServiceParent(self.client)
        self.client.startService()
        self.pump()
        assert self.client.connected

    def pump(self) -> None:
        for pump in self.loopback.pumps:
            pump.flush()

    def sent(self, source: bytes = A) -> list[str]:
        record = self.api.scripts.sources.get(uuid.UUID(bytes=source))
        return [line.output for line in record.lines] if record else []


def test_the_first_line_goes_at_once_the_next_after_the_flush_interval() -> None:
    h = Harness()
    h.sender.enqueue(A, INFO, b"one")
    h.sender.enqueue(A, ERROR, b"two")  # queued behind the request on its way
    h.pump()
    assert h.sent() == ["one"]
    h.sender.enqueue(A, INFO, b"three")
    h.pump()
    assert h.sent() == ["one"]
    h.clock.advance(FLUSH_INTERVAL)
    h.pump()
    assert h.sent() == ["one", "two", "three"]
    levels = [line.level for line in h.api.scripts.sources[uuid.UUID(bytes=A)].lines]
    assert levels == [INFO, ERROR, INFO]
    # A queue that was emptied is new again: its next line goes at once.
    h.sender.enqueue(A, INFO, b"four")
    h.pump()
    assert h.sent()[-1] == "four"


def test_a_flush_sends_without_waiting() -> None:
    h = Harness()
    h.sender.enqueue(A, INFO, b"one")
    h.sender.enqueue(A, INFO, b"two")
    h.sender.flush(A)
    h.pump()
    assert h.sent() == ["one", "two"]  # flushed: no interval


def test_lines_keep_their_order_per_source_and_sources_take_turns() -> None:
    h = Harness()
    for i in range(50):
        h.sender.enqueue(A, INFO, f"a{i}".encode())
        h.sender.enqueue(B, INFO, f"b{i}".encode())
    for _ in range(5):
        h.clock.advance(FLUSH_INTERVAL)
        h.pump()
    assert h.sent(A) == [f"a{i}" for i in range(50)]
    assert h.sent(B) == [f"b{i}" for i in range(50)]
    assert h.sender.waitUntilEmpty().called


def test_a_request_carries_at_most_a_mebibyte_counting_the_overhead() -> None:
    h = Harness(logLimit=8 * MAX_BYTES_PER_BATCH)
    line = b"x" * 999
    h.sender.enqueue(A, INFO, b"first")
    for _ in range(1049):  # just under the queue's bound
        h.sender.enqueue(A, INFO, line)
    h.pump()
    sizes = []
    while h.sender.queues:
        before = len(h.sent())
        h.clock.advance(FLUSH_INTERVAL)
        h.pump()
        sizes.append(len(h.sent()) - before)
    assert sizes[0] == MAX_BYTES_PER_BATCH // (999 + OVERHEAD_PER_LOG)
    assert sum(sizes) == 1049 and h.sender.dropped["queue_full"] == 0


def test_a_request_lost_with_the_connection_is_sent_again() -> None:
    h = Harness()
    h.sender.enqueue(A, INFO, b"one")  # written to the connection...
    [pump] = h.loopback.pumps
    pump.client.transport.getOutBuffer()  # ...which loses it before coderd read it
    pump.client.transport.loseConnection()
    h.pump()
    assert h.sent() == [] and not h.client.connected
    h.sender.enqueue(A, INFO, b"two")
    for _ in range(10):
        h.clock.advance(1)
        h.pump()
    assert h.client.connected
    assert h.sent() == ["one", "two"]


def test_the_log_limit_stops_everything_once_counted_and_logged() -> None:
    events: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.scripts.logsender":
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness(logLimit=10)
        h.sender.enqueue(A, INFO, b"12345")
        h.pump()
        h.sender.enqueue(A, INFO, b"678")
        h.sender.enqueue(B, INFO, b"over the limit")
        h.clock.advance(FLUSH_INTERVAL)
        h.pump()
        h.clock.advance(FLUSH_INTERVAL)
        h.pump()
        waited = h.sender.waitUntilEmpty()
        h.sender.enqueue(A, INFO, b"after")
        h.clock.advance(FLUSH_INTERVAL)
        h.pump()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert h.sent(A) == ["12345", "678"] and h.sent(B) == []
    assert h.sender.limitExceeded and waited.called
    assert h.sender.dropped["limit_exceeded"] == 2  # the refused line, and one after
    assert events.count("server log limit exceeded; logs truncated") == 1
    assert sum(1 for e in events if "(limit_exceeded)" in e) == 1
    assert h.api.scripts.logsOverflowed


def test_memory_is_bounded_and_what_is_dropped_is_counted() -> None:
    h = Harness()
    h.sender.enqueue(A, INFO, b"x" * (MAX_LINE_BYTES + 1))
    assert h.sender.dropped["too_long"] == 1
    line = b"y" * 1000
    sent = 0
    while h.sender.dropped["queue_full"] == 0:
        h.sender.enqueue(A, INFO, line)
        sent += 1
    assert h.sender.queuedBytes <= MAX_BYTES_QUEUED + len(line)
    for _ in range(100):
        h.sender.enqueue(B, INFO, b"")
    assert h.sender.dropped["queue_full"] == 101
    assert h.drops[:2] == [("too_long", 1), ("queue_full", 1)]
    small = Harness()
    for _ in range(MAX_LINES_QUEUED + 10):
        small.sender.enqueue(A, INFO, b"")
    assert small.sender.queuedLines == MAX_LINES_QUEUED
    assert small.sender.dropped["queue_full"] == 10


def test_a_batch_coderd_keeps_refusing_is_dropped_not_retried_forever() -> None:
    h = Harness()
    h.sender.enqueue(UNKNOWN, INFO, b"refused")
    h.sender.enqueue(A, INFO, b"fine")
    for _ in range(MAX_REJECTIONS * 2 + 5):
        h.clock.advance(10)
        h.pump()
    assert h.sender.dropped["rejected"] == 1
    assert h.sent(A) == ["fine"]
    assert h.sender.waitUntilEmpty().called


def test_text_is_made_safe_for_coderd() -> None:
    h = Harness()
    h.sender.enqueue(A, INFO, b"bad \xff utf-8 and a \x00 nul\r")
    h.pump()
    assert h.sent() == ["bad \ufffd utf-8 and a \ufffd nul\r"]
