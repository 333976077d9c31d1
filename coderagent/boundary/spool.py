"""A bounded, durable FIFO of boundary log batches: what coderd has not acknowledged yet.

Upstream keeps 100 batches in memory and drops the rest; these are audit
records, so here every batch the socket accepts stays in the spool until
coderd has acknowledged it, and survives a restart, even after SIGKILL.

The reactor side (this module) holds the queue's state and never touches
the disk; :class:`~coderagent.boundary.spooldb.SpoolDatabase` holds the
batches in SQLite and runs in the spool's own thread.  A batch is:

* **appended** in memory, at once; it may be taken and sent to coderd
  straight from there, before it is on disk;
* **written** by the next group commit (at most ``commitInterval`` later,
  one transaction and one ``fsync`` for everything that came meanwhile),
  unless coderd acknowledged it first, in which case it never needs the disk;
* **forgotten** once acknowledged (a later transaction deletes it).

So a SIGKILL loses nothing accepted more than ``commitInterval`` before,
and a healthy coderd costs no disk I/O at all.

Bounds: ``maxBytes`` of batches not yet acknowledged; beyond it the oldest
are dropped (a chunk of ``maxBytes / 16`` at a time) and counted as
``spool_full``.  ``memoryBytes`` of batches held in memory: those already
on disk leave memory first (a take reads them back when their turn comes);
if the disk fails (full, read-only), what cannot be written waits in memory,
and beyond the bound the oldest are dropped and counted as ``buffer_full``,
upstream's name for the agent's own buffer overflowing.  Delivery is at least once: a batch whose
acknowledgement was not yet written when the agent stopped is sent again.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from coderagent.boundary.spooldb import Opened, Row, SpoolDatabase
from coderagent.deferreds import Waiters, cancelCall

log = Logger()

#: What the spool counts for a batch beyond its key and payload.
RECORD_OVERHEAD = 32
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_COMMIT_INTERVAL = 0.05
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024
#: How long to wait before writing again after the disk failed.
RETRY_INTERVAL = 1.0

DropCallback = Callable[[str, int, int], None]
T = TypeVar("T")


def sessionKey(sessionId: str, processName: str) -> bytes:
    """What consecutive batches must share to travel as one request: a digest
    of the two names (unambiguous, and 16 bytes whatever their length)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (sessionId, processName):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.digest()


class Record:
    """One batch as the socket received it, and what it counts for in the bound."""

    __slots__ = ("key", "logs", "payload", "seq", "size")

    def __init__(self, seq: int, logs: int, key: bytes, payload: bytes) -> None:
        self.seq = seq
        self.logs = logs
        self.key = key
        self.payload = payload
        self.size = RECORD_OVERHEAD + len(key) + len(payload)

    def __repr__(self) -> str:
        return f"Record(seq={self.seq}, logs={self.logs}, {len(self.payload)} bytes)"


@dataclass(slots=True)
class _Chunk:
    """Consecutive batches not yet acknowledged: the unit the bound drops."""

    first: int
    last: int
    records: int = 0
    logs: int = 0
    bytes: int = 0


