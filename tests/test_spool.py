# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The boundary spool on a real directory: order, restarts, corruption, bounds, a failing disk."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import IO, Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from coderagent.boundary.spool import HEAD_SIZE, Record, Spool, encodeRecord

KEY = b"session\0claude"


def spool(directory: Path, **kw: Any) -> Spool:
    s = Spool(directory, reactor=reactor, **kw)
    s.open()
    return s


def payloads(records: list[Record]) -> list[bytes]:
    return [r.payload for r in records]


def fill(s: Spool, n: int, start: int = 0, size: int = 100) -> list[bytes]:
    sent = []
    for i in range(start, start + n):
        payload = f"batch {i:06d} ".encode().ljust(size, b".")
        s.append(KEY, payload, logs=10)
        sent.append(payload)
    return sent


def drain(s: Spool) -> list[bytes]:
    out: list[bytes] = []
    while batch := s.take(maxLogs=1000, maxBytes=1 << 20):
        out += payloads(batch)
        s.ack(batch)
    return out


def test_batches_come_out_in_order_with_their_keys_and_counts(tmp_path: Path) -> None:
    s = spool(tmp_path)
    sent = fill(s, 250)
    assert (s.pendingRecords, s.pendingLogs) == (250, 2500)
    first = s.take(maxLogs=1000, maxBytes=1 << 20)
    assert len(first) == 100  # 100 batches of 10 logs: the log limit
    assert all(r.key == KEY and r.logs == 10 for r in first)
    s.ack(first)
    assert payloads(first) + drain(s) == sent
    assert (s.pendingRecords, s.pendingLogs, s.pendingBytes) == (0, 0, 0)
    s.close()


def test_take_respects_the_byte_limit_but_always_gives_one(tmp_path: Path) -> None:
    s = spool(tmp_path)
    fill(s, 3, size=1000)
    assert len(s.take(maxLogs=1000, maxBytes=1500)) == 1
    assert len(s.take(maxLogs=5, maxBytes=1 << 20)) == 1  # one batch of 10 logs > 5
    assert len(s.take(maxLogs=1000, maxBytes=1 << 20)) == 1
    assert s.take(maxLogs=1000, maxBytes=1 << 20) == []
    s.close()


def test_what_was_not_acknowledged_survives_a_restart(tmp_path: Path) -> None:
    s = spool(tmp_path)
    sent = fill(s, 50)
    s.ack(s.take(maxLogs=200, maxBytes=1 << 20))  # the first 20 reached coderd
    taken = s.take(maxLogs=100, maxBytes=1 << 20)  # in flight when we stop
    assert len(taken) == 10
    s.close()
    again = spool(tmp_path)
    assert again.pendingRecords == 30
    assert drain(again) == sent[20:]
    again.close()
    assert drain(spool(tmp_path)) == []


@pytest_twisted.ensureDeferred
async def test_a_commit_is_enough_to_survive_a_kill(tmp_path: Path) -> None:
    s = spool(tmp_path, commitInterval=60)
    sent = fill(s, 10)
    await s.commit()
    # No close(): the process dies here.  A new agent finds all ten.
    assert drain(spool(tmp_path)) == sent


@pytest_twisted.ensureDeferred
async def test_records_are_flushed_within_the_commit_interval(tmp_path: Path) -> None:
    clock = Clock()
    s = spool(tmp_path, commitInterval=0.1, clock=clock)
    sent = fill(s, 5)
    segment = next(tmp_path.glob("*.seg"))
    assert segment.stat().st_size == 0  # still in the buffer
    clock.advance(0.1)
    await s.idle()
    written = sum(len(encodeRecord(Record(0, 10, KEY, p))) for p in sent)
    assert segment.stat().st_size == written
    s.close()


def _segmentBytes(tmp_path: Path) -> bytearray:
    [segment] = list(tmp_path.glob("*.seg"))
    return bytearray(segment.read_bytes())


def test_a_torn_tail_loses_only_the_torn_record(tmp_path: Path) -> None:
    s = spool(tmp_path)
    sent = fill(s, 5)
    s.close()
    [segment] = list(tmp_path.glob("*.seg"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])
    assert drain(spool(tmp_path)) == sent[:4]


