"""The SFTP subsystem: the agent user's own filesystem, served without blocking.

Twisted ships ``twisted.conch.unix.SFTPServerForUnixConchUser``, but it cannot
serve an agent: every call goes through ``_runAsUser``, which ``seteuid(0)``s
and so fails for an unprivileged agent; it breaks when ``getHomeDir()`` is a
``str`` (Twisted #9845); it creates symlinks the wrong way round for OpenSSH
clients; and it does its disk I/O on the reactor thread, where one slow NFS
``stat`` would freeze every terminal of the workspace.

This server behaves like OpenSSH's ``sftp-server`` started as the agent's
user.  There is no jail: absolute paths work and the operating system's
permissions are the access control, exactly as for a shell on the same
session.  Relative paths are resolved against ``home``, the session's working
directory.

Every filesystem call runs through ``runInThread`` (``deferToThread`` unless a
test passes something else), so the reactor only ever parses packets.

Conch's ``FileTransferServer`` drives this object; several of its habits shape
the code here and are explained where they matter:

* a handle is ``str(hash(fileObj))``, so files define ``__hash__`` to make
  handles unique for the life of the process and findable by the
  ``fsync``/``fstatvfs`` extensions, which only see the raw handle bytes;
* an extended request's return value is always sent as
  ``SSH_FXP_EXTENDED_REPLY``, but OpenSSH's client aborts unless rename, link
  and fsync answer ``SSH_FXP_STATUS``; raising ``SFTPError(FX_OK, …)`` is the
  only way to get a success status out of Conch;
* errors other than ENOENT/EACCES/EEXIST are logged as critical failures, and
  messages must be ASCII, so every ``OSError`` is turned into an ``SFTPError``
  with OpenSSH's status code and an ASCII message;
* a directory iterator may not yield Deferreds (Conch then answers with a
  ``TypeError``), so a listing is read whole in the thread at OPENDIR time.
"""

from __future__ import annotations

import errno
import grp
import itertools
import os
import pwd
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.filetransfer import (
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPError,
)
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AgentSFTPServer"]

log = Logger()

_T = TypeVar("_T")

Runner = Callable[..., Deferred[Any]]
Attrs = dict[str, int]
Entry = tuple[bytes, bytes, Attrs]

#: OpenSSH caps a READ at this much (SFTP_MAX_MSG_LENGTH - 1024); so do we, so
#: a client asking for 4 GiB cannot make us allocate it.
MAX_READ_LENGTH = 256 * 1024 - 1024

#: The extensions advertised in our VERSION packet; each is implemented by
#: ``extendedRequest`` and exercised by the tests.
EXTENSIONS: dict[bytes, bytes] = {
    b"posix-rename@openssh.com": b"1",
    b"statvfs@openssh.com": b"2",
    b"fstatvfs@openssh.com": b"2",
    b"hardlink@openssh.com": b"1",
    b"fsync@openssh.com": b"1",
}

# OpenSSH's errno_to_portable(): EEXIST is FX_FAILURE there too, because the
# v3 client prints "Unknown status" for the later FX_FILE_ALREADY_EXISTS.
_STATUS_FOR_ERRNO = {
    errno.ENOENT: FX_NO_SUCH_FILE,
    errno.ENOTDIR: FX_NO_SUCH_FILE,
    errno.ELOOP: FX_NO_SUCH_FILE,
    errno.EACCES: FX_PERMISSION_DENIED,
    errno.EPERM: FX_PERMISSION_DENIED,
    errno.ENOSYS: FX_OP_UNSUPPORTED,
    errno.EOPNOTSUPP: FX_OP_UNSUPPORTED,
}

# link() fails like this where a filesystem has no hard links (vfat, some
# FUSE mounts; EPERM is Linux's answer on several), and then OpenSSH falls
# back to check-then-rename; see _renameNoReplace.
_NO_HARDLINKS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EPERM})

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_STATVFS_ST_RDONLY = 0x1
_STATVFS_ST_NOSUID = 0x2

_serials = itertools.count(1)


