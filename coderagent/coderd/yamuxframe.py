"""yamux's wire format and errors (``hashicorp/yamux`` const.go and spec.md).

The 12-byte header, the frame types, flags and GoAway codes, and the errors
the session reports, with Go's texts where Go has one.  They are kept apart
from :mod:`coderagent.coderd.yamux`, the port of Go's session and stream
logic, so that tests and tools can read frames without a session.

A header is ``version u8 | type u8 | flags u16 | stream id u32 | length u32``,
big-endian, version always 0.  ``length`` is the payload size of a Data
frame, the window delta of a WindowUpdate, the opaque value of a Ping and the
error code of a GoAway; only Data frames carry a payload.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from twisted.internet import error

__all__ = [
    "FLAG_ACK",
    "FLAG_FIN",
    "FLAG_RST",
    "FLAG_SYN",
    "GO_AWAY_INTERNAL_ERROR",
    "GO_AWAY_NORMAL",
    "GO_AWAY_PROTOCOL_ERROR",
    "HEADER",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "PROTO_VERSION",
    "TYPE_DATA",
    "TYPE_GO_AWAY",
    "TYPE_PING",
    "TYPE_WINDOW_UPDATE",
    "Header",
    "KeepaliveTimeoutError",
    "RemoteGoAwayError",
    "RemoteSessionError",
    "SessionClosedError",
    "SessionShutdownError",
    "StreamCloseTimeoutError",
    "StreamOpenTimeoutError",
    "StreamResetError",
    "StreamsExhaustedError",
    "YamuxError",
    "YamuxProtocolError",
    "YamuxTimeoutError",
    "decodeHeader",
    "encodeHeader",
]

# --- wire constants ------------------------------------------------------------

PROTO_VERSION = 0

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

HEADER_SIZE = 12

#: Both ends assume this send window for a new stream, whatever their maximum.
INITIAL_STREAM_WINDOW = 256 * 1024

#: The header layout: version, type, flags, stream id, length; big-endian.
HEADER = struct.Struct(">BBHII")


class Header(NamedTuple):
    """One decoded 12-byte yamux header."""

    version: int
    type: int
    flags: int
    streamID: int
    length: int


def encodeHeader(msgType: int, flags: int, streamID: int, length: int) -> bytes:
    """The 12 bytes Go's ``header.encode`` writes (version is always 0)."""
    return HEADER.pack(PROTO_VERSION, msgType, flags, streamID, length)


def decodeHeader(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Decode the header at ``offset``; raises ``struct.error`` if short."""
    return Header(*HEADER.unpack_from(data, offset))


# --- errors ------------------------------------------------------------------


class YamuxError(Exception):
    """Base of the session-level yamux errors."""


class YamuxProtocolError(YamuxError):
    """The peer broke the protocol; we closed the session (after GoAway(1) where Go sends one)."""


class RemoteGoAwayError(YamuxError):
    """The peer sent GoAway(normal): it accepts no new streams.  Go's ErrRemoteGoAway text."""

    def __init__(self) -> None:
        super().__init__("remote end is not accepting connections")


class SessionShutdownError(YamuxError):
    """The session is closed.  Go's ErrSessionShutdown text."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("session shutdown" + (f": {detail}" if detail else ""))


class StreamsExhaustedError(YamuxError):
    """No stream ids are left on this session."""

    def __init__(self) -> None:
        super().__init__("streams exhausted")


class YamuxTimeoutError(YamuxError):
    """A ping got no answer within ConnectionWriteTimeout.  Go's ErrTimeout text."""

    def __init__(self) -> None:
        super().__init__("i/o deadline reached")


class KeepaliveTimeoutError(YamuxError):
    """A keep-alive ping went unanswered; the session was closed."""

    def __init__(self) -> None:
        super().__init__("keepalive timeout")


class StreamOpenTimeoutError(YamuxError):
    """A stream we opened was not ACKed in time; Go closes the whole session for this."""


class RemoteSessionError(YamuxError):
    """The peer sent a GoAway with an error code; the session is closed."""

    def __init__(self, code: int) -> None:
        text = {
            GO_AWAY_PROTOCOL_ERROR: "yamux protocol error",
            GO_AWAY_INTERNAL_ERROR: "remote yamux internal error",
        }.get(code, "unexpected go away received")
        super().__init__(f"{text} (GoAway code {code})")
        self.code = code


class StreamResetError(error.ConnectionLost):
    """The peer reset the stream (RST), e.g. its accept backlog was full or it had gone away."""

    MESSAGE = "yamux stream reset by the peer (connection reset)"


class StreamCloseTimeoutError(error.ConnectionLost):
    """We half-closed the stream and the peer never closed its side; we reset it."""

    MESSAGE = "yamux stream reset: the peer did not close its side in time"


class SessionClosedError(error.ConnectionLost):
    """The yamux session under the stream ended; the argument says why."""

    MESSAGE = "yamux session closed"
