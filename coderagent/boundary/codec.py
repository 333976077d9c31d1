"""The boundary socket's framing, as upstream's ``agent/boundarylogproxy/codec``.

Each frame is a big-endian ``uint32`` header, the tag in its top 8 bits and
the payload length in the low 24, then the payload:

* tag 1 (V1): a bare ``coder.agent.v2.ReportBoundaryLogsRequest``;
* tag 2 (V2): a ``BoundaryMessage`` envelope holding either ``logs`` (the same
  request) or ``status`` (boundary's own drop counters).

A payload may be up to 32768 bytes, that length included.  An unknown tag or
a longer length cannot be resynchronised (nothing marks where the next frame
starts), so it ends the connection; a payload that is not valid protobuf only
loses that frame.  Pure functions and a push parser; no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from google.protobuf.message import DecodeError

from coderagent.pb import agent_pb2, boundary_pb2

TAG_V1 = 1
TAG_V2 = 2

#: Upstream's MaxMessageSizeV1 (1 << 15); V2 uses the same limit.
MAX_PAYLOAD = 1 << 15

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


class FrameError(Exception):
    """The stream cannot be read any further (bad tag or length)."""

    #: The ``reason`` label this error counts under in the rejection metric.
    reason: ClassVar[str]


class UnsupportedTagError(FrameError):
    reason = "unsupported_tag"


class FrameTooLargeError(FrameError):
    reason = "too_large"


class MessageError(Exception):
    """One frame's payload could not be decoded; the stream goes on."""


@dataclass(frozen=True)
class Logs:
    """Audit logs to forward: the request, and its encoding to spool."""

    request: agent_pb2.ReportBoundaryLogsRequest
    encoded: bytes


@dataclass(frozen=True)
class Status:
    """Boundary's own drop counters (TagV2 ``status``); feeds metrics only."""

    droppedChannelFull: int
    droppedBatchFull: int


def encodeFrame(tag: int, payload: bytes) -> bytes:
    """One frame (what a boundary process writes)."""
    if not 0 <= tag <= 0xFF:
        raise ValueError(f"tag {tag} does not fit in 8 bits")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(tag << 24 | len(payload)) + payload


def decodePayload(tag: int, payload: bytes) -> Logs | Status | None:
    """Decode one frame's payload; ``None`` for a V2 envelope with nothing we know in it."""
    try:
        if tag == TAG_V1:
            request = agent_pb2.ReportBoundaryLogsRequest.FromString(payload)
            return Logs(request, payload)
        envelope = boundary_pb2.BoundaryMessage.FromString(payload)
    except DecodeError as e:
        raise MessageError(f"undecodable {_name(tag)} payload of {len(payload)} bytes: {e}") from e
    which = envelope.WhichOneof("msg")
    if which == "logs":
        return Logs(envelope.logs, envelope.logs.SerializeToString())
    if which == "status":
        return Status(envelope.status.dropped_channel_full, envelope.status.dropped_batch_full)
    return None


def _name(tag: int) -> str:
    return "ReportBoundaryLogsRequest" if tag == TAG_V1 else "BoundaryMessage"


class FrameParser:
    """Splits a byte stream into ``(tag, payload)`` frames.

    Holds at most one header and one payload (32 KiB): what a writer sends
    faster than frames complete costs it, not us.  At a bad header it stops
    for good: :attr:`error` says why, and the frames before it were returned.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Why the stream cannot be read any further, once it cannot.
        self.error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``, up to a bad header if there is one."""
        if self.error is not None:
            return []
        buf = self._buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (header,) = HEADER.unpack_from(buf, pos)
            tag, length = header >> 24, header & 0xFFFFFF
            if tag not in (TAG_V1, TAG_V2):
                self.error = UnsupportedTagError(f"unsupported tag: {tag}")
            elif length > MAX_PAYLOAD:
                self.error = FrameTooLargeError(
                    f"message too large: {length} bytes (at most {MAX_PAYLOAD})"
                )
            if self.error is not None:
                del buf[:]
                return frames
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append((tag, bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return frames
