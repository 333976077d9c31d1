"""AgentSFTPServer driven through the real SFTP wire protocol.

A Conch ``FileTransferServer`` wrapping our server and a Conch
``FileTransferClient`` are joined back to back in memory (``iosim``), over a
real temporary directory.  The thread runner is synchronous, so every reply
is there after one ``pump.flush()``: no reactor, no threads, no sleeping.

Every test also checks, through a proxy standing in for the ``os``, ``pwd``
and ``grp`` modules inside every module of ``coderagent.ssh.sftp``, that no
blocking call was made outside ``runInThread``, and that nothing was logged as an error (Conch
logs unexpected exceptions at critical level).

The last test talks to the real OpenSSH ``sftp`` client through ``sftp -D``.
"""

from __future__ import annotations

import errno
import functools
import gc
import grp
import importlib
import os
import pkgutil
import pwd
import random
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.conch.ssh import filetransfer as ft
from twisted.conch.ssh.common import NS
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface.verify import verifyObject

from coderagent.ssh import sftp
from coderagent.ssh.sftp import AgentSFTPServer
from coderagent.ssh.sftp.errors import fromOSError, sftpError

ROOT = Path(__file__).resolve().parents[1]
PURE = {"fsencode", "fsdecode", "strerror", "join", "fspath"}
MiB = 1024 * 1024


# -- instrumentation ------------------------------------------------------


class CallLog:
    """What the server did: runner calls, and every os/pwd/grp call made."""

    def __init__(self) -> None:
        self.depth = 0
        self.runnerCalls = 0
        self.calls: list[str] = []
        self.outside: list[str] = []

    def names(self) -> list[str]:
        return list(self.calls)


class Guard:
    """Stands in for a module; records calls and whether a runner was active."""

    def __init__(self, module: types.ModuleType, log: CallLog) -> None:
        self._module = module
        self._log = log

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        if isinstance(value, types.ModuleType):
            return Guard(value, self._log)
        if not callable(value) or isinstance(value, type) or name in PURE:
            return value
        log = self._log

        @functools.wraps(value)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            log.calls.append(name)
            if log.depth == 0:
                log.outside.append(name)
            return value(*args, **kwargs)

        return wrapper


class SyncRunner:
    """runInThread that runs at once, marking the call as "in the thread"."""

    def __init__(self, log: CallLog) -> None:
        self.log = log

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.log.runnerCalls += 1
        self.log.depth += 1
        try:
            return defer.maybeDeferred(f, *args, **kwargs)
        finally:
            self.log.depth -= 1


class QueueRunner(SyncRunner):
    """runInThread whose work only happens when the test says so."""

    def __init__(self, log: CallLog) -> None:
        super().__init__(log)
        self.queue: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((d, f, args))
        return d

    def runOne(self) -> None:
        d, f, args = self.queue.pop(0)
        super().__call__(f, *args).chainDeferred(d)


class Client(ft.FileTransferClient):
    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        self.serverVersion = serverVersion
        self.serverExtensions = extData


class Session:
    """One SFTP conversation over an in-memory connection."""

    def __init__(self, home: Path, runner: SyncRunner) -> None:
        self.home = home
        self.runner = runner
        self.server = AgentSFTPServer(str(home), runner)
        self.serverProto = ft.FileTransferServer(avatar=self.server)
        self.client = Client()
        self.pump = iosim.connect(
            self.serverProto,
            iosim.makeFakeServer(self.serverProto),
            self.client,
            iosim.makeFakeClient(self.client),
        )

    def result(self, d: Deferred[Any]) -> Any:
        """Deliver everything, then return what ``d`` fired with (or raise)."""
        self.pump.flush()
        box: list[Any] = []
        d.addBoth(box.append)
        assert box, "the request was not answered"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def error(self, d: Deferred[Any]) -> BaseException:
        with pytest.raises(Exception) as info:
            self.result(d)
        return info.value

    def status(self, d: Deferred[Any]) -> tuple[int, str]:
        e = self.error(d)
        assert isinstance(e, ft.SFTPError), repr(e)
        return e.code, e.message

    def open(self, path: bytes, flags: int, attrs: dict[str, int] | None = None) -> Any:
        return self.result(self.client.openFile(path, flags, attrs or {}))

    def listdir(self, path: bytes) -> list[tuple[bytes, bytes, dict[str, int]]]:
        directory = self.result(self.client.openDirectory(path))
        entries: list[tuple[bytes, bytes, dict[str, int]]] = []
        while True:
            try:
                entries.extend(self.result(directory.read()))
            except EOFError:
                break
        self.result(directory.close())
        return entries

    def fsetstat(self, f: Any, attrs: dict[str, int]) -> Any:
        # ClientFile.setAttrs sends FXP_FSTAT (a Conch client bug), so build
        # the FSETSTAT request by hand.
        data = f.handle + self.client._packAttributes(attrs)
        return self.result(self.client._sendRequest(ft.FXP_FSETSTAT, data))