def test_garbage_in_the_middle_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    s = spool(tmp_path)
    sent = fill(s, 6)
    s.close()
    [segment] = list(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    size = len(data) // 6
    data[size * 2 + HEAD_SIZE + 3] ^= 0xFF  # a bit flip in the third record's payload
    data[size * 4 : size * 4] = b"\x00garbage\xffCBL"  # junk between the 4th and the 5th
    segment.write_bytes(bytes(data))
    assert drain(spool(tmp_path)) == sent[:2] + sent[3:]


def test_over_the_bound_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    drops: list[tuple[str, int, int]] = []
    s = spool(tmp_path, maxBytes=256 * 1024, onDrop=lambda *d: drops.append(d))
    sent = fill(s, 5000, size=200)  # about 1.1 MiB through a 256 KiB spool
    delivered = drain(s)
    droppedBatches = sum(b for _, b, _ in drops)
    assert {reason for reason, _, _ in drops} == {"spool_full"}
    assert droppedBatches + len(delivered) == 5000
    assert sum(logs for _, _, logs in drops) == droppedBatches * 10
    assert delivered == sent[droppedBatches:]  # the newest, in order
    assert s.pendingBytes == 0
    s.close()


def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    s = spool(tmp_path, maxBytes=1024 * 1024)  # 128 KiB segments
    fill(s, 3000, size=200)
    assert len(list(tmp_path.glob("*.seg"))) > 3
    drain(s)
    assert len(list(tmp_path.glob("*.seg"))) <= 1
    s.close()
    assert (tmp_path / "acked").read_text().strip() == "3000"
    assert tmp_path.stat().st_mode & 0o777 == 0o700


class FillingDisk(io.FileIO):
    """A segment file on a disk with ``room`` bytes left."""

    room = 0

    def write(self, data: Any) -> int:
        if FillingDisk.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        FillingDisk.room -= len(data)
        return super().write(data)


def opener(path: Path, mode: str) -> IO[bytes]:
    raw = FillingDisk(path, mode.replace("b", "")) if "a" in mode else io.FileIO(path, "r")
    return io.BufferedWriter(raw) if "a" in mode else io.BufferedReader(raw)


def test_a_full_disk_keeps_the_batches_in_memory_in_order(tmp_path: Path) -> None:
    FillingDisk.room = 3000
    drops: list[Any] = []
    s = spool(tmp_path, opener=opener, memoryBytes=1 << 20, onDrop=lambda *d: drops.append(d))
    sent = []
    for i in range(40):
        sent += fill(s, 1, start=i)
        if i % 7 == 0:
            s._flush()  # the buffer reaches the disk now and then
    delivered = drain(s)
    assert delivered == sent and drops == []
    # Room again: the disk is used once memory has drained.
    FillingDisk.room = 1 << 20
    more = fill(s, 5, start=100)
    s.close()
    assert drain(spool(tmp_path)) == more


def test_a_full_disk_and_a_full_memory_drop_the_oldest_in_memory(tmp_path: Path) -> None:
    FillingDisk.room = 0
    drops: list[Any] = []
    s = spool(tmp_path, opener=opener, memoryBytes=2000, onDrop=lambda *d: drops.append(d))
    sent = fill(s, 50)
    delivered = drain(s)
    assert delivered == sent[-len(delivered) :] and len(delivered) < 50
    assert sum(b for _, b, _ in drops) == 50 - len(delivered)
    assert {reason for reason, _, _ in drops} == {"spool_unavailable"}


@pytest_twisted.ensureDeferred
async def test_available_fires_on_the_next_append(tmp_path: Path) -> None:
    s = spool(tmp_path)
    waiting = s.available()
    assert not waiting.called
    fill(s, 1)
    await waiting
    assert s.available().called
    s.close()


def test_an_unreadable_acked_file_means_resending_not_losing(tmp_path: Path) -> None:
    s = spool(tmp_path)
    sent = fill(s, 3)
    s.close()
    (tmp_path / "acked").write_text("not a number")
    assert drain(spool(tmp_path)) == sent


def test_a_batch_on_its_way_is_not_counted_as_dropped(tmp_path: Path) -> None:
    drops: list[tuple[str, int, int]] = []
    s = spool(tmp_path, maxBytes=64 * 1024, onDrop=lambda *d: drops.append(d))
    fill(s, 10)
    onItsWay = s.take(maxLogs=30, maxBytes=1 << 20)  # 3 batches, sent but not acknowledged
    sent = fill(s, 2000, start=10)
    dropped = sum(b for _, b, _ in drops)
    s.ack(onItsWay)  # coderd had them after all
    delivered = drain(s)
    assert len(onItsWay) + dropped + len(delivered) == 2010
    assert delivered == sent[-len(delivered) :]
    assert (s.pendingRecords, s.pendingLogs, s.pendingBytes) == (0, 0, 0)
    s.close()
