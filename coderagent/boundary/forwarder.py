"""Spool to coderd: ReportBoundaryLogs, retried until coderd has them.

Upstream makes one attempt per batch and drops it on any error.  Here a batch
stays in the spool until coderd acknowledged it; while coderd is unreachable
the forwarder waits (the coderd client reconnects meanwhile) and tries again
with upstream's backoff.

What is waiting is taken in one go (up to ``MAX_TAKE_LOGS`` logs) and sent as
one request per boundary session, in the order each session's batches
arrived: a request carries at most 1000 logs (coderd's limit) and 3.5 MiB
(under DRPC's 4 MiB), so a session with more goes as several requests, in
order, and a batch of more than 1000 logs is split.  Batching per session
matters: boundary processes write concurrently, so consecutive batches
rarely share a session, and one round trip per batch would make coderd's
latency, not its throughput, the limit.

The one case where a batch is given up is coderd *answering* with an error
for it ``MAX_REJECTIONS`` times in a row (it is then not a matter of waiting):
it is dropped, logged with coderd's message and counted as
``forward_failed``, so that one bad batch cannot hold up every later one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    FirstError,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.boundary.spool import Record, Spool
from coderagent.coderd.client import CoderdClient, retryDelay
from coderagent.coderd.drpc import DRPCError
from coderagent.deferreds import Waiters, cancelCall
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2

log = Logger()

#: coderd's maxBoundaryLogsPerBatch.
MAX_LOGS_PER_REQUEST = 1000
#: Room under DRPC's 4 MiB message cap.
MAX_REQUEST_BYTES = 3_584 * 1024
#: What one take from the spool may hold: several sessions' requests.
MAX_TAKE_LOGS = 8 * MAX_LOGS_PER_REQUEST
MAX_TAKE_BYTES = 8 * 1024 * 1024
#: Requests on their way to coderd at once (each of another session).
MAX_CALLS_IN_FLIGHT = 4
#: coderd refusing one request this many times in a row drops it.
MAX_REJECTIONS = 5
#: How long one ReportBoundaryLogs may take before it is tried again.
CALL_TIMEOUT = 30.0
#: How long stopping waits for the request on its way.
STOP_GRACE = 5.0

Request = tuple[bytes, int, list[Record]]


def requests(records: list[Record]) -> Iterator[Request]:
    """Every request :func:`bySession` makes of ``records``, one session after another."""
    for session in bySession(records):
        yield from session


def bySession(records: list[Record]) -> list[list[Request]]:
    """``(encoded request, log count, records)`` for each session, its requests in order.

    Sessions come in the order of their first batch, each session's batches
    in their order.  Serialized protobuf messages concatenate into their
    merge (the ``logs`` of every batch in order, the same session fields), so
    a run is sent as its batches' bytes joined, without decoding them.  The
    records of a request are those it completes (a split batch is listed
    with its last part).
    """
    sessions: dict[bytes, list[Record]] = {}
    for record in records:
        sessions.setdefault(record.key, []).append(record)
    return [list(_runs(batches)) for batches in sessions.values()]


def _runs(batches: list[Record]) -> Iterator[Request]:
    run: list[Record] = []
    logs = size = 0
    for record in batches:
        if record.logs > MAX_LOGS_PER_REQUEST:
            if run:
                yield b"".join(r.payload for r in run), logs, run
                run, logs, size = [], 0, 0
            yield from _split(record)
            continue
        if run and (
            logs + record.logs > MAX_LOGS_PER_REQUEST
            or size + len(record.payload) > MAX_REQUEST_BYTES
        ):
            yield b"".join(r.payload for r in run), logs, run
            run, logs, size = [], 0, 0
        run.append(record)
        logs += record.logs
        size += len(record.payload)
    if run:
        yield b"".join(r.payload for r in run), logs, run


def _split(record: Record) -> Iterator[Request]:
    whole = agent_pb2.ReportBoundaryLogsRequest.FromString(record.payload)
    entries = list(whole.logs)
    for start in range(0, len(entries), MAX_LOGS_PER_REQUEST):
        part = agent_pb2.ReportBoundaryLogsRequest(
            logs=entries[start : start + MAX_LOGS_PER_REQUEST],
            session_id=whole.session_id,
            confined_process_name=whole.confined_process_name,
        )
        last = start + MAX_LOGS_PER_REQUEST >= len(entries)
        yield part.SerializeToString(), len(part.logs), [record] if last else []


class Forwarder(Service):
    """Takes from ``spool``, delivers through ``client``, acknowledges."""

    def __init__(
        self,
        *,
        spool: Spool,
        client: CoderdClient,
        metrics: AgentMetrics,
        clock: Any,
        backoff: Callable[[int], float] = retryDelay,
    ) -> None:
        """``clock`` times the retries, ``backoff(attempt)`` says how long each waits."""
        self.spool = spool
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self.backoff = backoff
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[Any] | None = None
        #: Retries waiting for their turn (cancelled at once on stop).
        self._pauses: set[Deferred[None]] = set()
        self._calls = DeferredSemaphore(MAX_CALLS_IN_FLIGHT)
        self._failing = False
        self._drained: Waiters[None] = Waiters()

    def drained(self) -> Deferred[None]:
        """Fires once coderd has everything accepted so far (nothing spooled, none in flight)."""
        if self.spool.pendingRecords == 0:
            return succeed(None)
        return self._drained.wait()

    def startService(self) -> None:
        super().startService()
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(self._crashed)

    def _crashed(self, reason: Failure) -> None:
        if not reason.check(CancelledError):
            log.failure("boundary log forwarder stopped unexpectedly", reason)

    async def _run(self) -> None:
        while self.running:
            self._waiting = self.spool.available()
            await self._waiting
            taking = self.spool.take(MAX_TAKE_LOGS, MAX_TAKE_BYTES)
            self._waiting = taking
            records = await taking
            self._waiting = None
            if not records:
                continue
            # Sessions in parallel (a few calls in flight keep coderd busy), each
            # session's requests one after the other, so that they stay in order.
            sessions = [ensureDeferred(self._deliverSession(r)) for r in bySession(records)]
            try:
                await gatherResults(sessions, consumeErrors=True)
            except FirstError as e:  # cancelled at shutdown (delivery itself never fails)
                e.subFailure.raiseException()
            self.spool.ack(records)
            if self.spool.pendingRecords == 0:
                self._drained.fire(None)

    async def _deliverSession(self, runs: list[Request]) -> None:
        for payload, logs, done in runs:
            await self._calls.acquire()
            try:
                await self._deliver(payload, logs, done)
            finally:
                self._calls.release()

    async def _deliver(self, payload: bytes, logs: int, records: list[Record]) -> None:
        attempt = rejections = 0
        while True:
            try:
                await self.client.call("ReportBoundaryLogs", payload, timeout=CALL_TIMEOUT)
            except DRPCError as e:
                rejections += 1
                if rejections >= MAX_REJECTIONS:
                    log.error(
                        "coderd refused {logs} boundary logs {n} times ({error}); dropping them",
                        logs=logs,
                        n=rejections,
                        error=e.message,
                    )
                    self.metrics.boundaryDropped("forward_failed", len(records), logs)
                    return
                self._failed(f"coderd refused them: {e.message}")
            except CancelledError:
                raise
            except Exception as e:  # CoderdUnavailable, a broken connection: wait and retry
                self._failed(str(e))
            else:
                self.metrics.boundaryBatchesForwarded.inc(len(records))
                if self._failing:
                    self._failing = False
                    log.info(
                        "boundary logs are reaching coderd again ({pending} batches waiting)",
                        pending=self.spool.pendingRecords,
                    )
                return
            attempt += 1
            pause = deferLater(self.clock, self.backoff(attempt), lambda: None)
            self._pauses.add(pause)
            try:
                await pause
            finally:
                self._pauses.discard(pause)

    def _failed(self, why: str) -> None:
        if not self._failing:
            self._failing = True
            log.warn(
                "boundary logs cannot reach coderd ({why}); keeping them ({pending} batches "
                "waiting) and retrying",
                why=why,
                pending=self.spool.pendingRecords,
            )

    def stopService(self) -> Deferred[None]:
        """Let the request on its way finish (within ``STOP_GRACE``); what is left
        stays spooled for the next start."""
        super().stopService()
        loop, self._loop = self._loop, None
        done: Deferred[None] = Deferred()
        if loop is None:
            done.callback(None)
            return done
        for pause in list(self._pauses):
            pause.cancel()
        if self._waiting is not None:
            self._waiting.cancel()  # waiting for batches, not for coderd: stop now
        timer = self.clock.callLater(STOP_GRACE, loop.cancel)

        def finished(result: object) -> None:
            cancelCall(timer)
            done.callback(None)

        loop.addBoth(finished)
        return done
