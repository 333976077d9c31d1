"""What an SFTP handle stands for: an open file, or a directory listing.

Conch's ``FileTransferServer`` keeps these in its handle table and calls
them as requests arrive; each file operation is a positional call on the
descriptor, run in the worker thread.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from twisted.conch.interfaces import ISFTPFile
from twisted.conch.ssh.filetransfer import FX_FAILURE
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.ssh.sftp.errors import sftpError
from coderagent.ssh.sftp.fs import Attrs, Entry, applyAttrs, attrsFromStat, pwriteAll, statvfsReply

_T = TypeVar("_T")

#: Runs one blocking call in the worker thread: ``inThread(f, *args)``.
InThread = Callable[..., Deferred[Any]]

#: OpenSSH caps a READ at this much (SFTP_MAX_MSG_LENGTH - 1024); so do we, so
#: a client asking for 4 GiB cannot make us allocate it.
MAX_READ_LENGTH = 256 * 1024 - 1024

_serials = itertools.count(1)


class Listing:
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
class AgentFile:
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

    ``inThread`` runs each operation in the worker thread; ``onClosed`` is
    told once the descriptor is closed (the server forgets the handle).
    """

    def __init__(
        self, fd: int, *, inThread: InThread, onClosed: Callable[[AgentFile], None]
    ) -> None:
        self._inThread = inThread
        self._onClosed = onClosed
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
            return defer.fail(sftpError(FX_FAILURE, "handle is closed"))
        self._busy += 1
        result: Deferred[_T] = Deferred()

        def start(_: object) -> Deferred[None]:
            d: Deferred[Any] = self._inThread(fn, self._fd, *args)
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
            pwriteAll(fd, data, offset)

        return self._call(write)

    def getAttrs(self) -> Deferred[Attrs]:
        def fstat(fd: int) -> Attrs:
            return attrsFromStat(os.fstat(fd))

        return self._call(fstat)

    def setAttrs(self, attrs: Mapping[str, object]) -> Deferred[None]:
        return self._call(applyAttrs, attrs)

    def fsync(self) -> Deferred[None]:
        return self._call(os.fsync)

    def statvfs(self) -> Deferred[bytes]:
        def fstatvfs(fd: int) -> bytes:
            return statvfsReply(os.fstatvfs(fd))

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
            self._onClosed(self)
            waiters, self._closeWaiters = self._closeWaiters or [], []
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        self._inThread(os.close, fd).addBoth(closed)
