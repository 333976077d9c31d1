"""Script output to coderd: ``BatchCreateLogs`` per log source, as upstream's ``LogSender``.

Lines are queued per log source and sent one request at a time: a source
whose queue has not been sent for :data:`FLUSH_INTERVAL` (or never, or whose
script asked for a flush as it ended) goes next, the one that waited longest
first, with as many of its lines as fit in :data:`MAX_BYTES_PER_BATCH`
(counting :data:`OVERHEAD_PER_LOG` per line, as upstream).  A line leaves its
queue only once coderd took it, so a connection lost under a request sends
the same lines again on the next one: every line arrives, in order, at least
once.

Memory is bounded: at most :data:`MAX_BYTES_QUEUED` bytes of output are
queued (upstream's bound, coderd's own limit on an agent's logs), and, ours,
at most :data:`MAX_LINES_QUEUED` lines (a flood of empty lines costs memory
without output).  Beyond that new lines are dropped, as are lines too long
for one request.  When coderd answers ``log_limit_exceeded`` the queues are
emptied and nothing more is sent, as upstream.  What is dropped is counted
(``agent_scripts_log_lines_dropped_total{reason}``) and logged once per
reason.  Unlike upstream, a request coderd refuses with an error five times
in a row is dropped (``rejected``) instead of being retried forever: one
bad line must not hold up every script's log.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient, retryDelay
from coderagent.coderd.drpc import DRPCError
from coderagent.deferreds import Waiters, cancelCall
from coderagent.observe.metrics import SCRIPT_LOG_DROP_REASONS
from coderagent.pb import agent_pb2

log = Logger()

FLUSH_INTERVAL = 1.0
MAX_BYTES_PER_BATCH = 1 << 20
OVERHEAD_PER_LOG = 21
MAX_BYTES_QUEUED = 1048576
MAX_LINES_QUEUED = 65536
#: A request coderd answers with an error this many times in a row is dropped.
MAX_REJECTIONS = 5
#: The longest line that fits in one request.
MAX_LINE_BYTES = MAX_BYTES_PER_BATCH - OVERHEAD_PER_LOG

#: ``reason`` values of the drop counter.
DROP_REASONS = SCRIPT_LOG_DROP_REASONS

INFO = agent_pb2.Log.INFO
ERROR = agent_pb2.Log.ERROR

DropCounter = Callable[[str, int], None]


@dataclass
class _Queue:
    #: (created_at in ns, level, output, output size in bytes)
    lines: deque[tuple[int, int, str, int]] = field(default_factory=deque)
    lastFlush: float | None = None
    flushRequested: bool = False


class LogSender(Service):
    """Per-source queues of script output, sent to coderd in order, with bounded memory."""

    def __init__(
        self,
        client: CoderdClient,
        clock: Any,
        onDrop: DropCounter | None = None,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.clock = clock
        self.wallClock = wallClock
        self.onDrop = onDrop
        self.queues: dict[bytes, _Queue] = {}
        self.queuedBytes = 0
        self.queuedLines = 0
        self.limitExceeded = False
        #: Lines dropped, by reason (also counted through ``onDrop``).
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._sending = False
        self._timer: IDelayedCall | None = None
        #: Whether ``_timer`` is a retry after a failure (else: a flush interval).
        self._retrying = False
        self._failures = 0
        self._rejections = 0
        self._empty: Waiters[None] = Waiters()

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)

    def stopService(self) -> None:
        super().stopService()
        cancelCall(self._timer)
        self._timer = None

    def _connected(self, client: CoderdClient) -> None:
        self._failures = 0
        self._retrying = False
        cancelCall(self._timer)
        self._timer = None
        self._kick()

    # -- what scripts call -------------------------------------------------------

    def enqueue(self, source: bytes, level: int, line: bytes, created: float | None = None) -> None:
        """Queue one line of output (without its newline) from log source ``source``."""
        size = len(line)
        if self.limitExceeded:
            self.drop(source, "limit_exceeded")
            return
        if size > MAX_LINE_BYTES:
            self.drop(source, "too_long")
            return
        if self.queuedBytes > MAX_BYTES_QUEUED or self.queuedLines >= MAX_LINES_QUEUED:
            self.drop(source, "queue_full")
            return
        when = self.wallClock() if created is None else created
        text = line.decode("utf-8", "replace").replace("\x00", "\ufffd")
        queue = self.queues.get(source)
        if queue is None:
            queue = self.queues[source] = _Queue()
        queue.lines.append((int(when * 1e9), level, text, size))
        self.queuedBytes += size
        self.queuedLines += 1
        self._kick()

    def flush(self, source: bytes) -> None:
        """Send ``source``'s queued lines without waiting for the flush interval."""
        queue = self.queues.get(source)
        if queue is not None:
            queue.flushRequested = True
            self._kick()

    def drop(self, source: bytes, reason: str, lines: int = 1) -> None:
        """Count ``lines`` lines of ``source`` that coderd will not get, and why."""
        if lines <= 0:
            return
        first = self.dropped[reason] == 0
        self.dropped[reason] += lines
        if self.onDrop is not None:
            self.onDrop(reason, lines)
        if first:
            log.warn(
                "script output not sent to coderd ({reason}): {why}; dropped lines are counted "
                "in agent_scripts_log_lines_dropped_total",
                reason=reason,
                why=_WHY[reason],
            )

    def waitUntilEmpty(self) -> Deferred[None]:
        """Fires once nothing is queued or on its way (or nothing more can be sent)."""
        if self._isEmpty():
            return succeed(None)
        return self._empty.wait()

    # -- sending -----------------------------------------------------------------

    def _isEmpty(self) -> bool:
        return self.limitExceeded or (not self.queues and not self._sending)

    def _pending(self, now: float) -> tuple[bytes, _Queue] | None:
        """The queue to send now: due ones, the longest unsent first."""
        best: tuple[bytes, _Queue] | None = None
        for source, queue in self.queues.items():
            due = (
                queue.flushRequested
                or queue.lastFlush is None
                or now - queue.lastFlush >= FLUSH_INTERVAL
            )
            if not due:
                continue
            if best is None or (queue.lastFlush or 0.0) < (best[1].lastFlush or 0.0):
                best = (source, queue)
        return best

    def _kick(self) -> None:
        if self._sending or self.limitExceeded or self._retrying:
            return
        cancelCall(self._timer)
        self._timer = None
        now = self.clock.seconds()
        work = self._pending(now)
        if work is None:
            if self.queues:
                wake = min((q.lastFlush or now) + FLUSH_INTERVAL for q in self.queues.values())
                self._timer = self.clock.callLater(max(0.0, wake - now), self._woken)
            return
        source, queue = work
        queue.flushRequested = False
        request = agent_pb2.BatchCreateLogsRequest(log_source_id=source)
        total = 0
        for created, level, text, size in queue.lines:
            total += size + OVERHEAD_PER_LOG
            if total > MAX_BYTES_PER_BATCH and request.logs:
                break
            stamp = timestamp_pb2.Timestamp()
            stamp.FromNanoseconds(created)
            request.logs.add(created_at=stamp, output=text, level=level)
        count = len(request.logs)
        self._sending = True
        d: Deferred[Any] = self.client.call("BatchCreateLogs", request)
        d.addCallbacks(
            self._sent, self._failed, callbackArgs=(source, count), errbackArgs=(source, count)
        )

    def _woken(self) -> None:
        self._timer = None
        self._retrying = False
        self._kick()

    def _sent(self, response: agent_pb2.BatchCreateLogsResponse, source: bytes, count: int) -> None:
        self._sending = False
        self._failures = 0
        self._rejections = 0
        queue = self.queues.get(source)
        if response.log_limit_exceeded:
            self._limitExceeded()
            return
        if queue is not None:
            self._take(source, queue, count)
            if queue.lines:
                queue.lastFlush = self.clock.seconds()
        self._settled()

    def _take(self, source: bytes, queue: _Queue, count: int) -> None:
        for _ in range(min(count, len(queue.lines))):
            _, _, _, size = queue.lines.popleft()
            self.queuedBytes -= size
            self.queuedLines -= 1
        if not queue.lines:
            del self.queues[source]

    def _limitExceeded(self) -> None:
        log.warn("server log limit exceeded; logs truncated")
        self.limitExceeded = True
        for source, queue in list(self.queues.items()):
            self.drop(source, "limit_exceeded", len(queue.lines))
        self.queues.clear()
        self.queuedBytes = self.queuedLines = 0
        self._settled()

    def _failed(self, reason: Failure, source: bytes, count: int) -> None:
        self._sending = False
        self._failures += 1
        if reason.check(DRPCError):
            self._rejections += 1
            if self._rejections >= MAX_REJECTIONS:
                self._rejections = 0
                log.warn(
                    "coderd refused {lines} lines of script output {count} times in a row "
                    "({error}); dropping them",
                    lines=count,
                    count=MAX_REJECTIONS,
                    error=reason.getErrorMessage(),
                )
                queue = self.queues.get(source)
                if queue is not None:
                    taken = min(count, len(queue.lines))
                    self._take(source, queue, taken)
                    self.drop(source, "rejected", taken)
                self._settled()
                return
        if self._failures == 1 or reason.check(DRPCError):
            log.warn(
                "sending script logs to coderd failed: {error}; retrying",
                error=reason.getErrorMessage(),
            )
        cancelCall(self._timer)
        self._retrying = True
        self._timer = self.clock.callLater(retryDelay(self._failures), self._woken)

    def _settled(self) -> None:
        if self._isEmpty():
            self._empty.fire(None)
        self._kick()


_WHY = {
    "queue_full": f"more than {MAX_BYTES_QUEUED} bytes or {MAX_LINES_QUEUED} lines "
    "are waiting for coderd",
    "too_long": f"a line is longer than {MAX_LINE_BYTES} bytes",
    "limit_exceeded": "coderd's limit on the workspace's logs is reached",
    "rejected": "coderd refused them",
}