@pytest.fixture
def umask() -> Iterator[int]:
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[CallLog]:
    log = CallLog()
    for info in pkgutil.iter_modules(sftp.__path__):
        inside = importlib.import_module(f"{sftp.__name__}.{info.name}")
        for name, module in (("os", os), ("pwd", pwd), ("grp", grp)):
            if getattr(inside, name, None) is module:
                monkeypatch.setattr(inside, name, Guard(module, log))
    yield log
    assert log.outside == [], f"blocking calls outside runInThread: {log.outside}"


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    gc.collect()  # surface "Unhandled error in Deferred" here, not later
    globalLogPublisher.removeObserver(observe)
    assert seen == []


@pytest.fixture
def home(tmp_path: Path) -> Path:
    # realpath so that answers compare equal even if the tmp dir is symlinked
    return Path(os.path.realpath(tmp_path))


@pytest.fixture
def s(home: Path, calls: CallLog, errors: list[Any], umask: int) -> Session:
    return Session(home, SyncRunner(calls))


def fdCount() -> int:
    return len(os.listdir("/proc/self/fd"))


RW_CREAT = ft.FXF_READ | ft.FXF_WRITE | ft.FXF_CREAT


# -- handshake and interfaces ----------------------------------------------


def test_version_advertises_exactly_the_implemented_extensions(s: Session) -> None:
    assert s.client.serverVersion == 3
    assert s.client.serverExtensions == {
        b"posix-rename@openssh.com": b"1",
        b"statvfs@openssh.com": b"2",
        b"fstatvfs@openssh.com": b"2",
        b"hardlink@openssh.com": b"1",
        b"fsync@openssh.com": b"1",
    }


def test_provides_the_conch_interfaces(s: Session, home: Path) -> None:
    assert verifyObject(ISFTPServer, s.server)
    assert ISFTPServer(s.server) is s.server
    assert s.server.avatar is None
    f = s.result(s.server.openFile(b"x", RW_CREAT, {}))
    assert verifyObject(ISFTPFile, f)
    s.result(f.close())


def test_unknown_extension_is_unsupported(s: Session) -> None:
    e = s.error(s.client.extendedRequest(b"copy-data", b""))
    assert isinstance(e, NotImplementedError)


def test_malformed_extension_is_bad_message(s: Session) -> None:
    assert s.status(s.client.extendedRequest(b"posix-rename@openssh.com", NS(b"a"))) == (
        ft.FX_BAD_MESSAGE,
        "malformed extended request",
    )
    trailing = NS(b"a") + NS(b"b") + b"x"
    code, _ = s.status(s.client.extendedRequest(b"hardlink@openssh.com", trailing))
    assert code == ft.FX_BAD_MESSAGE


# -- files -----------------------------------------------------------------


def test_three_mib_round_trip_at_many_offsets(s: Session, home: Path) -> None:
    rng = random.Random(20240521)
    data = rng.randbytes(3 * MiB)
    f = s.open(b"big.bin", RW_CREAT | ft.FXF_TRUNC)

    # Random chunk sizes, written in shuffled order and all pipelined, as
    # OpenSSH's client does (it keeps up to 64 requests in flight).
    chunks = []
    offset = 0
    while offset < len(data):
        size = rng.randint(1, 70000)
        chunks.append((offset, data[offset : offset + size]))
        offset += size
    rng.shuffle(chunks)
    writes = [f.writeChunk(o, c) for o, c in chunks]
    for w in writes:
        s.result(w)
    assert (home / "big.bin").read_bytes() == data
    assert s.result(f.getAttrs())["size"] == 3 * MiB

    # Random reads, also pipelined, including some that straddle EOF.
    spans = [(rng.randrange(len(data)), rng.randint(1, 100000)) for _ in range(300)]
    reads = [(o, n, f.readChunk(o, n)) for o, n in spans]
    for o, n, d in reads:
        assert s.result(d) == data[o : o + n]

    # A sequential read ends with FX_EOF exactly at the end.
    got = bytearray()
    while True:
        try:
            got += s.result(f.readChunk(len(got), 32768))
        except EOFError:
            break
    assert bytes(got) == data
    assert isinstance(s.error(f.readChunk(len(data) + 10, 10)), EOFError)
    s.result(f.close())


