"""DRPC (``storj.io/drpc``) as coderd and the Go agent speak it, on Twisted.

coderd serves the agent API with drpc over yamux streams, one drpc connection
per stream, one unary call per connection (coder's ``drpcsdk``).  A Python
agent is only indistinguishable from the Go one if it writes the same bytes,
in the same write boundaries (each write becomes one yamux Data frame), and
reacts to what it reads as the Go library does.  This module therefore mirrors
drpc v0.0.33/v0.0.34 (``drpcwire``, ``drpcstream``, ``drpcmanager``,
``drpcconn``, ``drpcserver``/``drpcmux``) rather than "a drpc"; the golden
streams in ``shared/vectors/drpc_*.json`` were recorded from the Go library and
``tests/test_drpc.py`` compares against them.

Wire format, and the Go details that matter:

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
  of 65586, 65542, 18934 and 4 bytes.  :class:`_FrameWriter` reproduces this.
* Data is split into frames of at most 64 KiB (same message id, ``done`` only
  on the last); an empty message is one zero-length frame.  Error, Close and
  CloseSend packets are written as one frame, however long.
* Each sender numbers its packets per stream from 1; a client's streams are
  numbered from 1 per connection, each one the previous + 1.
* Unary call: the client sends [InvokeMetadata], Invoke, Message, CloseSend.
  The server answers Message then CloseSend (an empty response is a
  zero-length Message; only a nil one is CloseSend alone, which the client
  reports as EOF), or an Error whose body is an 8-byte big-endian code and the
  text.  After a Message response the Go client sends Close (kind 5, its next
  message id); ``drpcconn.Invoke`` does so whenever its stream is not yet
  terminated, which is almost always, so we always do.  No Close follows an
  Error or a nil response.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.gotext import goQuote

__all__ = [
    "DEFAULT_MAX_BUFFER_SIZE",
    "DEFAULT_SPLIT_SIZE",
    "WRITER_BUFFER_SIZE",
    "DRPCCanceledError",
    "DRPCClientProtocol",
    "DRPCConnectionLost",
    "DRPCEOFError",
    "DRPCError",
    "DRPCServerProtocol",
    "Frame",
    "FrameParser",
    "Handler",
    "HandlerResult",
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
    "marshalError",
    "splitPacket",
    "unmarshalError",
]

_log = Logger()

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


def _kindName(kind: int) -> str:
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


class DRPCEOFError(EOFError):
    """The server closed the stream without a response (Go's ``io.EOF``).

    This is what a Go client gets when a handler returns a nil response, which
    goes on the wire as CloseSend without a Message.
    """

    def __init__(self) -> None:
        super().__init__("EOF")


class DRPCCanceledError(Exception):
    """The stream was canceled (Go's ``context.Canceled``)."""

    def __init__(self) -> None:
        super().__init__("context canceled")


class DRPCConnectionLost(error.ConnectionLost):
    """The connection ended before the call completed."""


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


def _splitFrames(
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
    return b"".join(encodeFrame(f) for f in _splitFrames(kind, streamID, messageID, data, maxFrame))


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


# --- the shared connection machinery ----------------------------------------------


class _FrameWriter:
    """``drpcwire.Writer``: frames are buffered and written once 4096 bytes are
    buffered or on an explicit flush, so that write boundaries (and therefore
    yamux Data frames) are the ones Go produces."""

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


class _DRPCProtocol(Protocol):
    """What client and server share: Go's reader loop and its stalls.

    drpcmanager reads packets one by one and hands each to the current stream.
    When a packet can only be delivered to a stream that does not exist yet,
    Go's reader waits, without reading further.  A wait that can end is a
    *stall* (the transport is paused and input buffered); one that cannot end
    in Go (it would need the reader itself to move on) makes us discard all
    further input, where Go simply stops reading.
    """

    def __init__(self, maxBufferSize: int, splitSize: int) -> None:
        self._parser = FrameParser(maxFrameSize=maxBufferSize)
        self._assembler = PacketAssembler(maxBufferSize)
        self._splitSize = splitSize
        self._writer: _FrameWriter | None = None
        self._dead = False  # fatal error or connection gone: input is ignored
        self._deaf = False  # stalled for good: input is discarded
        self._stalled = False
        self._reading = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._writer = _FrameWriter(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._dead or self._deaf:
            return
        self._parser.push(data)
        self._readPackets()

    def _readPackets(self) -> None:
        if self._reading:
            return  # the loop further up the stack carries on
        self._reading = True
        try:
            while not (self._stalled or self._dead or self._deaf):
                try:
                    frame = self._parser.pop()
                    if frame is None:
                        return
                    packet = self._assembler.add(frame)
                except ProtocolError as e:
                    self._fatal(e)
                    return
                if packet is not None:
                    self._dispatch(packet)
        finally:
            self._reading = False

    def _dispatch(self, packet: Packet) -> None:
        raise NotImplementedError

    def _fatal(self, exc: Exception) -> None:
        """Go's manager terminates and closes the transport."""
        raise NotImplementedError

    def _writePacket(self, kind: Kind, streamID: int, messageID: int, data: bytes) -> None:
        """``rawWriteLocked``: split, buffer, write on the 4096-byte threshold only."""
        assert self._writer is not None
        for frame in _splitFrames(kind, streamID, messageID, data, self._splitSize):
            self._writer.writeFrame(frame)

    def _sendSingle(self, kind: Kind, streamID: int, messageID: int, data: bytes = b"") -> None:
        """``sendPacketLocked``: one unsplit frame, then a flush."""
        assert self._writer is not None
        self._writer.writeFrame(Frame(kind, streamID, messageID, data, True))
        self._writer.flush()

    def _stall(self) -> None:
        self._stalled = True
        transport = self.transport
        if transport is not None and IPushProducer.providedBy(transport):
            cast(IPushProducer, transport).pauseProducing()

    def _unstall(self) -> None:
        self._stalled = False
        transport = self.transport
        if transport is not None and IPushProducer.providedBy(transport) and not self._dead:
            cast(IPushProducer, transport).resumeProducing()

    def _loseConnection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


# --- client ------------------------------------------------------------------------


class _Call:
    __slots__ = ("deferred", "done", "messageID", "metadata", "method", "request", "streamID")

    def __init__(self, method: bytes, request: bytes, metadata: dict[str, str] | None) -> None:
        self.method = method
        self.request = request
        self.metadata = metadata
        self.deferred: Deferred[bytes] | None = None
        self.streamID = 0
        self.messageID = 0
        self.done = False

    def nextID(self) -> int:
        self.messageID += 1
        return self.messageID


class DRPCClientProtocol(_DRPCProtocol):
    """Client side of one DRPC connection carrying unary calls.

    coder opens one connection (a yamux stream) per call and closes it once
    the call is done: call :meth:`invoke`, then ``transport.loseConnection()``
    when its Deferred fires.  Several calls on one connection work too; like
    Go's semaphore, a call made while another is in progress waits for it, and
    each uses the next stream id.

    Cancelling an invoke's Deferred while it is on the wire closes the
    connection, as Go does for a canceled context without SoftCancel.
    """

    def __init__(
        self,
        *,
        maxBufferSize: int = DEFAULT_MAX_BUFFER_SIZE,
        splitSize: int = DEFAULT_SPLIT_SIZE,
    ) -> None:
        super().__init__(maxBufferSize, splitSize)
        self._lastStreamID = 0
        self._active: _Call | None = None
        self._queue: deque[_Call] = deque()
        self._failure: Exception | None = None
        self._held: Packet | None = None

    def invoke(
        self, method: str, request: bytes, metadata: Mapping[str, str] | None = None
    ) -> Deferred[bytes]:
        """Call ``method`` (e.g. ``"/coder.agent.v2.Agent/ReportBoundaryLogs"``).

        ``request`` is the serialized request message; the Deferred fires with
        the serialized response, or fails with :class:`DRPCError` (the server's
        Error packet), :class:`DRPCEOFError` (no response: a nil one),
        :class:`ProtocolError` (the server broke the protocol, e.g. a response
        over 4 MiB) or :class:`DRPCConnectionLost`.  Metadata, if non-empty,
        goes first in an InvokeMetadata packet.
        """
        if self._failure is not None:
            return fail(self._failure)
        call = _Call(method.encode("utf-8"), bytes(request), dict(metadata) if metadata else None)
        d: Deferred[bytes] = Deferred(lambda _: self._cancelCall(call))
        call.deferred = d
        self._queue.append(call)
        self._startNext()
        return d

    # -- Protocol -----------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._startNext()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._dead = True
        if self._failure is None:
            self._failure = DRPCConnectionLost(
                f"drpc connection closed before the call completed: {reason.getErrorMessage()}"
            )
        self._failAll(self._failure)

    # -- calls ----------------------------------------------------------------------

    def _startNext(self) -> None:
        if (
            self._active is not None
            or not self._queue
            or self._writer is None
            or self._failure is not None
        ):
            return
        self._begin(self._queue.popleft())

    def _begin(self, call: _Call) -> None:
        """``drpcconn.Invoke`` up to MsgRecv: everything leaves in CloseSend's flush."""
        assert self._writer is not None
        streamID = self._lastStreamID + 1
        self._lastStreamID = streamID
        call.streamID = streamID
        self._active = call
        self._writer.reset()
        if call.metadata:
            self._writePacket(
                Kind.INVOKE_METADATA, streamID, call.nextID(), encodeMetadata(call.metadata)
            )
        self._writePacket(Kind.INVOKE, streamID, call.nextID(), call.method)
        self._writePacket(Kind.MESSAGE, streamID, call.nextID(), call.request)
        self._sendSingle(Kind.CLOSE_SEND, streamID, call.nextID())
        held = self._held
        if held is not None and self._stalled:
            # Go's reader was waiting for a newer stream: it looks again.
            self._held = None
            self._unstall()
            self._dispatch(held)
            self._readPackets()

    def _complete(self, call: _Call, result: bytes | None, exc: Exception | None) -> None:
        call.done = True
        if self._active is call:
            self._active = None
        self._startNext()
        d = call.deferred
        assert d is not None
        if exc is not None:
            d.errback(exc)
        else:
            assert result is not None
            d.callback(result)

    def _cancelCall(self, call: _Call) -> None:
        """Deferred canceller; the Deferred itself then fails with CancelledError."""
        if call.done:
            return
        call.done = True
        if call in self._queue:
            self._queue.remove(call)  # still waiting for its turn: nothing was sent
            return
        if call is self._active:
            # No SoftCancel: an unfinished stream is canceled by closing the transport.
            self._active = None
            self._dead = True
            self._failure = DRPCCanceledError()
            self._failAll(self._failure)
            self._loseConnection()

    def _failAll(self, exc: Exception) -> None:
        calls = list(self._queue)
        self._queue.clear()
        active = self._active
        if active is not None:
            self._active = None
            calls.insert(0, active)
        for call in calls:
            if not call.done:
                call.done = True
                assert call.deferred is not None
                call.deferred.errback(exc)

    def _fatal(self, exc: Exception) -> None:
        if self._dead:
            return
        _log.warn("drpc client: {error}; closing the connection", error=exc)
        self._dead = True
        self._failure = exc
        self._failAll(exc)
        self._loseConnection()

    # -- incoming packets (drpcmanager.manageReader, client side) ----------------------

    def _dispatch(self, packet: Packet) -> None:
        while True:
            current = self._lastStreamID
            if current and packet.streamID == current:
                self._handle(packet)
                return
            if current and packet.streamID < current:
                return  # an old stream's leftovers, e.g. the CloseSend after our Close
            # A packet for a stream we have not started: Go cancels the current
            # stream and waits for a newer one (forever, for an Invoke).
            active = self._active
            if active is not None:
                self._complete(active, None, DRPCCanceledError())
            if packet.kind in (Kind.INVOKE, Kind.INVOKE_METADATA):
                _log.warn(
                    "drpc client: the server sent {kind}; ignoring it from now on",
                    kind=_kindName(packet.kind),
                )
                self._deaf = True
                return
            if self._lastStreamID != current:
                continue  # the cancel let a waiting call start a new stream
            self._held = packet
            self._stall()
            return

    def _handle(self, packet: Packet) -> None:
        """``drpcstream.HandlePacket`` plus what ``Invoke`` does with the outcome."""
        call = self._active
        if call is None or call.streamID != packet.streamID:
            return  # that stream is finished: Go ignores its packets
        kind = packet.kind
        if kind == Kind.MESSAGE:
            # Invoke returns with the response; its deferred stream.Close() finds
            # the stream still open (the server's CloseSend is not processed
            # yet in Go, almost always) and sends Close.
            self._sendSingle(Kind.CLOSE, call.streamID, call.nextID())
            self._complete(call, packet.data, None)
        elif kind == Kind.ERROR:
            self._complete(call, None, unmarshalError(packet.data))
        elif kind in (Kind.CLOSE, Kind.CLOSE_SEND):
            self._complete(call, None, DRPCEOFError())
        elif kind == Kind.CANCEL:
            self._complete(call, None, DRPCCanceledError())
        elif kind == Kind.INVOKE:
            self._fatal(ProtocolError("invoke on existing stream"))
        else:
            self._fatal(ProtocolError(f"unknown packet kind: {_kindName(kind)}"))


# --- server ------------------------------------------------------------------------

HandlerResult = bytes | None | Deferred[bytes] | Deferred[bytes | None]
#: ``handler(request)``, or ``handler(request, metadata)`` with ``passMetadata``.
Handler = Callable[..., HandlerResult]


class _ServerStream:
    __slots__ = (
        "awaiting",
        "deferred",
        "handler",
        "messageID",
        "metadata",
        "method",
        "recvClosed",
        "sendClosed",
        "streamID",
        "terminated",
    )

    def __init__(self, streamID: int, method: bytes, metadata: dict[str, str]) -> None:
        self.streamID = streamID
        self.method = method
        self.metadata = metadata
        self.handler: Handler | None = None
        self.messageID = 0
        self.awaiting = False  # waiting for the request Message
        self.deferred: Deferred[Any] | None = None  # the running handler
        self.recvClosed = False
        self.sendClosed = False
        self.terminated = False

    def nextID(self) -> int:
        self.messageID += 1
        return self.messageID


class DRPCServerProtocol(_DRPCProtocol):
    """Server side of one DRPC connection: ``drpcserver.ServeOne`` with a ``drpcmux``.

    ``handlers`` maps full method names to callables taking the request bytes
    (and, with ``passMetadata``, the invoke metadata as a dict) and returning
    the response bytes, or a Deferred of them.  ``b""`` is a non-nil empty
    response (a zero-length Message, what coderd returns); ``None`` is Go's nil
    response (CloseSend alone; a Go client sees EOF).  Raising
    :class:`DRPCError` sends its code and message; any other exception is
    code 0 with ``str(exc)``.  An unknown method is answered at once with code
    0 and ``protocol error: unknown rpc: "<name>"``.

    Like Go, if the client's stream ends (Close, Error, or a new Invoke)
    while a handler's Deferred is pending, that Deferred is cancelled and
    whatever it produces is dropped.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        passMetadata: bool = False,
        maxBufferSize: int = DEFAULT_MAX_BUFFER_SIZE,
        splitSize: int = DEFAULT_SPLIT_SIZE,
    ) -> None:
        super().__init__(maxBufferSize, splitSize)
        self._handlers = dict(handlers)
        self._passMetadata = passMetadata
        self._stream: _ServerStream | None = None
        self._busy = False  # Go's HandleRPC has not returned yet
        self._held: Packet | None = None  # an Invoke waiting for HandleRPC to return
        # NewServerStream's state between an InvokeMetadata and its Invoke
        self._metadata: dict[str, str] | None = None
        self._metadataStream = 0

    # -- Protocol -----------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._dead = True
        stream = self._stream
        if stream is not None and not stream.terminated:
            self._terminate(stream)

    def _fatal(self, exc: Exception) -> None:
        if self._dead:
            return
        _log.warn("drpc server: {error}; closing the connection", error=exc)
        self._dead = True
        stream = self._stream
        if stream is not None and not stream.terminated:
            self._terminate(stream)
        self._loseConnection()

    # -- incoming packets (drpcmanager.manageReader, server side) ----------------------

    def _dispatch(self, packet: Packet) -> None:
        stream = self._stream
        if stream is not None and packet.streamID == stream.streamID:
            self._handle(stream, packet)
            return
        if stream is not None and packet.streamID < stream.streamID:
            return
        if stream is not None and not stream.terminated:
            self._terminate(stream)  # a newer stream implicitly cancels this one
        if packet.kind in (Kind.INVOKE, Kind.INVOKE_METADATA):
            if self._busy:
                self._held = packet  # Go's reader waits until HandleRPC returns
                self._stall()
                return
            self._accept(packet)
            return
        # Go's reader now waits for a stream only it could start: stuck for good.
        _log.warn(
            "drpc server: {kind} for stream {stream} before its Invoke; ignoring the rest",
            kind=_kindName(packet.kind),
            stream=packet.streamID,
        )
        self._deaf = True

    def _accept(self, packet: Packet) -> None:
        """``NewServerStream``: collect metadata, start a stream on Invoke."""
        if packet.kind == Kind.INVOKE_METADATA:
            try:
                self._metadata = decodeMetadata(packet.data)
            except ProtocolError as e:
                self._fatal(e)
                return
            self._metadataStream = packet.streamID
            return
        metadata = self._metadata if self._metadataStream == packet.streamID else None
        self._metadata = None
        self._metadataStream = 0
        stream = _ServerStream(packet.streamID, packet.data, metadata or {})
        self._stream = stream
        assert self._writer is not None
        self._writer.reset()
        self._handleRPC(stream)

    def _handleRPC(self, stream: _ServerStream) -> None:
        try:
            handler = self._handlers.get(stream.method.decode("utf-8"))
        except UnicodeDecodeError:
            handler = None
        if handler is None:
            # drpcmux fails before reading the request.
            self._sendError(stream, 0, "protocol error: unknown rpc: " + goQuote(stream.method))
            return
        stream.handler = handler
        stream.awaiting = True
        self._busy = True

    def _handle(self, stream: _ServerStream, packet: Packet) -> None:
        """``drpcstream.HandlePacket`` for the current server stream."""
        if stream.terminated:
            return
        kind = packet.kind
        if kind == Kind.MESSAGE:
            if stream.awaiting:
                stream.awaiting = False
                self._runHandler(stream, packet.data)
            return  # a unary handler reads one message; later ones are dropped
        if kind == Kind.CLOSE_SEND:
            stream.recvClosed = True
            if stream.awaiting:
                # MsgRecv returns io.EOF, which the server sends back as an error.
                stream.awaiting = False
                self._sendError(stream, 0, "EOF")
                self._rpcReturned()
            elif stream.sendClosed:
                stream.terminated = True
            return
        if kind in (Kind.CLOSE, Kind.ERROR, Kind.CANCEL):
            self._terminate(stream)
            return
        if kind == Kind.INVOKE:
            self._fatal(ProtocolError("invoke on existing stream"))
            return
        self._fatal(ProtocolError(f"unknown packet kind: {_kindName(kind)}"))

    def _terminate(self, stream: _ServerStream) -> None:
        """The stream is over: nothing more is sent on it; a running handler is cancelled."""
        stream.terminated = True
        if stream.awaiting:
            stream.awaiting = False
            self._rpcReturned()
        d = stream.deferred
        if d is not None:
            d.cancel()

    # -- the handler ------------------------------------------------------------------

    def _runHandler(self, stream: _ServerStream, request: bytes) -> None:
        handler = stream.handler
        assert handler is not None
        if self._passMetadata:
            d = maybeDeferred(handler, request, stream.metadata)
        else:
            d = maybeDeferred(handler, request)
        stream.deferred = d
        d.addBoth(self._handlerDone, stream)

    def _handlerDone(self, result: object, stream: _ServerStream) -> None:
        stream.deferred = None
        if stream.terminated:
            if isinstance(result, Failure) and not result.check(CancelledError):
                _log.debug("drpc server: dropped {error} of a finished stream", error=result.value)
        elif isinstance(result, Failure):
            exc = result.value
            if isinstance(exc, DRPCError):
                self._sendError(stream, exc.code, exc.message)
            else:
                _log.debug(
                    "drpc server: {method} failed: {error}",
                    method=stream.method.decode("utf-8", "replace"),
                    error=exc,
                )
                self._sendError(stream, 0, str(exc))
        elif result is None:
            self._sendCloseSend(stream)
        elif isinstance(result, bytes | bytearray | memoryview):
            self._writePacket(Kind.MESSAGE, stream.streamID, stream.nextID(), bytes(result))
            assert self._writer is not None
            self._writer.flush()
            self._sendCloseSend(stream)
        else:
            self._sendError(stream, 0, f"drpc handler returned {type(result).__name__}, not bytes")
        self._rpcReturned()

    def _rpcReturned(self) -> None:
        """HandleRPC returned: the next Invoke, if the reader is waiting with one, proceeds."""
        self._busy = False
        held = self._held
        if held is not None and self._stalled:
            self._held = None
            self._unstall()
            self._accept(held)
            self._readPackets()

    # -- sending ------------------------------------------------------------------------

    def _sendCloseSend(self, stream: _ServerStream) -> None:
        if stream.sendClosed or stream.terminated or self._dead:
            return
        self._sendSingle(Kind.CLOSE_SEND, stream.streamID, stream.nextID())
        stream.sendClosed = True
        if stream.recvClosed:
            stream.terminated = True

    def _sendError(self, stream: _ServerStream, code: int, message: str) -> None:
        if stream.terminated or self._dead:
            return
        stream.terminated = True
        self._sendSingle(Kind.ERROR, stream.streamID, stream.nextID(), marshalError(code, message))
