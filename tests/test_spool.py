# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The boundary spool on a real directory and a real SQLite file, with its real thread:
order, restarts, what needs no disk, bounds, a failing disk, a corrupt file, modes."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from coderagent.boundary.spool import Record, Spool, sessionKey

KEY = sessionKey("session", "claude")
Drops = list[tuple[str, int, int]]


async def spool(directory: Path, **kw: Any) -> Spool:
    s = Spool(directory, reactor=reactor, **kw)
    await s.open()
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


async def drain(s: Spool) -> list[bytes]:
    out: list[bytes] = []
    while batch := await s.take(maxLogs=1000, maxBytes=1 << 20):
        out += payloads(batch)
        s.ack(batch)
    return out


def rows(directory: Path) -> list[int]:
    """The batches in the file, as another process would read them."""
    db = sqlite3.connect(f"file:{directory / 'spool.db'}?mode=ro", uri=True)
    try:
        return [seq for (seq,) in db.execute("SELECT seq FROM batch ORDER BY seq")]
    finally:
        db.close()


def kill(s: Spool) -> None:
    """What a SIGKILL leaves: the thread gone, nothing written, nothing closed."""
    s._pool.stop()


@pytest_twisted.ensureDeferred
async def test_batches_come_out_in_order_with_their_keys_and_counts(tmp_path: Path) -> None:
    s = await spool(tmp_path)
    sent = fill(s, 250)
    assert (s.pendingRecords, s.pendingLogs) == (250, 2500)
    first = await s.take(maxLogs=1000, maxBytes=1 << 20)
    assert len(first) == 100  # 100 batches of 10 logs: the log limit
    assert all(r.key == KEY and r.logs == 10 for r in first)
    s.ack(first)
    assert payloads(first) + await drain(s) == sent
    assert (s.pendingRecords, s.pendingLogs, s.pendingBytes) == (0, 0, 0)
    await s.close()


@pytest_twisted.ensureDeferred
async def test_take_respects_the_byte_limit_but_always_gives_one(tmp_path: Path) -> None:
    s = await spool(tmp_path)
    fill(s, 3, size=1000)
    assert len(await s.take(maxLogs=1000, maxBytes=1500)) == 1
    assert len(await s.take(maxLogs=5, maxBytes=1 << 20)) == 1  # one batch of 10 logs > 5
    assert len(await s.take(maxLogs=1000, maxBytes=1 << 20)) == 1
    assert await s.take(maxLogs=1000, maxBytes=1 << 20) == []
    await s.close()


@pytest_twisted.ensureDeferred
async def test_what_was_not_acknowledged_survives_a_restart(tmp_path: Path) -> None:
    s = await spool(tmp_path)
    sent = fill(s, 50)
    s.ack(await s.take(maxLogs=200, maxBytes=1 << 20))  # the first 20 reached coderd
    taken = await s.take(maxLogs=100, maxBytes=1 << 20)  # in flight when we stop
    assert len(taken) == 10
    await s.close()
    again = await spool(tmp_path)
    assert again.pendingRecords == 30
    assert await drain(again) == sent[20:]
    await again.close()
    last = await spool(tmp_path)
    assert await drain(last) == []
    await last.close()


@pytest_twisted.ensureDeferred
async def test_a_commit_is_enough_to_survive_a_kill(tmp_path: Path) -> None:
    s = await spool(tmp_path, commitInterval=60)
    sent = fill(s, 10)
    taken = await s.take(maxLogs=30, maxBytes=1 << 20)  # on its way: still to be kept
    assert len(taken) == 3
    await s.commit()
    kill(s)
    again = await spool(tmp_path)
    assert await drain(again) == sent
    await again.close()


@pytest_twisted.ensureDeferred
async def test_batches_reach_the_file_within_the_commit_interval(tmp_path: Path) -> None:
    clock = Clock()
    s = await spool(tmp_path, commitInterval=0.1, clock=clock)
    fill(s, 5)
    assert rows(tmp_path) == []  # still in memory
    clock.advance(0.1)
    await s.idle()
    assert rows(tmp_path) == [1, 2, 3, 4, 5]
    s.ack(await s.take(maxLogs=20, maxBytes=1 << 20))  # two reached coderd
    clock.advance(0.1)
    await s.idle()
    assert rows(tmp_path) == [3, 4, 5]  # forgotten in the same kind of transaction
    await s.close()


@pytest_twisted.ensureDeferred
async def test_what_coderd_acknowledges_in_time_never_touches_the_disk(tmp_path: Path) -> None:
    clock = Clock()
    s = await spool(tmp_path, commitInterval=0.1, clock=clock)
    wal = tmp_path / "spool.db-wal"
    before = wal.stat().st_size
    for _ in range(20):
        fill(s, 50)
        s.ack(await s.take(maxLogs=1000, maxBytes=1 << 20))
        clock.advance(0.1)
        await s.idle()
    assert s.pendingRecords == 0
    assert wal.stat().st_size == before and rows(tmp_path) == []
    await s.close()