def test_read_length_is_capped(s: Session, home: Path) -> None:
    (home / "f").write_bytes(b"z" * (2 * MiB))
    f = s.open(b"f", ft.FXF_READ)
    assert len(s.result(f.readChunk(5, 4 * MiB))) == 256 * 1024 - 1024
    s.result(f.close())


def test_open_missing_file_is_no_such_file(s: Session) -> None:
    assert s.status(s.client.openFile(b"nope", ft.FXF_READ, {})) == (
        ft.FX_NO_SUCH_FILE,
        "No such file or directory",
    )


def test_open_under_a_file_is_no_such_file_like_openssh(s: Session, home: Path) -> None:
    (home / "plain").write_bytes(b"")
    code, message = s.status(s.client.openFile(b"plain/x", ft.FXF_READ, {}))
    assert (code, message) == (ft.FX_NO_SUCH_FILE, "Not a directory")


def test_create_exclusive_on_existing_file(s: Session, home: Path) -> None:
    (home / "there").write_bytes(b"keep")
    flags = ft.FXF_WRITE | ft.FXF_CREAT | ft.FXF_EXCL
    assert s.status(s.client.openFile(b"there", flags, {})) == (
        ft.FX_FAILURE,
        "File exists",
    )
    assert (home / "there").read_bytes() == b"keep"


def test_create_mode_from_attrs_or_0666_minus_umask(s: Session, home: Path) -> None:
    s.result(s.open(b"default", ft.FXF_WRITE | ft.FXF_CREAT).close())
    s.result(s.open(b"private", ft.FXF_WRITE | ft.FXF_CREAT, {"permissions": 0o100600}).close())
    assert stat.S_IMODE((home / "default").stat().st_mode) == 0o644
    assert stat.S_IMODE((home / "private").stat().st_mode) == 0o600


def test_trunc_and_append(s: Session, home: Path) -> None:
    (home / "t").write_bytes(b"0123456789")
    s.result(s.open(b"t", ft.FXF_WRITE | ft.FXF_TRUNC).close())
    assert (home / "t").read_bytes() == b""

    (home / "a").write_bytes(b"head")
    f = s.open(b"a", ft.FXF_WRITE | ft.FXF_APPEND)
    s.result(f.writeChunk(0, b"tail"))
    s.result(f.close())
    assert (home / "a").read_bytes() == b"headtail"


def test_write_on_read_only_handle_fails_cleanly(s: Session, home: Path) -> None:
    (home / "ro").write_bytes(b"x")
    f = s.open(b"ro", ft.FXF_READ)
    assert s.status(f.writeChunk(0, b"y")) == (ft.FX_FAILURE, "Bad file descriptor")
    s.result(f.close())
    assert (home / "ro").read_bytes() == b"x"


def test_reading_a_directory_handle_fails_cleanly(s: Session, home: Path) -> None:
    (home / "dir").mkdir()
    f = s.open(b"dir", ft.FXF_READ)
    assert s.status(f.readChunk(0, 10)) == (ft.FX_FAILURE, "Is a directory")
    s.result(f.close())


def test_absolute_paths_are_not_jailed(s: Session, home: Path, tmp_path_factory: Any) -> None:
    elsewhere = Path(os.path.realpath(tmp_path_factory.mktemp("elsewhere"))) / "abs.txt"
    f = s.open(os.fsencode(elsewhere), ft.FXF_WRITE | ft.FXF_CREAT)
    s.result(f.writeChunk(0, b"outside home"))
    s.result(f.close())
    assert elsewhere.read_bytes() == b"outside home"


def test_handles_are_distinct_serials(s: Session) -> None:
    a = s.open(b"a", RW_CREAT)
    b = s.open(b"b", RW_CREAT)
    assert a.handle != b.handle
    assert all(h[4:].isdigit() for h in (a.handle, b.handle))
    s.result(a.close())
    s.result(b.close())


