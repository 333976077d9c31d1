"""A bounded, durable FIFO of boundary log batches: what coderd has not acknowledged yet.

Upstream keeps 100 batches in memory and drops the rest; these are audit
records, so here every batch the socket accepts is appended to a spool on
disk first and removed only once coderd has acknowledged it.  A restart,
even after SIGKILL, delivers what was accepted more than one group-commit
interval before.

Layout: a directory of segment files (``<first seq>.seg``, each at most
``segmentBytes``) and an ``acked`` file holding the sequence number of the last
record delivered.  A record is::

    magic "CBL\\x01" | seq u64 | logs u32 | key length u16 | payload length u32 |
    crc32 u32 | key | payload

where the key names the boundary session (``session_id`` NUL
``confined_process_name``) so that consecutive records of one session can be
sent as one request, and the CRC covers everything after the magic.  Reading
skips what does not check out (a torn write at the tail, garbage in the
middle) by searching for the next magic, and logs how much it skipped.

Writes go through a buffer flushed to the OS at least every
``commitInterval`` (a SIGKILL loses nothing flushed) and ``fsync``'d in a
thread right after (for power loss), so the reactor never waits on the disk.

Bounds: ``maxBytes`` of records not yet acknowledged.  Appending beyond it
drops the oldest whole segment first, counted as ``spool_full``.  If the disk
fails (full, read-only), records are kept in memory instead, up to
``memoryBytes`` (beyond that the oldest are dropped, counted as
``spool_unavailable``), and the spool tries the disk again once memory has
drained.  Delivery is at least once: a record whose acknowledgement was not
yet written when the agent stopped is sent again.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MAGIC = b"CBL\x01"
_HEAD = struct.Struct(">4sQIHII")
HEAD_SIZE = _HEAD.size
#: What a record may claim before it is taken for garbage: what the writer can store.
_MAX_KEY = 0xFFFF
_MAX_PAYLOAD = 1 << 20
_READ_CHUNK = 256 * 1024

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_COMMIT_INTERVAL = 0.05
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024
MAX_SEGMENT_BYTES = 8 * 1024 * 1024
MIN_SEGMENT_BYTES = 8 * 1024

DropCallback = Callable[[str, int, int], None]


@dataclass
class Record:
    """One batch as the socket received it."""

    seq: int
    logs: int
    key: bytes
    payload: bytes

    @property
    def size(self) -> int:
        return HEAD_SIZE + len(self.key) + len(self.payload)


def encodeRecord(record: Record) -> bytes:
    meta = struct.pack(">QIHI", record.seq, record.logs, len(record.key), len(record.payload))
    crc = zlib.crc32(record.payload, zlib.crc32(record.key, zlib.crc32(meta)))
    return (
        _HEAD.pack(MAGIC, record.seq, record.logs, len(record.key), len(record.payload), crc)
        + record.key
        + record.payload
    )


class _Parser:
    """Records out of a byte buffer, skipping anything that does not check out."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.buf = bytearray()
        self.offset = 0  # file offset of buf[0]
        self.skipped = 0

    def next(self, final: bool) -> Record | None:
        """The next whole record, or None when more bytes are needed (or, if ``final``, none)."""
        buf = self.buf
        while True:
            if len(buf) < HEAD_SIZE:
                if final and buf:
                    self._skip(len(buf), "truncated record at the end")
                return None
            if buf[:4] != MAGIC:
                at = buf.find(MAGIC, 1)
                self._skip(at if at > 0 else len(buf) - 3, "bytes that are not a record")
                continue
            _, seq, logs, keyLen, payloadLen, crc = _HEAD.unpack_from(buf)
            if keyLen > _MAX_KEY or payloadLen > _MAX_PAYLOAD:
                self._skip(1, "a record header with impossible lengths")
                continue
            end = HEAD_SIZE + keyLen + payloadLen
            if len(buf) < end:
                if not final:
                    return None
                at = buf.find(MAGIC, 1)
                if at < 0:
                    self._skip(len(buf), "truncated record at the end")
                    return None
                self._skip(at, "a record cut short")
                continue
            key = bytes(buf[HEAD_SIZE : HEAD_SIZE + keyLen])
            payload = bytes(buf[HEAD_SIZE + keyLen : end])
            meta = struct.pack(">QIHI", seq, logs, keyLen, payloadLen)
            if zlib.crc32(payload, zlib.crc32(key, zlib.crc32(meta))) != crc:
                self._skip(1, "a record whose checksum does not match")
                continue
            del buf[:end]
            self.offset += end
            return Record(seq, logs, key, payload)

    def _skip(self, n: int, what: str) -> None:
        n = max(1, n) if self.buf else 0
        if n:
            log.warn(
                "boundary spool {where}: skipped {n} bytes at offset {offset}: {what}",
                where=self.where,
                n=n,
                offset=self.offset,
                what=what,
            )
        del self.buf[:n]
        self.offset += n
        self.skipped += n


