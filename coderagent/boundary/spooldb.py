"""The spool's file: one SQLite database, touched only by the spool's own thread.

SQLite gives what an audit spool needs without a record format of our own:
a transaction is atomic (a crash leaves the last commit whole, never a torn
record), every blob comes back byte for byte whatever its length, and the
write-ahead log with ``synchronous=FULL`` makes each commit durable with one
``fsync``.  Python's ``sqlite3`` connection refuses use from any thread but
the one that opened it, so the rule "the reactor never waits on the disk" is
enforced, not just followed: every method here runs in the spool's thread.

One table, ``batch(seq, logs, key, payload)``: ``seq`` orders the batches,
``key`` names their boundary session (consecutive batches of one session
travel to coderd together), ``payload`` is what the socket accepted.
A file that SQLite cannot read, or whose integrity check fails, is moved
aside (``spool.db.corrupt-<time>``, the newest three kept) and a fresh one is
started: the agent keeps accepting audit logs, and the old file is there for
whoever wants to look into it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coderagent.files import PRIVATE_FILE_MODE, ensurePrivateDir, openPrivate

FILE_NAME = "spool.db"
#: Format of the table; a file with another ``user_version`` is set aside.
USER_VERSION = 1
#: Corrupt files kept aside (older ones are removed).
KEEP_CORRUPT = 3

Row = tuple[int, int, bytes, bytes]  # seq, logs, key, payload


@dataclass(frozen=True)
class Summary:
    """One stored batch as recovery sees it (its size, not its bytes)."""

    seq: int
    logs: int
    size: int


@dataclass(frozen=True)
class Opened:
    """What opening found: the stored batches, oldest first, and any file set aside."""

    batches: list[Summary]
    setAside: Path | None = None
    setAsideWhy: str = ""
    #: Batches and logs counted in the file set aside (when it could still be read).
    lostBatches: int = 0
    lostLogs: int = 0
    #: Segment files of the spool format before this one, left where they are.
    oldSegments: int = 0


class SpoolDatabase:
    """The SQLite file of the spool.  Not thread-safe: one thread calls every method."""

    def __init__(self, directory: Path, maxBytes: int, overhead: int) -> None:
        """``maxBytes`` bounds the file (twice the spool's bound, so that our own
        accounting, not SQLite, decides what is dropped); ``overhead`` is what a
        row costs beyond its blobs, as the spool counts it."""
        self.directory = directory
        self.path = directory / FILE_NAME
        self.maxBytes = maxBytes
        self.overhead = overhead
        self._db: sqlite3.Connection | None = None

    # -- opening ---------------------------------------------------------------------

    def open(self) -> Opened:
        """Create the directory (0700) and the file (0600), or recover what is there."""
        ensurePrivateDir(self.directory)
        old = sum(1 for _ in self.directory.glob("*.seg"))
        try:
            return Opened(self._connect(), oldSegments=old)
        except sqlite3.DatabaseError as e:
            why = str(e)
        self._close()
        lostBatches, lostLogs = _countWhatCanBeRead(self.path)
        aside = self._setAside()
        return Opened(self._connect(), aside, why, lostBatches, lostLogs, old)

    def _connect(self) -> list[Summary]:
        _createPrivate(self.path)
        db = sqlite3.connect(self.path, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'batch'").fetchone()
        if version != USER_VERSION and tables[0]:
            raise sqlite3.DatabaseError(f"unknown spool format {version}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        db.execute(
            "CREATE TABLE IF NOT EXISTS batch (seq INTEGER PRIMARY KEY, logs INTEGER NOT NULL,"
            " key BLOB NOT NULL, payload BLOB NOT NULL)"
        )
        db.execute(f"PRAGMA user_version={USER_VERSION}")
        pageSize = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={max(64, self.maxBytes // pageSize)}")
        db.execute("PRAGMA journal_size_limit=4194304")
        for name in (FILE_NAME + "-wal", FILE_NAME + "-shm"):
            _chmod(self.directory / name)
        return [
            Summary(seq, logs, size + self.overhead)
            for seq, logs, size in db.execute(
                "SELECT seq, logs, length(key) + length(payload) FROM batch ORDER BY seq"
            )
        ]

    def _setAside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.directory / f"{FILE_NAME}.corrupt-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.directory / f"{FILE_NAME}.corrupt-{stamp}-{n}"
        for suffix in ("-wal", "-shm", ""):
            source = self.directory / (FILE_NAME + suffix)
            if source.exists():
                os.replace(source, Path(str(aside) + suffix))
        kept = sorted(self.directory.glob(f"{FILE_NAME}.corrupt-*[0-9Z]"), key=_mtime)
        for old in kept[:-KEEP_CORRUPT]:
            for suffix in ("", "-wal", "-shm"):
                Path(str(old) + suffix).unlink(missing_ok=True)
        return aside

    # -- work ----------------------------------------------------------------------------

    def write(self, rows: Sequence[Row], deleteThrough: int) -> None:
        """In one transaction: forget every batch up to ``deleteThrough``, store ``rows``."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            if deleteThrough:
                db.execute("DELETE FROM batch WHERE seq <= ?", (deleteThrough,))
            if rows:
                db.executemany("INSERT OR REPLACE INTO batch VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def read(self, after: int, through: int, limit: int) -> list[Row]:
        """Up to ``limit`` stored batches with ``after < seq <= through``, oldest first."""
        cursor = self._connection().execute(
            "SELECT seq, logs, key, payload FROM batch WHERE seq > ? AND seq <= ?"
            " ORDER BY seq LIMIT ?",
            (after, through, limit),
        )
        return list(cursor)

    def close(self) -> None:
        self._close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the spool database is closed")
        return self._db

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


def _createPrivate(path: Path) -> None:
    """Create ``path`` 0600 (whatever the umask) before SQLite opens it; SQLite
    gives its ``-wal`` and ``-shm`` files the database file's mode."""
    os.close(openPrivate(path, os.O_RDWR))


def _chmod(path: Path) -> None:
    try:
        os.chmod(path, PRIVATE_FILE_MODE)
    except FileNotFoundError:
        pass


def _countWhatCanBeRead(path: Path) -> tuple[int, int]:
    """Batches and logs in a damaged file, as far as SQLite can still count them."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, 0
    try:
        batches, logs = db.execute("SELECT count(*), coalesce(sum(logs), 0) FROM batch").fetchone()
        return int(batches), int(logs)
    except sqlite3.Error:
        return 0, 0
    finally:
        db.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