def test_fstat_and_fsetstat(s: Session, home: Path) -> None:
    (home / "f").write_bytes(b"0123456789")
    f = s.open(b"f", ft.FXF_READ | ft.FXF_WRITE)
    s.fsetstat(f, {"size": 4, "permissions": 0o600, "atime": 1000000000, "mtime": 1234567890})
    attrs = s.result(f.getAttrs())
    st = os.stat(home / "f")
    assert attrs == {
        "size": 4,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "permissions": stat.S_IFREG | 0o600,
        "atime": 1000000000,
        "mtime": 1234567890,
    }
    s.result(f.close())
    assert (home / "f").read_bytes() == b"0123"


def test_fsync_extension(s: Session, home: Path, calls: CallLog) -> None:
    f = s.open(b"f", RW_CREAT)
    s.result(f.writeChunk(0, b"durable"))
    calls.calls.clear()
    assert s.result(s.client.extendedRequest(b"fsync@openssh.com", f.handle)) == (
        b"fsync succeeded",
        b"",
    )
    assert calls.names() == ["fsync"]
    s.result(f.close())
    # A closed (or never issued) handle is refused, not crashed on.
    assert s.status(s.client.extendedRequest(b"fsync@openssh.com", f.handle)) == (
        ft.FX_FAILURE,
        "invalid handle",
    )


def test_fstatvfs_extension(s: Session, home: Path) -> None:
    f = s.open(b"f", RW_CREAT)
    reply = s.result(s.client.extendedRequest(b"fstatvfs@openssh.com", f.handle))
    fields = struct.unpack("!11Q", reply)
    expected = os.statvfs(home)
    assert fields[0:3] == (expected.f_bsize, expected.f_frsize, expected.f_blocks)
    assert fields[8] == expected.f_fsid
    assert fields[10] == expected.f_namemax
    s.result(f.close())


# -- paths -----------------------------------------------------------------


def test_statvfs_extension(s: Session, home: Path) -> None:
    reply = s.result(s.client.extendedRequest(b"statvfs@openssh.com", NS(b".")))
    assert len(reply) == 88
    fields = struct.unpack("!11Q", reply)
    expected = os.statvfs(home)
    assert fields[0:3] == (expected.f_bsize, expected.f_frsize, expected.f_blocks)
    assert fields[8] == expected.f_fsid
    flag = (1 if expected.f_flag & os.ST_RDONLY else 0) | (
        2 if expected.f_flag & os.ST_NOSUID else 0
    )
    assert fields[9] == flag
    assert fields[10] == expected.f_namemax
    code, _ = s.status(s.client.extendedRequest(b"statvfs@openssh.com", NS(b"missing")))
    assert code == ft.FX_NO_SUCH_FILE


def test_listing_contents_attrs_and_longnames(s: Session, home: Path) -> None:
    (home / "old.txt").write_bytes(b"hello")
    old = time.mktime((2001, 2, 3, 4, 5, 6, 0, 0, -1))
    os.utime(home / "old.txt", (old, old))
    (home / "new.txt").write_bytes(b"x" * 123456)
    recent = int(time.time()) - 3600
    os.utime(home / "new.txt", (recent, recent))
    (home / "sub").mkdir()
    os.symlink("old.txt", home / "link")
    os.chmod(home / "old.txt", 0o640)

    entries = s.listdir(b".")
    names = [e[0] for e in entries]
    assert names[:2] == [b".", b".."]
    assert sorted(names) == sorted([b".", b"..", b"old.txt", b"new.txt", b"sub", b"link"])

    st = os.lstat(home / "old.txt")
    user = pwd.getpwuid(st.st_uid).pw_name
    group = grp.getgrgid(st.st_gid).gr_name
    byName = {name: (longname, attrs) for name, longname, attrs in entries}
    owner = f"{user:<8} {group:<8}".encode()
    assert byName[b"old.txt"][0] == b"-rw-r-----    1 " + owner + b"        5 Feb  3  2001 old.txt"
    stamp = time.strftime("%b %e %H:%M", time.localtime(recent)).encode()
    assert (
        byName[b"new.txt"][0] == b"-rw-r--r--    1 " + owner + b"   123456 " + stamp + b" new.txt"
    )
    assert byName[b"link"][0].startswith(b"lrwxrwxrwx    1 " + owner + b"        7 ")
    assert byName[b"sub"][0].startswith(b"drwxr-xr-x    2 ")
    assert byName[b"old.txt"][1] == {
        "size": 5,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "permissions": stat.S_IFREG | 0o640,
        "atime": int(old),
        "mtime": int(old),
    }
    # Entries are lstat'ed, like OpenSSH: the link is a link.
    assert stat.S_ISLNK(byName[b"link"][1]["permissions"])