@dataclass
class _Segment:
    firstSeq: int
    path: Path
    records: int = 0
    logs: int = 0
    bytes: int = 0
    lastSeq: int = 0
    #: Bytes known to be in the file (flushed); a reader stops there.
    durable: int = 0
    #: Of this segment's records, those already acknowledged (or dropped).
    ackedRecords: int = 0
    ackedLogs: int = 0
    ackedBytes: int = 0
    writing: bool = False


@dataclass
class _Reader:
    segment: _Segment
    file: IO[bytes]
    parser: _Parser
    position: int  # file offset read up to


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
        opener: Callable[[Path, str], IO[bytes]] | None = None,
        clock: Any = None,
    ) -> None:
        """``reactor`` runs the fsyncs in its thread pool; ``clock`` (default:
        the reactor) times the group commits."""
        self.directory = Path(directory)
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.maxBytes = maxBytes
        self.commitInterval = commitInterval
        self.memoryBytes = memoryBytes
        self.segmentBytes = max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, maxBytes // 8))
        self.onDrop = onDrop or (lambda reason, batches, logs: None)
        self._open = opener or (lambda path, mode: open(path, mode))
        self._segments: deque[_Segment] = deque()
        self._writer: IO[bytes] | None = None
        self._reader: _Reader | None = None
        self._pushback: Record | None = None
        self._memory: deque[Record] = deque()
        self._memoryBytes = 0
        self._unflushed: list[Record] = []
        self._diskOK = True
        self._diskBroken = False  # the directory itself is unusable: never retry
        self._acked = 0
        self._ackedOnDisk = 0
        #: The last record handed out by take (acknowledged or not).
        self._taken = 0
        #: Records taken and not yet acknowledged, oldest first.
        self._inFlight: deque[Record] = deque()
        #: Of those, the ones whose segment was dropped meanwhile.
        self._orphans: set[int] = set()
        self._nextSeq = 1
        self._commitCall: IDelayedCall | None = None
        self._syncing: Deferred[None] | None = None
        self._closed = False
        #: Records (and their logs and bytes) accepted and not yet acknowledged.
        self.pendingRecords = 0
        self.pendingLogs = 0
        self.pendingBytes = 0
        self._available: list[Deferred[None]] = []

    # -- opening: recover what a previous run left --------------------------------

    def open(self) -> None:
        """Create the directory (0700) and recover the segments.

        A directory that cannot be used is logged as an error and the spool
        runs in memory (bounded by ``memoryBytes``) rather than not at all.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
            self._recoverAll()
        except OSError as e:
            log.error(
                "boundary spool {dir} is unusable ({error}); audit logs are kept in memory "
                "only (up to {limit} bytes) and do not survive a restart",
                dir=str(self.directory),
                error=e.strerror or str(e),
                limit=self.memoryBytes,
            )
            self._diskOK = False
            self._diskBroken = True

    def _recoverAll(self) -> None:
        self._acked = self._ackedOnDisk = self._readAcked()
        for path in sorted(self.directory.glob("*.seg"), key=_segmentOrder):
            self._recover(path)
        if self._segments:
            self._nextSeq = max(self._nextSeq, self._segments[-1].lastSeq + 1)
        self._nextSeq = max(self._nextSeq, self._acked + 1)
        self._deleteAcked()
        if self.pendingRecords:
            log.info(
                "boundary spool: {records} batches ({logs} logs) from before the restart "
                "are waiting for coderd",
                records=self.pendingRecords,
                logs=self.pendingLogs,
            )

    def _readAcked(self) -> int:
        try:
            text = (self.directory / "acked").read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text)
        except ValueError:
            log.warn("boundary spool: unreadable acked file {text!r}; resending all", text=text)
            return 0

    def _recover(self, path: Path) -> None:
        segment = _Segment(firstSeq=_segmentOrder(path), path=path)
        parser = _Parser(path.name)
        lastSeq = self._segments[-1].lastSeq if self._segments else 0
        with self._open(path, "rb") as f:
            while True:
                chunk = f.read(_READ_CHUNK)
                parser.buf += chunk
                final = not chunk
                while (record := parser.next(final)) is not None:
                    if record.seq <= lastSeq:
                        continue  # out of order: a stale copy
                    lastSeq = record.seq
                    segment.records += 1
                    segment.logs += record.logs
                    segment.bytes += record.size
                    segment.lastSeq = record.seq
                    if record.seq <= self._acked:
                        segment.ackedRecords += 1
                        segment.ackedLogs += record.logs
                        segment.ackedBytes += record.size
                if final:
                    break
        segment.durable = path.stat().st_size
        if not segment.records:
            _unlink(path)
            return
        self._segments.append(segment)
        self.pendingRecords += segment.records - segment.ackedRecords
        self.pendingLogs += segment.logs - segment.ackedLogs
        self.pendingBytes += segment.bytes - segment.ackedBytes

    # -- appending -------------------------------------------------------------------

    def append(self, key: bytes, payload: bytes, logs: int) -> Record:
        """Accept one batch; it is durable within ``commitInterval``."""
        if self._closed:
            raise RuntimeError("the spool is closed")
        record = Record(self._nextSeq, logs, key, payload)
        self._nextSeq += 1
        self._makeRoom(record.size)
        self.pendingRecords += 1
        self.pendingLogs += logs
        self.pendingBytes += record.size
        if self._memory or not self._diskOK:
            self._remember(record)
        else:
            try:
                self._write(record)
            except OSError as e:
                self._diskFailed(e)
                self._remember(record)
        self._wakeReaders()
        return record

    def _write(self, record: Record) -> None:
        segment = self._segments[-1] if self._segments else None
        if segment is None or not segment.writing:
            segment = self._startSegment(record.seq)
        assert self._writer is not None
        self._writer.write(encodeRecord(record))
        self._unflushed.append(record)
        segment.records += 1
        segment.logs += record.logs
        segment.bytes += record.size
        segment.lastSeq = record.seq
        if segment.bytes >= self.segmentBytes:
            self._flush()
            self._finishSegment()
        elif self._commitCall is None:
            self._commitCall = self.clock.callLater(self.commitInterval, self._commit)

    def _startSegment(self, firstSeq: int) -> _Segment:
        path = self.directory / f"{firstSeq:016d}.seg"
        self._writer = self._open(path, "ab")
        segment = _Segment(firstSeq=firstSeq, path=path, writing=True)
        self._segments.append(segment)
        return segment

    def _finishSegment(self) -> None:
        writer, self._writer = self._writer, None
        if self._segments:
            self._segments[-1].writing = False
        if writer is not None:
            _sync(writer)
            writer.close()

    def _flush(self) -> None:
        """Hand the buffer to the OS (what survives a SIGKILL)."""
        if self._writer is None or not self._unflushed:
            return
        try:
            self._writer.flush()
        except OSError as e:
            self._diskFailed(e)
            return
        segment = self._segments[-1]
        segment.durable = segment.bytes
        self._unflushed.clear()

    def _remember(self, record: Record) -> None:
        self._memory.append(record)
        self._memoryBytes += record.size
        while self._memoryBytes > self.memoryBytes and len(self._memory) > 1:
            oldest = self._memory.popleft()
            self._memoryBytes -= oldest.size
            self._forget(oldest)
            self.onDrop("spool_unavailable", 1, oldest.logs)

    def _forget(self, record: Record) -> None:
        self.pendingRecords -= 1
        self.pendingLogs -= record.logs
        self.pendingBytes -= record.size

    def _diskFailed(self, error: OSError) -> None:
        """Writing failed: keep what was not flushed in memory, stop using the disk for now."""
        if self._diskOK:
            log.error(
                "boundary spool {dir}: cannot write ({error}); keeping new audit logs in memory "
                "(up to {limit} bytes) until the disk works again",
                dir=str(self.directory),
                error=os.strerror(error.errno) if error.errno else str(error),
                limit=self.memoryBytes,
            )
        self._diskOK = False
        segment = self._segments[-1] if self._segments and self._segments[-1].writing else None
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        if segment is not None:
            # What did not reach the file is re-queued in memory, in order.
            for record in self._unflushed:
                segment.records -= 1
                segment.logs -= record.logs
                segment.bytes -= record.size
            segment.writing = False
            segment.lastSeq = segment.firstSeq - 1 + segment.records if segment.records else 0
            try:
                os.truncate(segment.path, segment.durable)
            except OSError:
                pass
            if not segment.records:
                self._segments.pop()
                if self._reader is not None and self._reader.segment is segment:
                    self._closeReader()
                _unlink(segment.path)
        unflushed, self._unflushed = self._unflushed, []
        for record in unflushed:
            self._remember(record)

    def _makeRoom(self, size: int) -> None:
        """Drop the oldest segments while the new record would not fit."""
        while self.pendingBytes + size > self.maxBytes and self._segments:
            head = self._segments[0]
            if head.writing:
                if head.bytes == 0:
                    break
                self._flush()
                self._finishSegment()
            self._dropHead()

    def _dropHead(self) -> None:
        head = self._segments.popleft()
        batches = head.records - head.ackedRecords
        logs = head.logs - head.ackedLogs
        size = head.bytes - head.ackedBytes
        # Records already taken are on their way to coderd: not dropped, and
        # still pending until their acknowledgement comes.
        for record in self._inFlight:
            if head.firstSeq <= record.seq <= head.lastSeq:
                batches -= 1
                logs -= record.logs
                size -= record.size
                self._orphans.add(record.seq)
        self.pendingRecords -= batches
        self.pendingLogs -= logs
        self.pendingBytes -= size
        self._acked = max(self._acked, head.lastSeq)
        if self._reader is not None and self._reader.segment is head:
            self._closeReader()
        if self._pushback is not None and self._pushback.seq <= head.lastSeq:
            self._pushback = None
        _unlink(head.path)
        if batches:
            log.warn(
                "boundary spool is full ({limit} bytes): dropped the oldest {batches} batches "
                "({logs} logs)",
                limit=self.maxBytes,
                batches=batches,
                logs=logs,
            )
            self.onDrop("spool_full", batches, logs)

    # -- taking and acknowledging -----------------------------------------------------

    def take(self, maxLogs: int, maxBytes: int) -> list[Record]:
        """The oldest records not yet taken, up to the limits (at least one, if any).

        Taken records stay in the spool until :meth:`ack`; after a restart
        they are taken again.
        """
        out: list[Record] = []
        logs = size = 0
        while True:
            record = self._next()
            if record is None:
                break
            if out and (logs + record.logs > maxLogs or size + record.size > maxBytes):
                self._pushback = record
                break
            out.append(record)
            logs += record.logs
            size += record.size
        self._inFlight.extend(out)
        return out

    def available(self) -> Deferred[None]:
        """Fires once there is something to take (at once if there is now)."""
        d: Deferred[None] = Deferred()
        if self._pushback is None:
            self._pushback = self._next()
        if self._pushback is not None:
            d.callback(None)
        else:
            self._available.append(d)
        return d

    def _wakeReaders(self) -> None:
        waiters, self._available = self._available, []
        for d in waiters:
            d.callback(None)

    def _next(self) -> Record | None:
        pushed = self._pushback
        if pushed is not None:
            self._pushback = None
            return pushed
        while True:
            record = self._nextFromDisk()
            if record is None:
                break
            if record.seq > max(self._acked, self._taken):  # else dropped, or already taken
                self._taken = record.seq
                return record
        # Memory holds only what is newer than everything on disk.
        if not self._memory:
            self._diskOK = not self._diskBroken  # the next append tries the disk again
            return None
        record = self._memory.popleft()
        self._memoryBytes -= record.size
        self._taken = record.seq
        return record

    def _nextFromDisk(self) -> Record | None:
        while True:
            reader = self._reader
            if reader is None:
                segment = self._segmentFrom(0)
                if segment is None:
                    return None
                reader = self._openReader(segment)
                if reader is None:
                    continue
            segment = reader.segment
            if segment.writing:
                self._flush()
                if self._reader is not reader:
                    continue  # the flush failed and took the segment away
            record = reader.parser.next(final=False)
            while record is None and reader.position < segment.durable:
                chunk = reader.file.read(min(_READ_CHUNK, segment.durable - reader.position))
                if not chunk:
                    break
                reader.position += len(chunk)
                reader.parser.buf += chunk
                record = reader.parser.next(final=False)
            if record is not None:
                if record.seq <= segment.lastSeq:
                    return record
                continue  # beyond what was written whole (a torn tail): ignore
            if segment.writing:
                return None  # caught up with the writer; keep the place
            reader.parser.next(final=True)
            following = self._segmentFrom(self._segments.index(segment) + 1)
            self._closeReader()
            if following is None:
                return None
            self._openReader(following)

    def _segmentFrom(self, index: int) -> _Segment | None:
        """The first segment from ``index`` on with records not yet taken."""
        done = max(self._acked, self._taken)
        for i in range(index, len(self._segments)):
            if self._segments[i].lastSeq > done:
                return self._segments[i]
        return None

    def _openReader(self, segment: _Segment) -> _Reader | None:
        try:
            f = self._open(segment.path, "rb")
        except OSError as e:
            log.error(
                "boundary spool: cannot read {path} ({error}); its batches are lost",
                path=str(segment.path),
                error=e,
            )
            self._segments.remove(segment)
            batches = segment.records - segment.ackedRecords
            self.pendingRecords -= batches
            self.pendingLogs -= segment.logs - segment.ackedLogs
            self.pendingBytes -= segment.bytes - segment.ackedBytes
            self._acked = max(self._acked, segment.lastSeq)
            self.onDrop("spool_unreadable", batches, segment.logs - segment.ackedLogs)
            return None
        self._reader = _Reader(segment, f, _Parser(segment.path.name), 0)
        return self._reader

    def _closeReader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.file.close()

    def ack(self, records: list[Record]) -> None:
        """``records`` (taken, in order) reached coderd: forget them."""
        done = {record.seq for record in records}
        while self._inFlight and self._inFlight[0].seq in done:
            self._inFlight.popleft()
        for record in records:
            if record.seq in self._orphans:  # its segment is gone, it was not
                self._orphans.discard(record.seq)
                self.pendingRecords -= 1
                self.pendingLogs -= record.logs
                self.pendingBytes -= record.size
                continue
            if record.seq <= self._acked:
                continue  # dropped while it was on its way
            self._acked = record.seq
            self.pendingRecords -= 1
            self.pendingLogs -= record.logs
            self.pendingBytes -= record.size
            for segment in self._segments:
                if segment.firstSeq <= record.seq <= segment.lastSeq:
                    segment.ackedRecords += 1
                    segment.ackedLogs += record.logs
                    segment.ackedBytes += record.size
                    break
        self._deleteAcked()
        if self._commitCall is None and self._acked != self._ackedOnDisk:
            self._commitCall = self.clock.callLater(self.commitInterval, self._commit)

    def _deleteAcked(self) -> None:
        while self._segments and not self._segments[0].writing:
            head = self._segments[0]
            if head.lastSeq > self._acked:
                break
            self._segments.popleft()
            if self._reader is not None and self._reader.segment is head:
                self._closeReader()
            _unlink(head.path)

    # -- durability ---------------------------------------------------------------------

    def _commit(self) -> None:
        self._commitCall = None
        self.commit()

    def commit(self) -> Deferred[None]:
        """Flush now and fsync (in a thread); fires when both are done."""
        if self._commitCall is not None and self._commitCall.active():
            self._commitCall.cancel()
        self._commitCall = None
        self._flush()
        if self._syncing is not None:
            # One fsync at a time; the next covers whatever came meanwhile.
            return self._syncing.addCallback(lambda _: self.commit())
        fd = -1
        if self._writer is not None:
            try:
                fd = os.dup(self._writer.fileno())
            except (OSError, ValueError):
                fd = -1
        acked = self._acked

        def work() -> None:
            try:
                if fd >= 0:
                    os.fsync(fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            if acked != self._ackedOnDisk:
                self._writeAcked(acked)

        def done(result: object) -> None:
            self._syncing = None
            if isinstance(result, Failure):
                log.warn("boundary spool: fsync failed: {error}", error=result.getErrorMessage())

        threads = self.reactor.getThreadPool()
        d: Deferred[None] = deferToThreadPool(self.reactor, threads, work)
        self._syncing = d
        d.addBoth(done)
        return d.addCallback(lambda _: None)

    def _writeAcked(self, acked: int) -> None:
        tmp = self.directory / "acked.tmp"
        with open(tmp, "w") as f:
            f.write(f"{acked}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / "acked")
        self._ackedOnDisk = acked

    def close(self) -> None:
        """Flush, fsync and close, synchronously (at shutdown)."""
        if self._closed:
            return
        self._closed = True
        if self._commitCall is not None and self._commitCall.active():
            self._commitCall.cancel()
        self._commitCall = None
        self._flush()
        self._finishSegment()
        self._closeReader()
        if self._acked != self._ackedOnDisk:
            try:
                self._writeAcked(self._acked)
            except OSError as e:
                log.warn("boundary spool: cannot save progress: {error}", error=e)
        if self._memory:
            log.warn(
                "boundary spool: {n} batches only held in memory (the disk failed) are lost "
                "at shutdown",
                n=len(self._memory),
            )

    def idle(self) -> Deferred[None]:
        """Fires when no fsync is running (for orderly shutdown and tests)."""
        return self._syncing.addCallback(lambda _: None) if self._syncing else succeed(None)


def _sync(f: IO[bytes]) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except (OSError, ValueError) as e:
        if getattr(e, "errno", None) not in (errno.EBADF, errno.EINVAL, None):
            log.warn("boundary spool: fsync failed: {error}", error=e)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("boundary spool: cannot remove {path}: {error}", path=str(path), error=e)


def _segmentOrder(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0