def _sftpError(code: int, message: str) -> SFTPError:
    """Build an ``SFTPError`` whose message Conch can encode.

    Conch encodes status messages as ASCII and, if that fails, raises inside
    its error handler and never answers the request; so anything non-ASCII is
    escaped here.
    """
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    return SFTPError(code, text)


def _fromOSError(e: OSError) -> SFTPError:
    """Map an ``OSError`` to the status OpenSSH's sftp-server would send."""
    code = _STATUS_FOR_ERRNO.get(e.errno or 0, FX_FAILURE)
    return _sftpError(code, e.strerror or str(e))


def _succeeded(message: str) -> SFTPError:
    """The "exception" that makes Conch answer an extended request with FX_OK.

    ``FileTransferServer`` sends whatever ``extendedRequest`` returns as
    SSH_FXP_EXTENDED_REPLY, while OpenSSH's client requires SSH_FXP_STATUS for
    posix-rename, hardlink and fsync and disconnects otherwise.  Its error
    path sends an ``SFTPError``'s code verbatim, so failing with code FX_OK
    is how success is reported.
    """
    return _sftpError(FX_OK, message)


def _guarded(fn: Callable[..., _T], *args: Any) -> _T:
    """Run one filesystem call (in the worker thread), translating errors.

    Translating here means Conch never sees a raw ``OSError`` and so never
    logs an ordinary failure (ENOTEMPTY, EISDIR, ...) as a critical error.
    ``ValueError`` (a NUL byte in a path) and ``OverflowError`` (an offset
    beyond ``off_t``) are the client's fault, hence FX_BAD_MESSAGE.
    """
    try:
        return fn(*args)
    except OSError as e:
        raise _fromOSError(e) from e
    except (ValueError, OverflowError) as e:
        raise _sftpError(FX_BAD_MESSAGE, str(e)) from e


def _clampTime(t: float) -> int:
    """SFTP v3 times are unsigned 32-bit; wrap like OpenSSH's C cast does.

    Without this, a file dated before 1970 would make Conch's ``struct.pack``
    fail and the request would go unanswered.
    """
    return int(t) & 0xFFFFFFFF


def _attrsFromStat(st: os.stat_result) -> Attrs:
    return {
        "size": st.st_size,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "permissions": st.st_mode,
        "atime": _clampTime(st.st_atime),
        "mtime": _clampTime(st.st_mtime),
    }


def _openFlags(pflags: int) -> int:
    """SFTP open flags to ``os.open`` flags, as OpenSSH's flags_from_portable."""
    if pflags & FXF_READ and pflags & FXF_WRITE:
        flags = os.O_RDWR
    elif pflags & FXF_WRITE:
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if pflags & FXF_APPEND:
        flags |= os.O_APPEND
    if pflags & FXF_CREAT:
        flags |= os.O_CREAT
    if pflags & FXF_TRUNC:
        flags |= os.O_TRUNC
    if pflags & FXF_EXCL:
        flags |= os.O_EXCL
    return flags


def _applyAttrs(target: bytes | int, attrs: Mapping[str, object]) -> None:
    """SETSTAT/FSETSTAT on a path or an fd, in OpenSSH's order.

    Ownership is only changed where it differs: clients such as ``sftp``'s
    ``chgrp`` resend the current uid, and an unprivileged agent may change a
    file's group but may not "change" its owner, even to itself on some
    systems.
    """
    size = attrs.get("size")
    if isinstance(size, int):
        os.truncate(target, size)
    perms = attrs.get("permissions")
    if isinstance(perms, int):
        os.chmod(target, perms & 0o7777)
    atime, mtime = attrs.get("atime"), attrs.get("mtime")
    if isinstance(atime, int) and isinstance(mtime, int):
        os.utime(target, (atime, mtime))
    uid, gid = attrs.get("uid"), attrs.get("gid")
    if isinstance(uid, int) and isinstance(gid, int):
        st = os.stat(target)
        newUid = uid if uid != st.st_uid else -1
        newGid = gid if gid != st.st_gid else -1
        if newUid != -1 or newGid != -1:
            os.chown(target, newUid, newGid)