def test_listing_of_many_entries_spans_several_readdirs(s: Session, home: Path) -> None:
    for i in range(600):
        (home / f"f{i:03d}").write_bytes(b"")
    directory = s.result(s.client.openDirectory(b"."))
    batches = []
    while True:
        try:
            batches.append(s.result(directory.read()))
        except EOFError:
            break
    s.result(directory.close())
    assert [len(b) for b in batches] == [250, 250, 102]
    names = {e[0] for b in batches for e in b}
    assert names == {b".", b".."} | {f"f{i:03d}".encode() for i in range(600)}


def test_listing_keeps_non_utf8_names(s: Session, home: Path) -> None:
    raw = os.fsencode(home) + b"/caf\xe9"
    with open(raw, "wb") as fh:
        fh.write(b"latin-1 name")
    assert b"caf\xe9" in [e[0] for e in s.listdir(b".")]
    f = s.open(b"caf\xe9", ft.FXF_READ)
    assert s.result(f.readChunk(0, 100)) == b"latin-1 name"
    s.result(f.close())


def test_opendir_errors(s: Session, home: Path) -> None:
    (home / "file").write_bytes(b"")
    assert s.status(s.client.openDirectory(b"missing"))[0] == ft.FX_NO_SUCH_FILE
    assert s.status(s.client.openDirectory(b"file")) == (ft.FX_NO_SUCH_FILE, "Not a directory")


def test_mkdir_and_rmdir(s: Session, home: Path) -> None:
    s.result(s.client.makeDirectory(b"plain", {}))
    s.result(s.client.makeDirectory(b"private", {"permissions": 0o700}))
    assert stat.S_IMODE((home / "plain").stat().st_mode) == 0o755
    assert stat.S_IMODE((home / "private").stat().st_mode) == 0o700
    assert s.status(s.client.makeDirectory(b"plain", {}))[0] == ft.FX_FAILURE

    (home / "plain" / "child").write_bytes(b"")
    # ENOTEMPTY: a plain failure with the system's words, not a critical log
    # (the ``errors`` fixture fails the test on any error-level event).
    assert s.status(s.client.removeDirectory(b"plain")) == (
        ft.FX_FAILURE,
        "Directory not empty",
    )
    assert (home / "plain" / "child").exists()
    s.result(s.client.removeDirectory(b"private"))
    assert not (home / "private").exists()
    assert s.status(s.client.removeDirectory(b"private"))[0] == ft.FX_NO_SUCH_FILE


def test_remove(s: Session, home: Path) -> None:
    (home / "f").write_bytes(b"")
    (home / "d").mkdir()
    s.result(s.client.removeFile(b"f"))
    assert not (home / "f").exists()
    assert s.status(s.client.removeFile(b"f"))[0] == ft.FX_NO_SUCH_FILE
    assert s.status(s.client.removeFile(b"d")) == (ft.FX_FAILURE, "Is a directory")
    assert (home / "d").is_dir()


def test_rename_refuses_to_replace(s: Session, home: Path) -> None:
    (home / "a").write_bytes(b"A")
    (home / "b").write_bytes(b"B")
    assert s.status(s.client.renameFile(b"a", b"b")) == (ft.FX_FAILURE, "File exists")
    assert (home / "a").read_bytes() == b"A"
    assert (home / "b").read_bytes() == b"B"

    s.result(s.client.renameFile(b"a", b"c"))
    assert not (home / "a").exists()
    assert (home / "c").read_bytes() == b"A"
    assert (home / "c").stat().st_nlink == 1

    # Not a regular file: the check-then-rename path.
    (home / "d1").mkdir()
    (home / "d2").mkdir()
    assert s.status(s.client.renameFile(b"d1", b"d2"))[0] == ft.FX_FAILURE
    os.symlink("nowhere", home / "dangling")
    assert s.status(s.client.renameFile(b"d1", b"dangling"))[0] == ft.FX_FAILURE
    s.result(s.client.renameFile(b"d1", b"d3"))
    assert (home / "d3").is_dir()
    assert not (home / "d1").exists()
    assert s.status(s.client.renameFile(b"missing", b"x"))[0] == ft.FX_NO_SUCH_FILE


