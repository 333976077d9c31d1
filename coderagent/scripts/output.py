"""One script run's output: every byte to its log file, every line to coderd.

As upstream, stdout and stderr both go, as they arrive, to the script's log
file and, line by line (without the newline, and without a ``\\r`` before it),
to the script's log source: stdout lines at INFO, stderr lines at ERROR.  A
last line without a newline is sent when the run ends.

The partial line held while waiting for its newline is bounded: past the
longest line one request can carry, the rest of that line is skipped and the
line counted as dropped (upstream would hold it whole, then drop it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.logger import Logger

from coderagent.scripts.logsender import ERROR, INFO, MAX_LINE_BYTES, LogSender

log = Logger()


class LineSplitter:
    """Bytes in, lines out; a line longer than ``maxLine`` is reported, not kept."""

    def __init__(
        self,
        emit: Callable[[bytes], None],
        overlong: Callable[[], None],
        maxLine: int = MAX_LINE_BYTES,
    ) -> None:
        self.emit = emit
        self.overlong = overlong
        self.maxLine = maxLine
        self._partial: list[bytes] = []
        self._size = 0
        self._discarding = False

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline == -1:
                break
            piece = data[start:newline]
            start = newline + 1
            if self._discarding:
                self._discarding = False
                self.overlong()
                continue
            if self._partial:
                piece = b"".join([*self._partial, piece])
                self._partial = []
                self._size = 0
            self._line(piece)
        rest = data[start:]
        if not rest or self._discarding:
            return
        self._size += len(rest)
        if self._size > self.maxLine + 1:  # + 1: a "\r" that the newline would strip
            self._partial = []
            self._size = 0
            self._discarding = True
        else:
            self._partial.append(rest)

    def _line(self, piece: bytes) -> None:
        if piece.endswith(b"\r"):
            piece = piece[:-1]
        if len(piece) > self.maxLine:
            self.overlong()
        else:
            self.emit(piece)

    def close(self) -> None:
        """The stream ended: its last line, if it had no newline, goes now."""
        if self._discarding:
            self._discarding = False
            self.overlong()
        elif self._partial:
            piece = b"".join(self._partial)
            self._partial = []
            self._size = 0
            self._line(piece)


class RunOutput:
    """Where one run's stdout and stderr go: the log file (``fd``) and log source ``source``."""

    def __init__(self, fd: int | None, source: bytes, sender: LogSender, path: str = "") -> None:
        self.fd = fd
        self.path = path
        self.source = source
        self.sender = sender
        self._stdout = LineSplitter(self._info, self._overlong)
        self._stderr = LineSplitter(self._error, self._overlong)
        self._closed = False

    def _info(self, line: bytes) -> None:
        self.sender.enqueue(self.source, INFO, line)

    def _error(self, line: bytes) -> None:
        self.sender.enqueue(self.source, ERROR, line)

    def _overlong(self) -> None:
        self.sender.drop(self.source, "too_long")

    def stdout(self, data: bytes) -> None:
        if not self._closed:
            self._write(data)
            self._stdout.feed(data)

    def stderr(self, data: bytes) -> None:
        if not self._closed:
            self._write(data)
            self._stderr.feed(data)

    def message(self, text: str) -> None:
        """A line of the agent's own (why a script could not run, say), at ERROR."""
        if not self._closed:
            self._stderr.close()
            self._write(text.encode("utf-8", "replace") + b"\n")
            self._error(text.encode("utf-8", "replace"))

    def _write(self, data: bytes) -> None:
        if self.fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            log.error(
                "cannot write the script log file {path}: {error}; "
                "the rest of this run goes to coderd only",
                path=self.path,
                error=e,
            )
            self._closeFile()

    def _closeFile(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def close(self) -> None:
        """The run ended: last partial lines out, the file closed, the source flushed."""
        if self._closed:
            return
        self._stdout.close()
        self._stderr.close()
        self._closed = True
        self._closeFile()
        self.sender.flush(self.source)