def _pwriteAll(fd: int, data: bytes, offset: int) -> None:
    """``pwrite`` until everything is written: a short write is not an error."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _renameIfAbsent(old: bytes, new: bytes) -> None:
    try:
        os.lstat(new)
    except FileNotFoundError:
        os.rename(old, new)
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))


def _renameNoReplace(old: bytes, new: bytes) -> None:
    """SFTP v3 RENAME, which must not replace an existing target.

    Like OpenSSH's sftp-server: a regular file is renamed with link()+unlink(),
    which fails atomically if the target exists; anything else (or a
    filesystem without hard links) is checked and then renamed, which is
    racy, as it is in OpenSSH.
    """
    if stat.S_ISREG(os.lstat(old).st_mode):
        try:
            os.link(old, new, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_HARDLINKS:
                raise
            _renameIfAbsent(old, new)
            return
        try:
            os.unlink(old)
        except OSError:
            # Leave things as they were rather than with two names.
            try:
                os.unlink(new)
            except OSError:
                pass
            raise
    else:
        _renameIfAbsent(old, new)


def _hardlink(old: bytes, new: bytes) -> None:
    """hardlink@openssh.com: link() semantics, so a symlink is linked itself."""
    os.link(old, new, follow_symlinks=False)


def _statvfsReply(st: os.statvfs_result) -> bytes:
    """The statvfs@openssh.com reply body: eleven uint64s."""
    flag = _STATVFS_ST_RDONLY if st.f_flag & os.ST_RDONLY else 0
    flag |= _STATVFS_ST_NOSUID if st.f_flag & os.ST_NOSUID else 0
    return struct.pack(
        "!11Q",
        st.f_bsize,
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
        st.f_favail,
        st.f_fsid & 0xFFFFFFFFFFFFFFFF,
        flag,
        st.f_namemax,
    )


def _lsDate(mtime: float, now: float) -> str:
    """The date column of ``ls -l``, as OpenSSH's ls_file() writes it.

    Months are spelled here rather than with ``strftime("%b")`` so a locale
    set elsewhere in the process cannot change what clients parse.
    """
    try:
        tm = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return ""
    month = _MONTHS[tm.tm_mon - 1]
    if now - (365 * 24 * 60 * 60) / 2 < mtime <= now:
        return f"{month} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}"
    return f"{month} {tm.tm_mday:2d}  {tm.tm_year}"


class _Names:
    """uid/gid to name, cached for one listing (getpwuid may read files)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = str(uid)
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = str(gid)
        return self._groups[gid]


def _longName(name: bytes, st: os.stat_result, user: str, group: str, now: float) -> bytes:
    """One line of ``ls -l`` exactly as OpenSSH's sftp-server sends it.

    Some clients (WinSCP, older ``sftp`` builds, scripts) show or even parse
    this text, so it matches OpenSSH byte for byte: BSD ``strmode`` leaves a
    trailing blank after the ten mode characters, hence two spaces before
    the link count.
    """
    head = (
        f"{stat.filemode(st.st_mode)}  {st.st_nlink:>3} {user:<8} {group:<8} "
        f"{st.st_size:>8} {_lsDate(st.st_mtime, now)} "
    )
    return os.fsencode(head) + name


def _listDirectory(path: bytes) -> list[Entry]:
    """Read a whole directory with ``lstat`` data, in the worker thread.

    Like OpenSSH, "." and ".." are included and an entry that vanishes
    between readdir and lstat is skipped rather than failing the listing.
    """
    names = _Names()
    now = time.time()
    entries: list[Entry] = []
    with os.scandir(path) as it:
        found = [entry.name for entry in it]
    for name in [b".", b"..", *found]:
        try:
            st = os.lstat(os.path.join(path, name))
        except OSError:
            continue
        line = _longName(name, st, names.user(st.st_uid), names.group(st.st_gid), now)
        entries.append((name, line, _attrsFromStat(st)))
    return entries


