"""The blocking filesystem operations behind SFTP requests, and SFTP's attributes.

Everything here blocks (``stat``, ``link``, ``readdir``, ``getpwuid``) and
so only ever runs in the worker thread, through the server's
``runInThread``.  Each function is written after what OpenSSH's sftp-server
does for the same request, down to the text of ``ls -l`` lines.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
import time
from collections.abc import Mapping

from twisted.conch.ssh.filetransfer import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
)

#: SFTP file attributes, as Conch's FileTransferServer reads and writes them.
Attrs = dict[str, int]
#: One directory entry: name, ``ls -l`` line, attributes.
Entry = tuple[bytes, bytes, Attrs]

# link() fails like this where a filesystem has no hard links (vfat, some
# FUSE mounts; EPERM is Linux's answer on several), and then OpenSSH falls
# back to check-then-rename; see renameNoReplace.
_NO_HARDLINKS = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EPERM})

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_STATVFS_ST_RDONLY = 0x1
_STATVFS_ST_NOSUID = 0x2


def _clampTime(t: float) -> int:
    """SFTP v3 times are unsigned 32-bit; wrap like OpenSSH's C cast does.

    Without this, a file dated before 1970 would make Conch's ``struct.pack``
    fail and the request would go unanswered.
    """
    return int(t) & 0xFFFFFFFF


def attrsFromStat(st: os.stat_result) -> Attrs:
    return {
        "size": st.st_size,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "permissions": st.st_mode,
        "atime": _clampTime(st.st_atime),
        "mtime": _clampTime(st.st_mtime),
    }


def openFlags(pflags: int) -> int:
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


def applyAttrs(target: bytes | int, attrs: Mapping[str, object]) -> None:
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


def pwriteAll(fd: int, data: bytes, offset: int) -> None:
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


def renameNoReplace(old: bytes, new: bytes) -> None:
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


def hardlink(old: bytes, new: bytes) -> None:
    """hardlink@openssh.com: link() semantics, so a symlink is linked itself."""
    os.link(old, new, follow_symlinks=False)


def statvfsReply(st: os.statvfs_result) -> bytes:
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


def listDirectory(path: bytes) -> list[Entry]:
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
        entries.append((name, line, attrsFromStat(st)))
    return entries
