"""The DRPC wire format (``storj.io/drpc``'s ``drpcwire``), byte for byte as Go writes it.

coderd and the Go agent speak drpc v0.0.33/v0.0.34; a Python peer is only
indistinguishable from a Go one if it writes the same bytes in the same write
boundaries (each write becomes one yamux Data frame).  This module is the part
of that which has no connection state: frames, packets, varints, the Error and
InvokeMetadata bodies and the buffering writer.  The client protocol is in
:mod:`coderagent.coderd.drpc`, the server (coderd-dev's) in
:mod:`coderagent.devcoderd.drpcserver`.  ``tests/golden/drpc_*.json`` hold
streams recorded from the Go library, which the tests compare against.

The format, and the Go details that matter:

* A frame is ``control | stream uvarint | message uvarint | len uvarint | data``;
  ``control = kind << 1 | done``, bit 7 is the *control flag*.  Varints are
  LEB128, at most 10 bytes ("varint too long" beyond; a 10th byte's excess bits
  are dropped, as Go's uint64 arithmetic does).
* A packet is the frames of one (stream, message) id; ``done`` marks the last.
  The reader starts at id (1, 1), rejects a lower id ("id monotonicity
  violation"; so stream 0 is never valid), a kind change within a packet
  ("packet kind change") and more than 4 MiB of packet data ("data overflow").
  A higher id simply starts a new packet, discarding an unfinished one.  Every
  frame carrying the control flag is skipped before those checks, Cancel
  included: the v0.0.33/34 reader ignores them all.
* The writer buffers frames and writes once 4096 bytes are buffered, or on the
  flush that follows every Message send, CloseSend, Close and Error; Invoke and
  InvokeMetadata are never flushed alone.  Hence a small unary call leaves as a
  single write (Invoke + Message + CloseSend), and a 150 000-byte one as writes
  of 65586, 65542, 18934 and 4 bytes.  :class:`FrameWriter` reproduces this.
* Data is split into frames of at most 64 KiB (same message id, ``done`` only
  on the last); an empty message is one zero-length frame.  Error, Close and
  CloseSend packets are written as one frame, however long.
* An Error body is an 8-byte big-endian code and the text; an InvokeMetadata
  body is a protobuf ``map<string, string>``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet.interfaces import ITransport

__all__ = [
    "DEFAULT_MAX_BUFFER_SIZE",
    "DEFAULT_SPLIT_SIZE",
    "WRITER_BUFFER_SIZE",
    "DRPCError",
    "Frame",
    "FrameParser",
    "FrameWriter",
    "IncompleteError",
    "Kind",
    "Packet",
    "PacketAssembler",
    "ProtocolError",
    "decodeMetadata",
    "decodeVarint",
    "encodeFrame",
    "encodeMetadata",
    "encodeVarint",
    "kindName",
    "marshalError",
    "splitFrames",
    "splitPacket",
    "unmarshalError",
]

#: drpcwire.SplitData's default frame size.
DEFAULT_SPLIT_SIZE = 64 * 1024
#: coder's ``Reader.MaximumBufferSize`` (also drpc's default).
DEFAULT_MAX_BUFFER_SIZE = 4 << 20
#: drpcwire.NewWriter's default buffer size: a write happens once this much is buffered.
WRITER_BUFFER_SIZE = 4096

_MAX_UINT64 = (1 << 64) - 1
_CODE = struct.Struct(">Q")


class Kind(enum.IntEnum):
    """Packet kinds (``drpcwire.Kind``); 0 is reserved."""

    INVOKE = 1
    MESSAGE = 2
    ERROR = 3
    CANCEL = 4
    CLOSE = 5
    CLOSE_SEND = 6
    INVOKE_METADATA = 7


_KIND_NAMES = {
    1: "Invoke",
    2: "Message",
    3: "Error",
    4: "Cancel",
    5: "Close",
    6: "CloseSend",
    7: "InvokeMetadata",
}


def kindName(kind: int) -> str:
    """The name Go's stringer gives a kind, for error texts that match Go's."""
    return _KIND_NAMES.get(kind, f"Kind({kind})")


# --- errors --------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the drpc wire protocol; Go closes the connection on these."""


class IncompleteError(Exception):
    """More bytes are needed to decode a varint (not an error of the peer)."""