class _Listing:
    """An open directory handle: the entries read at OPENDIR, handed out once.

    Conch asks for ``iter(obj)`` and pulls up to 250 items per READDIR.  The
    deque is emptied as it goes so a long listing's memory is freed while the
    client reads it, and ``close`` drops the rest.
    """

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = deque(entries)

    def __iter__(self) -> Iterator[Entry]:
        return self

    def __next__(self) -> Entry:
        if not self._entries:
            raise StopIteration
        return self._entries.popleft()

    def close(self) -> None:
        self._entries.clear()


@implementer(ISFTPFile)
class _AgentFile:
    """An open file; every operation is a positional call on its descriptor.

    Operations on one file run one after another, in request order, so their
    replies leave in request order too.  OpenSSH's client depends on that:
    ``scp`` (SFTP mode) tracks a "high-water mark" of contiguously acknowledged
    writes and, when replies come back reordered, truncates the upload to that
    mark with FSETSTAT.  OpenSSH's sftp-server is sequential; so are we, per file.

    Closing waits for operations still in the pool.  Closing a descriptor
    under a running ``pwrite`` would let the kernel hand the number to the
    next ``open`` and the write would land in some other file; so ``close``
    marks the file closing, refuses new work, and closes the descriptor when
    the last operation in flight has finished.
    """

    def __init__(self, server: AgentSFTPServer, fd: int) -> None:
        self._server = server
        self._fd: int | None = fd
        self._busy = 0
        self._closeWaiters: list[Deferred[None]] | None = None
        self._serial = next(_serials)
        self._queue: Deferred[None] = defer.succeed(None)

    def __hash__(self) -> int:
        # Conch's handle is str(hash(obj)): a serial makes handles never repeat
        # and lets the server find a file again from the handle bytes alone.
        return self._serial

    @property
    def handle(self) -> bytes:
        """The handle bytes Conch sends for this file."""
        return str(hash(self)).encode("ascii")

    def _call(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if self._fd is None or self._closeWaiters is not None:
            return defer.fail(_sftpError(FX_FAILURE, "handle is closed"))
        self._busy += 1
        result: Deferred[_T] = Deferred()

        def start(_: object) -> Deferred[None]:
            d: Deferred[Any] = self._server._inThread(fn, self._fd, *args)
            d.addBoth(self._finished)
            d.addBoth(result.callback)  # a Failure here errbacks ``result``
            return d  # the next queued operation waits for this one

        self._queue.addCallback(start)
        return result

    def _finished(self, result: _T) -> _T:
        self._busy -= 1
        if self._busy == 0 and self._closeWaiters is not None:
            self._closeNow()
        return result

    def readChunk(self, offset: int, length: int) -> Deferred[bytes]:
        # An empty result is EOF: Conch turns it into FX_EOF.
        return self._call(os.pread, min(length, MAX_READ_LENGTH), offset)

    def writeChunk(self, offset: int, data: bytes) -> Deferred[None]:
        def write(fd: int) -> None:
            _pwriteAll(fd, data, offset)

        return self._call(write)

    def getAttrs(self) -> Deferred[Attrs]:
        def fstat(fd: int) -> Attrs:
            return _attrsFromStat(os.fstat(fd))

        return self._call(fstat)

    def setAttrs(self, attrs: Mapping[str, object]) -> Deferred[None]:
        return self._call(_applyAttrs, attrs)

    def fsync(self) -> Deferred[None]:
        return self._call(os.fsync)

    def statvfs(self) -> Deferred[bytes]:
        def fstatvfs(fd: int) -> bytes:
            return _statvfsReply(os.fstatvfs(fd))

        return self._call(fstatvfs)

    def close(self) -> Deferred[None]:
        """Close once nothing is in flight; safe to call any number of times.

        Both a client CLOSE and Conch's own ``connectionLost`` sweep, and then
        our ``AgentSFTPServer.connectionLost``, may call this for one file.
        """
        if self._fd is None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        if self._closeWaiters is None:
            self._closeWaiters = [d]
            if self._busy == 0:
                self._closeNow()
        else:
            self._closeWaiters.append(d)
        return d

    def _closeNow(self) -> None:
        fd = self._fd
        assert fd is not None
        self._busy += 1  # the close itself; keeps _finished from re-entering

        def closed(result: object) -> None:
            self._fd = None
            self._server._forget(self)
            waiters, self._closeWaiters = self._closeWaiters or [], []
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        self._server._inThread(os.close, fd).addBoth(closed)


@implementer(ISFTPServer)
class AgentSFTPServer:
    """ISFTPServer for one SFTP channel, acting as the agent's own user.

    ``home`` is where relative paths point and what ``realPath(".")``
    answers; ``runInThread(f, *args)`` runs one blocking call and returns a
    Deferred (``deferToThread`` by default; tests pass a synchronous one).
    """

    avatar: object = None

    def __init__(self, home: str, runInThread: Runner | None = None) -> None:
        self._home = os.fsencode(home)
        self._runner: Runner = runInThread or threads.deferToThread
        self._files: dict[bytes, _AgentFile] = {}
        self._lost = False

    # -- plumbing ---------------------------------------------------------

    def _inThread(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return cast(Deferred[_T], self._runner(_guarded, fn, *args))

    def _path(self, path: bytes) -> bytes:
        # An empty path stays empty, so the system call fails with ENOENT
        # as it does for OpenSSH; anything else is taken relative to home.
        return os.path.join(self._home, path) if path else path

    def _forget(self, f: _AgentFile) -> None:
        self._files.pop(f.handle, None)

    def _fileForHandle(self, handle: bytes) -> _AgentFile:
        f = self._files.get(handle)
        if f is None:
            raise _sftpError(FX_FAILURE, "invalid handle")
        return f

    # -- ISFTPServer ------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        return dict(EXTENSIONS)

    def openFile(
        self, filename: bytes, flags: int, attrs: Mapping[str, object]
    ) -> Deferred[_AgentFile]:
        """Open like OpenSSH: mode from attrs or 0666, the umask still applies."""
        perms = attrs.get("permissions")
        mode = perms & 0o7777 if isinstance(perms, int) else 0o666
        d = self._inThread(os.open, self._path(filename), _openFlags(flags), mode)
        return d.addCallback(self._opened)

    def _opened(self, fd: int) -> _AgentFile | Deferred[_AgentFile]:
        f = _AgentFile(self, fd)
        if self._lost:
            # The client went away while this open ran in the pool; Conch has
            # already swept its handle table, so nobody else would close it.
            def refuse(_: None) -> _AgentFile:
                raise _sftpError(FX_FAILURE, "connection closed")

            return f.close().addCallback(refuse)
        self._files[f.handle] = f
        return f

    def removeFile(self, filename: bytes) -> Deferred[None]:
        return self._inThread(os.unlink, self._path(filename))

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred[None]:
        """SFTP v3 rename: fails if ``newpath`` exists (posix-rename doesn't)."""
        return self._inThread(_renameNoReplace, self._path(oldpath), self._path(newpath))

    def makeDirectory(self, path: bytes, attrs: Mapping[str, object]) -> Deferred[None]:
        perms = attrs.get("permissions")
        mode = perms & 0o7777 if isinstance(perms, int) else 0o777
        return self._inThread(os.mkdir, self._path(path), mode)

    def removeDirectory(self, path: bytes) -> Deferred[None]:
        return self._inThread(os.rmdir, self._path(path))

    def openDirectory(self, path: bytes) -> Deferred[_Listing]:
        return self._inThread(_listDirectory, self._path(path)).addCallback(_Listing)

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred[Attrs]:
        statFn = os.stat if followLinks else os.lstat

        def getattrs(p: bytes) -> Attrs:
            return _attrsFromStat(statFn(p))

        return self._inThread(getattrs, self._path(path))

    def setAttrs(self, path: bytes, attrs: Mapping[str, object]) -> Deferred[None]:
        return self._inThread(_applyAttrs, self._path(path), attrs)

    def readLink(self, path: bytes) -> Deferred[bytes]:
        return self._inThread(os.readlink, self._path(path))

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> Deferred[None]:
        """SSH_FXP_SYMLINK, with the arguments as OpenSSH really sends them.

        The draft orders the fields (linkpath, targetpath) and Conch names
        its parameters after it, but OpenSSH's client has always sent
        (targetpath, linkpath) and every server follows OpenSSH.  So the first
        argument is what the link points to, kept verbatim (a relative
        target is relative to the link's directory, not to home), and the
        second is the link to create.
        """
        target, link = linkPath, targetPath
        return self._inThread(os.symlink, target, self._path(link))

    def realPath(self, path: bytes) -> Deferred[bytes]:
        """Absolute, symlink-free form of ``path``; "" and "." are home.

        Missing components are normalised rather than refused, so clients
        can canonicalise a path they are about to create.
        """
        return self._inThread(os.path.realpath, os.path.join(self._home, path or b"."))

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> Deferred[bytes]:
        """The OpenSSH extensions advertised in ``EXTENSIONS``."""
        handler = {
            b"posix-rename@openssh.com": self._extPosixRename,
            b"hardlink@openssh.com": self._extHardlink,
            b"statvfs@openssh.com": self._extStatvfs,
            b"fstatvfs@openssh.com": self._extFstatvfs,
            b"fsync@openssh.com": self._extFsync,
        }.get(extendedName)
        if handler is None:
            return defer.fail(NotImplementedError(f"unsupported extension {extendedName!r}"))
        try:
            return handler(extendedData)
        except SFTPError:
            return defer.fail()

    @staticmethod
    def _strings(data: bytes, count: int) -> list[bytes]:
        """Exactly ``count`` SSH strings, or FX_BAD_MESSAGE."""
        try:
            parts = list(getNS(data, count))
        except (struct.error, ValueError, IndexError):
            parts = []
        if len(parts) != count + 1 or parts[-1]:
            raise _sftpError(FX_BAD_MESSAGE, "malformed extended request")
        return parts[:count]

    def _statusOk(self, d: Deferred[None], message: str) -> Deferred[bytes]:
        def ok(_: None) -> bytes:
            raise _succeeded(message)

        return d.addCallback(ok)

    def _extPosixRename(self, data: bytes) -> Deferred[bytes]:
        old, new = self._strings(data, 2)
        d = self._inThread(os.rename, self._path(old), self._path(new))
        return self._statusOk(d, "rename succeeded")

    def _extHardlink(self, data: bytes) -> Deferred[bytes]:
        old, new = self._strings(data, 2)
        d = self._inThread(_hardlink, self._path(old), self._path(new))
        return self._statusOk(d, "link succeeded")

    def _extStatvfs(self, data: bytes) -> Deferred[bytes]:
        (path,) = self._strings(data, 1)

        def statvfs(p: bytes) -> bytes:
            return _statvfsReply(os.statvfs(p))

        return self._inThread(statvfs, self._path(path))

    def _extFstatvfs(self, data: bytes) -> Deferred[bytes]:
        (handle,) = self._strings(data, 1)
        return self._fileForHandle(handle).statvfs()

    def _extFsync(self, data: bytes) -> Deferred[bytes]:
        (handle,) = self._strings(data, 1)
        return self._statusOk(self._fileForHandle(handle).fsync(), "fsync succeeded")

    # -- teardown ---------------------------------------------------------

    def connectionLost(self) -> Deferred[None]:
        """Close every file the client left open; fires when all are closed.

        The code that owns the ``FileTransferServer`` must call this when the
        SFTP channel closes.  Conch's ``FileTransferServer.connectionLost``
        does call ``close()`` on the handles in its own table (harmless here:
        closing is idempotent), but it cannot know about an OPEN still
        running in the thread pool at that moment: the file would be added to
        its table after the sweep and its descriptor leaked for the life of
        the agent.  After this call, such late opens are closed as soon as
        they complete.  Directory handles hold no descriptors.
        """
        self._lost = True
        closing = [f.close().addErrback(self._logCloseFailure) for f in list(self._files.values())]
        return defer.gatherResults(closing).addCallback(lambda _: None)

    @staticmethod
    def _logCloseFailure(failure: Failure) -> None:
        log.warn("closing an abandoned SFTP file failed: {error}", error=failure.getErrorMessage())
