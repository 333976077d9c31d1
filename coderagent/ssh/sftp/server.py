"""The SFTP server: ``ISFTPServer`` for one channel, acting as the agent's own user.

Requests on paths are served here; requests on a handle go to the file or
listing in :mod:`.handles`.  Every filesystem call runs through
``runInThread``, so the reactor only ever parses packets.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.filetransfer import FX_BAD_MESSAGE, FX_FAILURE, SFTPError
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.ssh.sftp.errors import guarded, sftpError, succeeded
from coderagent.ssh.sftp.fs import (
    Attrs,
    applyAttrs,
    attrsFromStat,
    hardlink,
    listDirectory,
    openFlags,
    renameNoReplace,
    statvfsReply,
)
from coderagent.ssh.sftp.handles import AgentFile, Listing

log = Logger()

_T = TypeVar("_T")

Runner = Callable[..., Deferred[Any]]

#: The extensions advertised in our VERSION packet; each is implemented by
#: ``extendedRequest`` and exercised by the tests.
EXTENSIONS: dict[bytes, bytes] = {
    b"posix-rename@openssh.com": b"1",
    b"statvfs@openssh.com": b"2",
    b"fstatvfs@openssh.com": b"2",
    b"hardlink@openssh.com": b"1",
    b"fsync@openssh.com": b"1",
}


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
        self._files: dict[bytes, AgentFile] = {}
        self._lost = False

    # -- plumbing ---------------------------------------------------------

    def _inThread(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return cast(Deferred[_T], self._runner(guarded, fn, *args))

    def _path(self, path: bytes) -> bytes:
        # An empty path stays empty, so the system call fails with ENOENT
        # as it does for OpenSSH; anything else is taken relative to home.
        return os.path.join(self._home, path) if path else path

    def _forget(self, f: AgentFile) -> None:
        self._files.pop(f.handle, None)

    def _fileForHandle(self, handle: bytes) -> AgentFile:
        f = self._files.get(handle)
        if f is None:
            raise sftpError(FX_FAILURE, "invalid handle")
        return f

    # -- ISFTPServer ------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        return dict(EXTENSIONS)

    def openFile(
        self, filename: bytes, flags: int, attrs: Mapping[str, object]
    ) -> Deferred[AgentFile]:
        """Open like OpenSSH: mode from attrs or 0666, the umask still applies."""
        perms = attrs.get("permissions")
        mode = perms & 0o7777 if isinstance(perms, int) else 0o666
        d = self._inThread(os.open, self._path(filename), openFlags(flags), mode)
        return d.addCallback(self._opened)

    def _opened(self, fd: int) -> AgentFile | Deferred[AgentFile]:
        f = AgentFile(fd, inThread=self._inThread, onClosed=self._forget)
        if self._lost:
            # The client went away while this open ran in the pool; Conch has
            # already swept its handle table, so nobody else would close it.
            def refuse(_: None) -> AgentFile:
                raise sftpError(FX_FAILURE, "connection closed")

            return f.close().addCallback(refuse)
        self._files[f.handle] = f
        return f

    def removeFile(self, filename: bytes) -> Deferred[None]:
        return self._inThread(os.unlink, self._path(filename))

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred[None]:
        """SFTP v3 rename: fails if ``newpath`` exists (posix-rename doesn't)."""
        return self._inThread(renameNoReplace, self._path(oldpath), self._path(newpath))

    def makeDirectory(self, path: bytes, attrs: Mapping[str, object]) -> Deferred[None]:
        perms = attrs.get("permissions")
        mode = perms & 0o7777 if isinstance(perms, int) else 0o777
        return self._inThread(os.mkdir, self._path(path), mode)

    def removeDirectory(self, path: bytes) -> Deferred[None]:
        return self._inThread(os.rmdir, self._path(path))

    def openDirectory(self, path: bytes) -> Deferred[Listing]:
        return self._inThread(listDirectory, self._path(path)).addCallback(Listing)

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred[Attrs]:
        statFn = os.stat if followLinks else os.lstat

        def getattrs(p: bytes) -> Attrs:
            return attrsFromStat(statFn(p))

        return self._inThread(getattrs, self._path(path))

    def setAttrs(self, path: bytes, attrs: Mapping[str, object]) -> Deferred[None]:
        return self._inThread(applyAttrs, self._path(path), attrs)

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
            raise sftpError(FX_BAD_MESSAGE, "malformed extended request")
        return parts[:count]

    def _statusOk(self, d: Deferred[None], message: str) -> Deferred[bytes]:
        def ok(_: None) -> bytes:
            raise succeeded(message)

        return d.addCallback(ok)

    def _extPosixRename(self, data: bytes) -> Deferred[bytes]:
        old, new = self._strings(data, 2)
        d = self._inThread(os.rename, self._path(old), self._path(new))
        return self._statusOk(d, "rename succeeded")

    def _extHardlink(self, data: bytes) -> Deferred[bytes]:
        old, new = self._strings(data, 2)
        d = self._inThread(hardlink, self._path(old), self._path(new))
        return self._statusOk(d, "link succeeded")

    def _extStatvfs(self, data: bytes) -> Deferred[bytes]:
        (path,) = self._strings(data, 1)

        def statvfs(p: bytes) -> bytes:
            return statvfsReply(os.statvfs(p))

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