class DRPCError(Exception):
    """An Error packet: what the remote handler failed with, and its code.

    Handlers raise it to choose the code (Go's ``drpcerr.WithCode``); clients
    receive it for a server's Error packet.  ``message`` alone is what goes on
    the wire; ``str()`` adds the code so that logs show both.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (drpc error code {self.code})"


# --- varints and frames ----------------------------------------------------------


def encodeVarint(n: int) -> bytes:
    """LEB128, as ``drpcwire.AppendVarint``; ``n`` must fit a uint64."""
    if n < 0 or n > _MAX_UINT64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decodeVarint(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """``(value, offset after it)``, as ``drpcwire.ReadVarint``.

    Raises :class:`IncompleteError` if ``buf`` ends first and
    :class:`ProtocolError` ("varint too long") if ten bytes all carry the
    continuation bit.  Like Go, bits beyond 64 in a 10th byte are dropped.
    """
    value = 0
    pos = offset
    end = len(buf)
    for shift in range(0, 64, 7):
        if pos >= end:
            raise IncompleteError()
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & _MAX_UINT64, pos
    raise ProtocolError("varint too long")


@dataclass(frozen=True)
class Frame:
    """One frame on the wire (``drpcwire.Frame``); ``kind`` may be any 0-63 value."""

    kind: int
    streamID: int
    messageID: int
    data: bytes = b""
    done: bool = True
    control: bool = False


@dataclass(frozen=True)
class Packet:
    """The reassembled frames of one (stream, message) id (``drpcwire.Packet``)."""

    kind: int
    streamID: int
    messageID: int
    data: bytes


def encodeFrame(frame: Frame) -> bytes:
    """The bytes of ``frame``, as ``drpcwire.AppendFrame``."""
    if not 0 <= frame.kind <= 0x3F:
        raise ValueError(f"frame kind out of range: {frame.kind}")
    control = frame.kind << 1
    if frame.done:
        control |= 0x01
    if frame.control:
        control |= 0x80
    return b"".join(
        (
            bytes((control,)),
            encodeVarint(frame.streamID),
            encodeVarint(frame.messageID),
            encodeVarint(len(frame.data)),
            frame.data,
        )
    )


def splitFrames(
    kind: int, streamID: int, messageID: int, data: bytes, maxFrame: int = DEFAULT_SPLIT_SIZE
) -> list[Frame]:
    """``drpcwire.SplitData`` applied as ``rawWriteLocked`` does: 0 means 64 KiB, < 0 no split."""
    if maxFrame == 0:
        maxFrame = DEFAULT_SPLIT_SIZE
    if maxFrame < 0 or len(data) <= maxFrame:
        return [Frame(kind, streamID, messageID, data, True)]
    frames = []
    view = memoryview(data)
    pos = 0
    while True:
        chunk = bytes(view[pos : pos + maxFrame])
        pos += len(chunk)
        done = pos >= len(data)
        frames.append(Frame(kind, streamID, messageID, chunk, done))
        if done:
            return frames


def splitPacket(
    kind: int, streamID: int, messageID: int, data: bytes, maxFrame: int = DEFAULT_SPLIT_SIZE
) -> bytes:
    """The frames the Go writer emits for one packet, concatenated."""
    return b"".join(encodeFrame(f) for f in splitFrames(kind, streamID, messageID, data, maxFrame))


class FrameParser:
    """Incremental frame decoder (``drpcwire.ParseFrame`` over a stream of bytes).

    ``push`` buffers bytes and ``pop`` returns the next complete frame or
    ``None``; ``feed`` does both.  A frame declaring more data than
    ``maxFrameSize`` is "data overflow" as soon as its header is in (Go only
    notices once that much is buffered; the outcome is the same, without
    buffering it).  After a :class:`ProtocolError` the parser stays failed.
    """

    def __init__(self, maxFrameSize: int | None = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._maxFrameSize = maxFrameSize
        self._buf = bytearray()
        self._pos = 0
        # (control byte, stream id, message id, data length, data start) of a
        # frame whose header is parsed but whose data is not all in yet.
        self._header: tuple[int, int, int, int, int] | None = None
        self._error: ProtocolError | None = None

    def push(self, data: bytes) -> None:
        """Buffer ``data`` without parsing it."""
        pos = self._pos
        if pos:
            del self._buf[:pos]
            self._pos = 0
            if self._header is not None:
                control, sid, mid, length, start = self._header
                self._header = (control, sid, mid, length, start - pos)
        self._buf += data

    def pop(self) -> Frame | None:
        """The next complete frame, or ``None`` until more bytes arrive."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        header = self._header
        if header is None:
            pos = self._pos
            if len(buf) - pos < 4:  # Go's ParseFrame wants 4 bytes before looking
                return None
            try:
                sid, p = decodeVarint(buf, pos + 1)
                mid, p = decodeVarint(buf, p)
                length, p = decodeVarint(buf, p)
            except IncompleteError:
                return None
            except ProtocolError as e:
                self._error = e
                raise
            if self._maxFrameSize is not None and length > self._maxFrameSize:
                self._error = ProtocolError("data overflow")
                raise self._error
            header = self._header = (buf[pos], sid, mid, length, p)
        control, sid, mid, length, start = header
        end = start + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            data = bytes(view[start:end])
        self._header = None
        self._pos = end
        return Frame(
            kind=(control & 0x7E) >> 1,
            streamID=sid,
            messageID=mid,
            data=data,
            done=bool(control & 0x01),
            control=bool(control & 0x80),
        )

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame completed by ``data``; raises :class:`ProtocolError` on malformed input."""
        self.push(data)
        frames = []
        while (frame := self.pop()) is not None:
            frames.append(frame)
        return frames


class PacketAssembler:
    """Frames to packets with the checks of ``drpcwire.Reader.ReadPacketUsing``."""

    def __init__(self, maxBufferSize: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        self._max = maxBufferSize
        self._id = (1, 1)  # Go's reader starts here: stream 0 is a violation
        self._kind = 0
        self._open = False  # a packet is being assembled
        self._data = bytearray()

    def add(self, frame: Frame) -> Packet | None:
        """Take one frame; the packet it completes, if any."""
        if frame.control:
            return None  # reserved for future use; every current reader skips it
        fid = (frame.streamID, frame.messageID)
        if fid < self._id:
            raise ProtocolError("id monotonicity violation")
        if fid != self._id or not self._open:
            # A new id abandons whatever was being assembled.
            self._id = fid
            self._kind = frame.kind
            self._open = True
            self._data = bytearray()
        elif frame.kind != self._kind:
            raise ProtocolError("packet kind change")
        self._data += frame.data
        if len(self._data) > self._max:
            raise ProtocolError("data overflow")
        if not frame.done:
            return None
        packet = Packet(self._kind, fid[0], fid[1], bytes(self._data))
        self._id = (fid[0], fid[1] + 1)  # the same id may not be reused
        self._open = False
        self._data = bytearray()
        return packet

    def feed(self, frames: list[Frame]) -> list[Packet]:
        """Every packet completed by ``frames``."""
        packets = []
        for frame in frames:
            packet = self.add(frame)
            if packet is not None:
                packets.append(packet)
        return packets


# --- bodies: errors and metadata --------------------------------------------------


def marshalError(code: int, message: str) -> bytes:
    """An Error body (``drpcwire.MarshalError``): 8-byte big-endian code, then the text."""
    return _CODE.pack(code & _MAX_UINT64) + message.encode("utf-8", "surrogateescape")


def unmarshalError(data: bytes) -> DRPCError:
    """``drpcwire.UnmarshalError``, including its note for a body shorter than 8 bytes."""
    if len(data) < 8:
        text = data.decode("utf-8", "replace")
        return DRPCError(0, f"{text} (drpcwire note: invalid error data)")
    return DRPCError(_CODE.unpack_from(data)[0], data[8:].decode("utf-8", "replace"))


def _encodedStringSize(n: int) -> int:
    return 1 + len(encodeVarint(n)) + n


def encodeMetadata(metadata: Mapping[str, str]) -> bytes:
    """The InvokeMetadata body: a protobuf ``map<string, string>``, as drpcmetadata writes it.

    Each entry is ``0a len {0a len key 12 len value}``, key and value always
    present.  Go iterates its map in random order; we keep the mapping's.
    """
    out = bytearray()
    for key, value in metadata.items():
        k = key.encode("utf-8")
        v = value.encode("utf-8")
        out.append(0x0A)
        out += encodeVarint(_encodedStringSize(len(k)) + _encodedStringSize(len(v)))
        out.append(0x0A)
        out += encodeVarint(len(k))
        out += k
        out.append(0x12)
        out += encodeVarint(len(v))
        out += v
    return bytes(out)


def _readField(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos >= len(buf) or buf[pos] != tag:
        raise ProtocolError("invalid metadata")
    try:
        length, pos = decodeVarint(buf, pos + 1)
    except IncompleteError:
        raise ProtocolError("invalid metadata") from None
    if length > len(buf) - pos:
        raise ProtocolError("invalid metadata")
    return buf[pos : pos + length], pos + length


def decodeMetadata(data: bytes) -> dict[str, str]:
    """Parse an InvokeMetadata body, as strictly as drpcmetadata's ``readEntry``.

    Every entry must be field 1 holding exactly field 1 (key) then field 2
    (value); anything else is a :class:`ProtocolError`.  A repeated key keeps
    the last value, as a Go map would.
    """
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        entry, pos = _readField(data, pos, 0x0A)
        key, p = _readField(entry, 0, 0x0A)
        value, p = _readField(entry, p, 0x12)
        if p != len(entry):
            raise ProtocolError("invalid metadata")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return out


# --- the writer ----------------------------------------------------------------------


class FrameWriter:
    """``drpcwire.Writer``: frames are buffered and written once 4096 bytes are
    buffered or on an explicit flush, so that write boundaries (and therefore
    yamux Data frames) are the ones Go produces.  One per connection; the
    client and server protocols decide when to flush."""

    def __init__(self, transport: ITransport, size: int = WRITER_BUFFER_SIZE) -> None:
        self._transport = transport
        self._size = size
        self._buf = bytearray()

    def writeFrame(self, frame: Frame) -> None:
        self._buf += encodeFrame(frame)
        if len(self._buf) >= self._size:
            self._emit()

    def flush(self) -> None:
        if self._buf:
            self._emit()

    def reset(self) -> None:
        """A new stream starts with an empty buffer, as drpcstream does."""
        self._buf.clear()

    def _emit(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        self._transport.write(data)