@pytest_twisted.ensureDeferred
async def test_over_the_bound_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    drops: Drops = []
    s = await spool(tmp_path, maxBytes=256 * 1024, onDrop=lambda *d: drops.append(d))
    sent = fill(s, 5000, size=200)  # about 1.1 MiB through a 256 KiB spool
    assert s.pendingBytes <= 256 * 1024
    delivered = await drain(s)
    droppedBatches = sum(b for _, b, _ in drops)
    assert {reason for reason, _, _ in drops} == {"spool_full"}
    assert droppedBatches + len(delivered) == 5000
    assert sum(logs for _, _, logs in drops) == droppedBatches * 10
    assert delivered == sent[droppedBatches:]  # the newest, in order
    assert s.pendingBytes == 0
    await s.close()


@pytest_twisted.ensureDeferred
async def test_the_file_stays_bounded_while_coderd_is_away(tmp_path: Path) -> None:
    s = await spool(tmp_path, maxBytes=1 << 20, memoryBytes=64 * 1024)
    for burst in range(40):  # 40 x 400 KiB written while nothing is acknowledged
        fill(s, 2000, start=burst * 2000, size=200)
        await s.commit()
    size = sum(p.stat().st_size for p in tmp_path.glob("spool.db*"))
    assert size <= 2 * (1 << 20) + (4 << 20)  # twice the bound, plus a WAL of at most 4 MiB
    await s.close()


@pytest_twisted.ensureDeferred
async def test_batches_that_left_memory_are_read_back_from_the_file_in_order(
    tmp_path: Path,
) -> None:
    s = await spool(tmp_path, memoryBytes=20_000)
    sent = []
    for burst in range(25):
        sent += fill(s, 40, start=burst * 40, size=300)
        await s.commit()  # on disk: memory keeps only ~20 KB of them
    assert s._inMemory <= 20_000
    assert await drain(s) == sent
    await s.close()