class Spool:
    """The durable queue between the boundary socket and coderd."""

    def __init__(
        self,
        directory: str | Path,
        *,
        reactor: Any,
        maxBytes: int = DEFAULT_MAX_BYTES,
        commitInterval: float = DEFAULT_COMMIT_INTERVAL,
        memoryBytes: int = DEFAULT_MEMORY_BYTES,
        onDrop: DropCallback | None = None,
        clock: Any = None,
    ) -> None:
        """``reactor`` runs the spool's thread; ``clock`` (default: the reactor)
        times the group commits."""
        self.directory = Path(directory)
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.maxBytes = maxBytes
        self.commitInterval = commitInterval
        self.memoryBytes = memoryBytes
        self.chunkBytes = max(4096, maxBytes // 16)
        self.onDrop = onDrop or (lambda reason, batches, logs: None)
        self._db: SpoolDatabase | None = SpoolDatabase(
            self.directory, 2 * maxBytes + (1 << 20), RECORD_OVERHEAD
        )
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="boundary-spool")
        self._shutdownTrigger: Any = None
        self._ready = False
        self._closed = False
        self._nextSeq = 1
        self._chunks: deque[_Chunk] = deque()
        #: Batches not yet taken that are held in memory, oldest first.
        self._memory: deque[Record] = deque()
        self._inMemory = 0  # their bytes
        #: Batches taken and not yet acknowledged, oldest first.
        self._inFlight: deque[Record] = deque()
        #: Of those, the ones whose chunk was dropped meanwhile (delivered anyway).
        self._orphans: set[int] = set()
        self._taken = 0  # the last batch handed out
        self._acked = 0  # every batch up to here is acknowledged (or dropped)
        self._droppedThrough = 0  # every batch up to here was dropped (or acknowledged)
        self._committed = 0  # every batch up to here is on disk (or needs not be)
        self._stored = 0  # the newest batch written to the file
        self._deleted = 0  # the file holds nothing up to here
        self._evictedThrough = 0  # batches up to here are on disk only, not in memory
        self._writing = False
        self._nextWaiters: list[Deferred[None]] = []
        self._idleWaiters: Waiters[None] = Waiters()
        self._commitCall: IDelayedCall | None = None
        self._diskFailing = False
        self._bufferFull = False
        #: Bytes appended since the last write began (what the next one will carry).
        self._sinceWrite = 0
        self._available: Waiters[None] = Waiters()
        #: Batches (and their logs and bytes) accepted and not yet acknowledged.
        self.pendingRecords = 0
        self.pendingLogs = 0
        self.pendingBytes = 0

    # -- opening: recover what a previous run left --------------------------------

    def open(self) -> Deferred[None]:
        """Open (or create) the file in the spool's thread; fires when appends may start.

        A directory that cannot be used is logged as an error and the spool
        runs in memory (bounded by ``memoryBytes``) rather than not at all.
        """
        self._pool.start()
        self._shutdownTrigger = self.reactor.addSystemEventTrigger(
            "during", "shutdown", self._stopThread
        )
        db = self._db
        assert db is not None
        return self._inThread(db.open).addCallbacks(self._opened, self._unusable)

    def _opened(self, opened: Opened) -> None:
        if opened.setAside is not None:
            log.error(
                "boundary spool {path} cannot be read ({why}); it was moved to {aside} and a new "
                "spool started ({batches} batches, {logs} logs in it are not delivered)",
                path=str(self.directory / "spool.db"),
                why=opened.setAsideWhy,
                aside=str(opened.setAside),
                batches=opened.lostBatches,
                logs=opened.lostLogs,
            )
            self.onDrop("spool_unreadable", opened.lostBatches, opened.lostLogs)
        if opened.oldSegments:
            log.warn(
                "boundary spool {dir}: {n} segment files of an earlier coderagent's spool format "
                "are not read; they are left in place",
                dir=str(self.directory),
                n=opened.oldSegments,
            )
        for stored in opened.batches:
            self._count(stored.seq, stored.logs, stored.size)
        if opened.batches:
            last = opened.batches[-1].seq
            first = opened.batches[0].seq
            self._nextSeq = last + 1
            self._committed = self._stored = self._evictedThrough = last
            self._taken = self._acked = self._droppedThrough = self._deleted = first - 1
            log.info(
                "boundary spool: {records} batches ({logs} logs) from before the restart "
                "are waiting for coderd",
                records=self.pendingRecords,
                logs=self.pendingLogs,
            )
        self._ready = True
        self._wakeReaders()

    def _unusable(self, reason: Failure) -> None:
        log.error(
            "boundary spool {dir} is unusable ({error}); audit logs are kept in memory "
            "only (up to {limit} bytes) and do not survive a restart",
            dir=str(self.directory),
            error=_describe(reason),
            limit=self.memoryBytes,
        )
        self._db = None
        self._ready = True
        self._wakeReaders()

    # -- appending -------------------------------------------------------------------

    def append(self, key: bytes, payload: bytes, logs: int) -> Record:
        """Accept one batch; it is on disk within ``commitInterval`` unless
        coderd has it by then."""
        if self._closed or not self._ready:
            raise RuntimeError("the spool is not open")
        record = Record(self._nextSeq, logs, key, payload)
        self._nextSeq += 1
        self._makeRoom(record.size)
        self._count(record.seq, logs, record.size)
        self._memory.append(record)
        self._inMemory += record.size
        self._sinceWrite += record.size
        self._boundMemory()
        self._scheduleCommit()
        self._wakeReaders()
        return record

    def _count(self, seq: int, logs: int, size: int) -> None:
        tail = self._chunks[-1] if self._chunks else None
        if tail is None or tail.bytes >= self.chunkBytes:
            tail = _Chunk(seq, seq)
            self._chunks.append(tail)
        tail.last = seq
        tail.records += 1
        tail.logs += logs
        tail.bytes += size
        self.pendingRecords += 1
        self.pendingLogs += logs
        self.pendingBytes += size

    def _uncount(self, record: Record) -> None:
        for chunk in self._chunks:
            if chunk.first <= record.seq <= chunk.last:
                chunk.records -= 1
                chunk.logs -= record.logs
                chunk.bytes -= record.size
                break
        while self._chunks and self._chunks[0].records == 0 and len(self._chunks) > 1:
            self._chunks.popleft()
        self.pendingRecords -= 1
        self.pendingLogs -= record.logs
        self.pendingBytes -= record.size

    def _makeRoom(self, size: int) -> None:
        """Drop the oldest chunks while a batch of ``size`` would not fit."""
        while self.pendingBytes + size > self.maxBytes and self._chunks:
            head = self._chunks.popleft()
            batches, logs = head.records, head.logs
            self.pendingRecords -= head.records
            self.pendingLogs -= head.logs
            self.pendingBytes -= head.bytes
            # Batches already taken are on their way to coderd: not dropped,
            # and still pending until their acknowledgement comes.
            for record in self._inFlight:
                if head.first <= record.seq <= head.last and record.seq not in self._orphans:
                    self._orphans.add(record.seq)
                    batches -= 1
                    logs -= record.logs
                    self.pendingRecords += 1
                    self.pendingLogs += record.logs
                    self.pendingBytes += record.size
            while self._memory and self._memory[0].seq <= head.last:
                self._inMemory -= self._memory.popleft().size
            self._droppedThrough = max(self._droppedThrough, head.last)
            if batches:
                log.warn(
                    "boundary spool is full ({limit} bytes): dropped the oldest {batches} "
                    "batches ({logs} logs)",
                    limit=self.maxBytes,
                    batches=batches,
                    logs=logs,
                )
                self.onDrop("spool_full", batches, logs)

    def _boundMemory(self) -> None:
        """Keep at most ``memoryBytes`` of untaken batches in memory: those on disk
        leave first (a take reads them back); beyond that, the buffer is full."""
        while self._inMemory > self.memoryBytes and len(self._memory) > 1:
            oldest = self._memory.popleft()
            self._inMemory -= oldest.size
            if oldest.seq <= self._committed and self._db is not None:
                self._evictedThrough = oldest.seq
                continue
            self._uncount(oldest)
            if not self._bufferFull:  # once until the disk takes batches again
                self._bufferFull = True
                log.warn(
                    "boundary spool: {limit} bytes of audit logs are waiting in memory for the "
                    "disk; dropping the oldest (counted as buffer_full)",
                    limit=self.memoryBytes,
                )
            self.onDrop("buffer_full", 1, oldest.logs)
        if self._sinceWrite > self.memoryBytes // 2 and not self._writing and not self._diskFailing:
            self._commitNow()  # half the memory bound arrived since the last write: do not wait

    # -- taking and acknowledging -----------------------------------------------------

    def available(self) -> Deferred[None]:
        """Fires once there is something to take (at once if there is now)."""
        if self._ready and self.pendingRecords > len(self._inFlight):
            return succeed(None)
        return self._available.wait()

    def _wakeReaders(self) -> None:
        if self._available and self._ready and self.pendingRecords > len(self._inFlight):
            self._available.fire(None)

    def take(self, maxLogs: int, maxBytes: int) -> Deferred[list[Record]]:
        """The oldest batches not yet taken, up to the limits (at least one, if any).

        Taken batches stay in the spool until :meth:`ack`; after a restart
        they are taken again.  Batches that left memory are read back from
        the file (in the spool's thread); the others come from memory.
        """
        after = max(self._taken, self._droppedThrough)
        through = self._evictedThrough
        if self._db is not None and after < through:
            limit = max(1, maxLogs)
            d = self._inThread(self._db.read, after, through, limit)
            return d.addCallback(self._takeStored, through, limit, maxLogs, maxBytes)
        return succeed(self._takeFromMemory([], maxLogs, maxBytes))

    def _takeStored(
        self, rows: list[Row], through: int, limit: int, maxLogs: int, maxBytes: int
    ) -> list[Record]:
        out: list[Record] = []
        logs = size = 0
        more = len(rows) >= limit
        for seq, count, key, payload in rows:
            if seq <= max(self._taken, self._droppedThrough):
                continue  # dropped while it was being read
            record = Record(seq, count, key, payload)
            if out and (logs + count > maxLogs or size + record.size > maxBytes):
                more = True
                break
            out.append(record)
            logs += count
            size += record.size
        if out:
            self._taken = max(self._taken, out[-1].seq)
        if not more:
            # The file had nothing else before what memory holds.
            self._taken = max(self._taken, through)
            if self._evictedThrough <= through:  # and nothing left memory meanwhile
                return self._takeFromMemory(out, maxLogs, maxBytes)
        self._inFlight.extend(out)
        return out

    def _takeFromMemory(self, out: list[Record], maxLogs: int, maxBytes: int) -> list[Record]:
        logs = sum(r.logs for r in out)
        size = sum(r.size for r in out)
        memory = self._memory
        while memory:
            record = memory[0]
            if out and (logs + record.logs > maxLogs or size + record.size > maxBytes):
                break
            memory.popleft()
            self._inMemory -= record.size
            out.append(record)
            logs += record.logs
            size += record.size
        if out:
            self._taken = max(self._taken, out[-1].seq)
        if self._inMemory < self.memoryBytes // 2:
            self._bufferFull = False  # drained: a new overflow is worth a new line
        self._inFlight.extend(out)
        return out

    def ack(self, records: list[Record]) -> None:
        """``records`` (taken, oldest first) reached coderd, or were given up: forget them."""
        inFlight = self._inFlight
        for record in records:
            while inFlight and inFlight[0].seq <= record.seq:
                inFlight.popleft()
            self._acked = max(self._acked, record.seq)
            if record.seq in self._orphans:  # its chunk is gone, it was not
                self._orphans.discard(record.seq)
                self.pendingRecords -= 1
                self.pendingLogs -= record.logs
                self.pendingBytes -= record.size
            elif record.seq > self._droppedThrough:
                self._uncount(record)
        self._scheduleCommit()

    # -- durability ---------------------------------------------------------------------

    def _scheduleCommit(self) -> None:
        if self._commitCall is None and not self._writing and self._db is not None:
            delay = RETRY_INTERVAL if self._diskFailing else self.commitInterval
            self._commitCall = self.clock.callLater(delay, self._commitNow)

    def _commitNow(self) -> None:
        self._commitCall = None
        if not self._writing:
            self._write([])

    def commit(self) -> Deferred[None]:
        """Write now what is not on disk yet; fires once that transaction is over
        (if the disk failed, the batches are still held, and the failure logged)."""
        d: Deferred[None] = Deferred()
        if self._writing:
            self._nextWaiters.append(d)
        else:
            self._write([d])
        return d

    def _write(self, waiters: list[Deferred[None]]) -> None:
        cancelCall(self._commitCall)
        self._commitCall = None
        through = self._nextSeq - 1
        self._sinceWrite = 0
        forget = max(self._acked, self._droppedThrough)
        floor = max(self._committed, forget)
        rows: list[Row] = []
        for queue in (self._memory, self._inFlight):
            for record in reversed(queue):
                if record.seq <= floor:
                    break
                if record.seq not in self._orphans:
                    rows.append((record.seq, record.logs, record.key, record.payload))
        deleteThrough = forget if self._stored > self._deleted and forget > self._deleted else 0
        db = self._db
        if db is None or (not rows and not deleteThrough):
            if db is not None:  # nothing to write: everything up to here needs no disk
                self._committed = through
                self._deleted = max(self._deleted, forget)
            for d in waiters:
                d.callback(None)
            return
        rows.sort()
        self._writing = True
        d = self._inThread(db.write, rows, deleteThrough)

        def written(_: object) -> None:
            self._committed = through
            if rows:
                self._stored = max(self._stored, rows[-1][0])
            if deleteThrough:
                self._deleted = deleteThrough
            self._bufferFull = False
            if self._diskFailing:
                self._diskFailing = False
                log.info("boundary spool {dir}: writing works again", dir=str(self.directory))
            self._boundMemory()

        def failed(reason: Failure) -> None:
            if not self._diskFailing:
                log.error(
                    "boundary spool {dir}: cannot write ({error}); keeping new audit logs in "
                    "memory (up to {limit} bytes) until the disk works again",
                    dir=str(self.directory),
                    error=_describe(reason),
                    limit=self.memoryBytes,
                )
            self._diskFailing = True

        def finished(_: object) -> None:
            self._writing = False
            for w in waiters:
                w.callback(None)
            if self._nextWaiters:
                nextWaiters, self._nextWaiters = self._nextWaiters, []
                self._write(nextWaiters)
            if self._writing:
                return
            if self._dirty():
                self._scheduleCommit()
            self._idleWaiters.fire(None)

        d.addCallbacks(written, failed).addBoth(finished)

    def idle(self) -> Deferred[None]:
        """Fires once no write is running (at once if none is)."""
        return self._idleWaiters.wait() if self._writing else succeed(None)

    def _dirty(self) -> bool:
        forget = max(self._acked, self._droppedThrough)
        return self._nextSeq - 1 > self._committed or (
            self._stored > self._deleted and forget > self._deleted
        )

    def close(self) -> Deferred[None]:
        """Write what is left and close the file (at shutdown); no append after this."""
        if self._closed:
            return succeed(None)
        self._closed = True
        d = self.commit()

        def closeFile(_: object) -> Deferred[None] | None:
            floor = max(self._committed, self._acked, self._droppedThrough)
            lost = sum(1 for r in self._memory if r.seq > floor) + sum(
                1 for r in self._inFlight if r.seq > floor and r.seq not in self._orphans
            )
            if lost:
                log.warn(
                    "boundary spool: {n} batches only held in memory (the disk failed) are lost "
                    "at shutdown",
                    n=lost,
                )
            db, self._db = self._db, None
            if db is None or not self._pool.started:
                return None
            return self._inThread(db.close)

        def stopThread(result: object) -> object:
            if self._shutdownTrigger is not None:
                self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
                self._shutdownTrigger = None
            self._stopThread()
            return result

        return d.addCallback(closeFile).addBoth(stopThread).addCallback(lambda _: None)

    def _stopThread(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def _inThread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self._pool, f, *args)


def _describe(reason: Failure) -> str:
    error = reason.value
    strerror = getattr(error, "strerror", None)
    return str(strerror or error)