def test_posix_rename_replaces(s: Session, home: Path) -> None:
    (home / "a").write_bytes(b"A")
    (home / "b").write_bytes(b"B")
    reply = s.result(s.client.extendedRequest(b"posix-rename@openssh.com", NS(b"a") + NS(b"b")))
    assert reply == (b"rename succeeded", b"")
    assert not (home / "a").exists()
    assert (home / "b").read_bytes() == b"A"
    code, _ = s.status(s.client.extendedRequest(b"posix-rename@openssh.com", NS(b"a") + NS(b"b")))
    assert code == ft.FX_NO_SUCH_FILE


def test_hardlink_extension(s: Session, home: Path) -> None:
    (home / "a").write_bytes(b"A")
    reply = s.result(s.client.extendedRequest(b"hardlink@openssh.com", NS(b"a") + NS(b"b")))
    assert reply == (b"link succeeded", b"")
    assert (home / "a").stat().st_ino == (home / "b").stat().st_ino
    code, _ = s.status(s.client.extendedRequest(b"hardlink@openssh.com", NS(b"a") + NS(b"b")))
    assert code == ft.FX_FAILURE


def test_symlink_uses_openssh_argument_order(s: Session, home: Path) -> None:
    (home / "target.txt").write_bytes(b"T")
    # OpenSSH's ``ln -s target.txt thelink`` puts the target in the first
    # field and the new link in the second; build that packet by hand.
    s.result(s.client._sendRequest(ft.FXP_SYMLINK, NS(b"target.txt") + NS(b"thelink")))
    assert os.readlink(home / "thelink") == "target.txt"
    assert not (home / "target.txt").is_symlink()
    # Conch's client method sends its arguments in the same field order.
    s.result(s.client.makeLink(b"../elsewhere", b"sub-link"))
    assert os.readlink(home / "sub-link") == "../elsewhere"
    assert s.status(s.client.makeLink(b"x", b"thelink"))[0] == ft.FX_FAILURE


def test_readlink(s: Session, home: Path) -> None:
    os.symlink("some/where", home / "l")
    (home / "f").write_bytes(b"")
    assert s.result(s.client.readLink(b"l")) == "some/where"
    assert s.status(s.client.readLink(b"f")) == (ft.FX_FAILURE, "Invalid argument")
    assert s.status(s.client.readLink(b"missing"))[0] == ft.FX_NO_SUCH_FILE


def test_realpath(s: Session, home: Path) -> None:
    (home / "sub").mkdir()
    (home / "f").write_bytes(b"")
    os.symlink("sub", home / "lnk")
    h = str(home)
    assert s.result(s.client.realPath(b".")) == h
    assert s.result(s.client.realPath(b"")) == h
    assert s.result(s.client.realPath(b"sub/../f")) == f"{h}/f"
    assert s.result(s.client.realPath(b"lnk/x")) == f"{h}/sub/x"
    assert s.result(s.client.realPath(b"not/yet/../there")) == f"{h}/not/there"
    assert s.result(s.client.realPath(b"/")) == "/"
    assert s.result(s.client.realPath(b"//usr/./")) == os.path.realpath("/usr")


def test_stat_and_lstat(s: Session, home: Path) -> None:
    (home / "f").write_bytes(b"12345")
    os.symlink("f", home / "l")
    assert s.result(s.client.getAttrs(b"l", 1))["size"] == 5
    assert stat.S_ISREG(s.result(s.client.getAttrs(b"l", 1))["permissions"])
    lattrs = s.result(s.client.getAttrs(b"l", 0))
    assert stat.S_ISLNK(lattrs["permissions"])
    assert lattrs["size"] == 1
    assert s.status(s.client.getAttrs(b"missing", 1))[0] == ft.FX_NO_SUCH_FILE
    assert s.status(s.client.getAttrs(b"", 1))[0] == ft.FX_NO_SUCH_FILE