@pytest_twisted.ensureDeferred
async def test_acknowledged_batches_leave_the_file_and_modes_are_private(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        s = await spool(tmp_path / "spool", maxBytes=1024 * 1024)
        fill(s, 3000, size=200)
        await s.commit()
        assert len(rows(tmp_path / "spool")) == 3000
        await drain(s)
        await s.close()
    finally:
        os.umask(old)
    assert rows(tmp_path / "spool") == []
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    for f in (tmp_path / "spool").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


async def failingDisk(s: Spool, failing: bool) -> None:
    """Make the file full (SQLite's own "database or disk is full"), or not."""
    db = s._db
    assert db is not None

    def pages() -> None:
        connection = db._connection()
        if failing:
            used = connection.execute("PRAGMA page_count").fetchone()[0]
            connection.execute(f"PRAGMA max_page_count={used}")
        else:
            connection.execute("PRAGMA max_page_count=1000000")

    await s._inThread(pages)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_keeps_the_batches_in_memory_in_order(tmp_path: Path) -> None:
    drops: Drops = []
    s = await spool(tmp_path, memoryBytes=1 << 20, onDrop=lambda *d: drops.append(d))
    sent = fill(s, 10, size=5000)
    await s.commit()
    await failingDisk(s, True)
    sent += fill(s, 40, start=10, size=5000)
    await s.commit()  # fails: the 40 wait in memory
    assert rows(tmp_path) == list(range(1, 11))
    await failingDisk(s, False)
    await s.commit()  # the disk works again: all of it is written
    assert rows(tmp_path) == list(range(1, 51))
    kill(s)
    again = await spool(tmp_path)
    assert await drain(again) == sent and drops == []
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_full_disk_and_a_full_memory_drop_the_oldest_in_memory(tmp_path: Path) -> None:
    drops: Drops = []
    s = await spool(tmp_path, memoryBytes=20_000, onDrop=lambda *d: drops.append(d))
    await failingDisk(s, True)
    sent = []
    for i in range(50):
        sent += fill(s, 1, start=i, size=1000)
        await s.commit()
    delivered = await drain(s)
    # What fitted in the file before it filled, then the newest that memory held.
    assert delivered == [p for p in sent if p in set(delivered)] and delivered[-1] == sent[-1]
    assert 10 < len(delivered) < 40
    assert sum(b for _, b, _ in drops) == 50 - len(delivered)
    assert {reason for reason, _, _ in drops} == {"buffer_full"}
    await s.close()


@pytest_twisted.ensureDeferred
async def test_an_unusable_directory_means_memory_only_not_no_proxy(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    drops: Drops = []
    s = await spool(blocker / "spool", memoryBytes=5000, onDrop=lambda *d: drops.append(d))
    sent = fill(s, 20, size=1000)
    delivered = await drain(s)
    assert delivered == sent[-len(delivered) :] and len(delivered) < 20
    assert {reason for reason, _, _ in drops} == {"buffer_full"}
    await s.close()


@pytest.mark.parametrize("damage", ["garbage", "torn page"])
@pytest_twisted.ensureDeferred
async def test_a_corrupt_file_is_set_aside_and_a_fresh_spool_started(
    tmp_path: Path, damage: str
) -> None:
    s = await spool(tmp_path)
    fill(s, 200, size=300)
    await s.close()
    path = tmp_path / "spool.db"
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data[:100] = b"\xde\xad" * 50  # the header: not a database any more
    else:
        data[len(data) // 2 : len(data) // 2 + 4096] = b"\x00" * 4096  # a page wiped
    path.write_bytes(bytes(data))
    drops: Drops = []
    again = await spool(tmp_path, onDrop=lambda *d: drops.append(d))
    aside = [p for p in tmp_path.glob("spool.db.corrupt-*") if p.name[-4:] not in ("-wal", "-shm")]
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(data)
    assert again.pendingRecords == 0
    assert [reason for reason, _, _ in drops] == ["spool_unreadable"]
    fresh = fill(again, 3)
    await again.commit()
    kill(again)
    last = await spool(tmp_path)
    assert await drain(last) == fresh
    await last.close()


@pytest_twisted.ensureDeferred
async def test_available_fires_on_the_next_append(tmp_path: Path) -> None:
    s = await spool(tmp_path)
    waiting = s.available()
    assert not waiting.called
    fill(s, 1)
    await waiting
    assert s.available().called
    await s.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_on_its_way_is_not_counted_as_dropped(tmp_path: Path) -> None:
    drops: Drops = []
    s = await spool(tmp_path, maxBytes=64 * 1024, onDrop=lambda *d: drops.append(d))
    fill(s, 10)
    onItsWay = await s.take(maxLogs=30, maxBytes=1 << 20)  # sent, not acknowledged
    sent = fill(s, 2000, start=10)
    dropped = sum(b for _, b, _ in drops)
    s.ack(onItsWay)  # coderd had them after all
    delivered = await drain(s)
    assert len(onItsWay) + dropped + len(delivered) == 2010
    assert delivered == sent[-len(delivered) :]
    assert (s.pendingRecords, s.pendingLogs, s.pendingBytes) == (0, 0, 0)
    await s.close()


@pytest_twisted.ensureDeferred
async def test_closing_during_a_commit_waits_for_it_and_loses_nothing(tmp_path: Path) -> None:
    s = await spool(tmp_path)
    sent = fill(s, 500, size=2000)
    writing = s.commit()  # in the spool's thread now
    more = fill(s, 10, start=500)
    closing = s.close()
    assert not writing.called or not closing.called
    await closing
    assert writing.called
    with pytest.raises(RuntimeError):
        fill(s, 1, start=1000)
    again = await spool(tmp_path)
    assert await drain(again) == sent + more
    await again.close()


# -- the reactor never waits on the disk ------------------------------------------------

#: (event, path or argument, thread) of file-system events seen while watching.
_events: list[tuple[str, str, str]] = []
_watching = threading.Event()
_WATCHED = {
    "open",
    "os.rename",
    "os.replace",
    "os.remove",
    "os.unlink",
    "os.truncate",
    "os.mkdir",
    "os.chmod",
    "sqlite3.connect",
    "sqlite3.connect/handle",
}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching.is_set() and event in _WATCHED:
        _events.append((event, str(args[0]) if args else "", threading.current_thread().name))


sys.addaudithook(_audit)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[list[tuple[str, str, str]]]:
    """File-system events under ``tmp_path``, with the thread that caused each."""
    _events.clear()
    _watching.set()
    try:
        yield _events
    finally:
        _watching.clear()


@pytest_twisted.ensureDeferred
async def test_no_file_is_opened_written_or_renamed_on_the_reactor_thread(
    tmp_path: Path, watched: list[tuple[str, str, str]]
) -> None:
    clock = Clock()
    s = await spool(tmp_path / "spool", maxBytes=256 * 1024, memoryBytes=8192, clock=clock)
    for burst in range(20):  # group commits, evictions, reads back, drops, acks
        fill(s, 100, start=burst * 100, size=200)
        clock.advance(0.05)
        await s.idle()
        s.ack(await s.take(maxLogs=50, maxBytes=1 << 20))
    await s.close()
    _watching.clear()  # the test's own write is not the spool's
    (tmp_path / "spool" / "spool.db").write_bytes(b"garbage" * 1000)  # set aside next time
    _watching.set()
    again = await spool(tmp_path / "spool")
    fill(again, 5)
    await again.commit()
    await again.close()
    mine = [e for e in watched if str(tmp_path) in e[1] or e[0].startswith("sqlite3")]
    assert any(e[0] == "sqlite3.connect" for e in mine)
    assert any(e[0] == "os.rename" for e in mine)  # the corrupt file was set aside
    onReactor = [e for e in mine if e[2] == threading.main_thread().name]
    assert onReactor == []