def test_setstat(s: Session, home: Path, calls: CallLog) -> None:
    (home / "f").write_bytes(b"0123456789")
    st = os.stat(home / "f")
    calls.calls.clear()
    attrs = {
        "permissions": 0o604,
        "size": 3,
        "atime": 1000000000,
        "mtime": 1111111111,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    s.result(s.client.setAttrs(b"f", attrs))
    after = os.stat(home / "f")
    assert stat.S_IMODE(after.st_mode) == 0o604
    assert after.st_size == 3
    assert (after.st_atime, after.st_mtime) == (1000000000, 1111111111)
    # Same owner and group: no chown at all.
    assert calls.names() == ["truncate", "chmod", "utime", "stat"]
    assert s.status(s.client.setAttrs(b"missing", {"size": 0}))[0] == ft.FX_NO_SUCH_FILE


def test_setstat_changes_group_only_when_asked(s: Session, home: Path, calls: CallLog) -> None:
    (home / "f").write_bytes(b"")
    st = os.stat(home / "f")
    other = 4242 if st.st_gid != 4242 else 4243
    result = s.client.setAttrs(b"f", {"uid": st.st_uid, "gid": other})
    if os.geteuid() == 0:
        s.result(result)
        assert (os.stat(home / "f").st_uid, os.stat(home / "f").st_gid) == (st.st_uid, other)
    else:
        assert s.status(result) == (ft.FX_PERMISSION_DENIED, "Operation not permitted")
    assert calls.names()[-1] == "chown"


# -- threading discipline and teardown -----------------------------------------


def test_every_filesystem_call_goes_through_the_runner(s: Session, calls: CallLog) -> None:
    calls.calls.clear()
    calls.runnerCalls = 0
    f = s.open(b"f", RW_CREAT)
    s.result(f.writeChunk(0, b"abc"))
    s.result(f.readChunk(0, 3))
    s.result(f.getAttrs())
    s.result(f.close())
    s.result(s.client.getAttrs(b"f", 0))
    s.listdir(b".")
    assert calls.runnerCalls == 7
    assert calls.names()[:7] == ["open", "pwrite", "pread", "fstat", "close", "lstat", "scandir"]
    assert set(calls.names()[7:]) == {"lstat", "getpwuid", "getgrgid"}
    assert calls.outside == []


def test_nothing_happens_until_the_runner_runs(
    home: Path, calls: CallLog, errors: list[Any]
) -> None:
    runner = QueueRunner(calls)
    s = Session(home, runner)
    d = s.client.openFile(b"new", RW_CREAT, {})
    s.pump.flush()
    assert not (home / "new").exists()
    assert len(runner.queue) == 1
    runner.runOne()
    f = s.result(d)
    assert (home / "new").exists()

    w = f.writeChunk(0, b"in flight")
    c = f.close()
    s.pump.flush()
    # The close must wait: closing the fd under a running pwrite could let
    # the number be reused by another open and the data land elsewhere.
    assert [q[2][0].__name__ for q in runner.queue] == ["write"]
    runner.runOne()
    s.pump.flush()
    assert [q[2][0].__name__ for q in runner.queue] == ["close"]
    runner.runOne()
    s.result(w)
    s.result(c)
    assert (home / "new").read_bytes() == b"in flight"
    assert s.server._files == {}


def test_dropped_connection_closes_open_files(s: Session, home: Path) -> None:
    before = fdCount()
    files = [s.open(f"f{i}".encode(), RW_CREAT) for i in range(3)]
    s.listdir(b".")
    assert fdCount() == before + 3
    s.client.transport.loseConnection()
    s.pump.flush()
    assert fdCount() == before
    done: list[Any] = []
    s.server.connectionLost().addBoth(done.append)
    assert done == [None]
    assert len(files) == 3


def test_open_finishing_after_the_connection_dropped_is_closed(
    home: Path, calls: CallLog, errors: list[Any]
) -> None:
    runner = QueueRunner(calls)
    s = Session(home, runner)
    before = fdCount()
    d = s.client.openFile(b"late", RW_CREAT, {})
    s.pump.flush()
    s.client.transport.loseConnection()
    s.pump.flush()
    assert isinstance(s.error(d), Exception)  # the client gave up
    s.server.connectionLost()
    runner.runOne()  # the open completes only now...
    assert fdCount() == before + 1
    assert [q[2][0].__name__ for q in runner.queue] == ["close"]
    runner.runOne()  # ...and is closed at once
    assert fdCount() == before
    assert s.server._files == {}


def test_close_is_idempotent(s: Session) -> None:
    f = s.result(s.server.openFile(b"x", RW_CREAT, {}))
    assert s.result(f.close()) is None
    assert s.result(f.close()) is None
    code, _ = s.status(f.readChunk(0, 1))
    assert code == ft.FX_FAILURE


def test_os_errors_become_sftp_errors_without_raw_errno_leaking() -> None:
    e = fromOSError(OSError(errno.ENOTEMPTY, "Directory not empty"))
    assert (e.code, e.message) == (ft.FX_FAILURE, "Directory not empty")
    e = fromOSError(OSError(errno.EPERM, "Operation not permitted"))
    assert e.code == ft.FX_PERMISSION_DENIED
    assert sftpError(ft.FX_FAILURE, "caf\xe9").message == "caf\\xe9"


def test_times_outside_32_bits_wrap_like_openssh(s: Session, home: Path) -> None:
    (home / "ancient").write_bytes(b"")
    os.utime(home / "ancient", (-86400, -86400))
    attrs = s.result(s.client.getAttrs(b"ancient", 1))
    assert attrs["mtime"] == 2**32 - 86400


# -- a real OpenSSH client -------------------------------------------------

LAUNCHER = """\
import sys
sys.path.insert(0, {root!r})
from twisted.conch.ssh.filetransfer import FileTransferServer
from twisted.internet import reactor, stdio
from coderagent.ssh.sftp import AgentSFTPServer

server = AgentSFTPServer(sys.argv[1])


class Proto(FileTransferServer):
    def connectionLost(self, reason):
        super().connectionLost(reason)
        server.connectionLost().addBoth(lambda _: reactor.stop())


stdio.StandardIO(Proto(avatar=server))
reactor.run()
"""


def test_openssh_sftp_client_end_to_end(tmp_path: Path, umask: int) -> None:
    # Like the integration tests, this needs OpenSSH's clients (README: openssh-client);
    # without them it fails here rather than being skipped.
    assert shutil.which("sftp") is not None, "OpenSSH's sftp is not on PATH (openssh-client)"
    root = Path(os.path.realpath(tmp_path))
    remote = root / "remote"
    local = root / "local"
    remote.mkdir()
    local.mkdir()
    launcher = root / "launch"
    launcher.write_text(f"#!{sys.executable}\n" + LAUNCHER.format(root=str(ROOT)))
    launcher.chmod(0o755)
    payload = random.Random(7).randbytes(20 * MiB)
    (local / "big.bin").write_bytes(payload)
    (local / "other.bin").write_bytes(b"other")

    batch = root / "batch"
    batch.write_text(
        textwrap.dedent(
            """\
            pwd
            put local/big.bin big.bin
            put local/other.bin other.bin
            mkdir sub
            rename -l big.bin sub/moved.bin
            -rename -l other.bin sub/moved.bin
            get sub/moved.bin local/back.bin
            ln -s sub/moved.bin link
            ln sub/moved.bin hard
            ls -l sub
            -rmdir sub
            chmod 600 hard
            rm hard
            rename other.bin sub/moved.bin
            mkdir gone
            rmdir gone
            """
        ).replace("local/", f"{local}/")
    )
    done = subprocess.run(
        ["sftp", "-b", str(batch), "-D", f"{launcher} {remote}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    assert f"Remote working directory: {remote}" in done.stdout
    assert (local / "back.bin").read_bytes() == payload
    assert os.readlink(remote / "link") == "sub/moved.bin"
    assert (remote / "sub" / "moved.bin").read_bytes() == b"other"  # posix-rename
    assert sorted(p.name for p in remote.iterdir()) == ["link", "sub"]
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    assert f"-rw-r--r--    2 {user:<8} {group:<8} {20 * MiB:>8} " in done.stdout
    # Legacy rename onto an existing file, and rmdir of a non-empty one,
    # were refused (the "-" prefix let the batch go on).
    assert 'remote rename "' in done.stderr
    assert 'remote rmdir "' in done.stderr


@pytest_twisted.inlineCallbacks
def test_real_threads_pipelined_out_of_order(home: Path) -> Iterator[Deferred[Any]]:
    """The default runner (deferToThread): many writes and reads in flight at once."""
    server = AgentSFTPServer(str(home))
    data = random.Random(3).randbytes(2 * MiB)
    f = yield server.openFile(b"threaded.bin", RW_CREAT, {})
    step = 32768
    yield defer.gatherResults(
        [f.writeChunk(o, data[o : o + step]) for o in range(0, len(data), step)]
    )
    chunks = yield defer.gatherResults([f.readChunk(o, step) for o in range(0, len(data), step)])
    assert b"".join(chunks) == data
    assert (yield f.readChunk(len(data), step)) == b""
    assert (yield server.realPath(b".")) == os.fsencode(home)
    entries = yield server.openDirectory(b".")
    assert sorted(e[0] for e in entries) == [b".", b"..", b"threaded.bin"]
    yield server.connectionLost()
    assert server._files == {}
    assert (home / "threaded.bin").read_bytes() == data
