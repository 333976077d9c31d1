"""DRPC (``storj.io/drpc``) as the Go agent speaks it to coderd: the client, on Twisted.

coderd serves the agent API with drpc over yamux streams, one drpc connection
per stream, one unary call per connection (coder's ``drpcsdk``).  The bytes
themselves are :mod:`coderagent.coderd.drpcwire`'s; this module is what a
connection does with them, mirroring drpc v0.0.33/v0.0.34 (``drpcstream``,
``drpcmanager``, ``drpcconn``) rather than "a drpc", so that coderd cannot tell
us from the Go agent.  :class:`DRPCProtocol` is what both ends share (Go's
reader loop and its stalls); coderd-dev's server side builds on it in
:mod:`coderagent.devcoderd.drpcserver`.

The conversation, and the Go details that matter:

* Each sender numbers its packets per stream from 1; a client's streams are
  numbered from 1 per connection, each one the previous + 1.
* Unary call: the client sends [InvokeMetadata], Invoke, Message, CloseSend,
  in one write unless the request is large (the writer flushes only on
  CloseSend).  The server answers Message then CloseSend (an empty response
  is a zero-length Message; only a nil one is CloseSend alone, which the
  client reports as EOF), or an Error whose body is an 8-byte big-endian code
  and the text.  After a Message response the Go client sends Close (kind 5,
  its next message id); ``drpcconn.Invoke`` does so whenever its stream is
  not yet terminated, which is almost always, so we always do.  No Close
  follows an Error or a nil response.
* When a connection is finished (a protocol error, a cancelled call), Go's
  manager closes the transport and its reader stops.  Our protocols cannot
  half-close, so a yamux stream they close reads nothing more either: the
  peer is credited no more window, as with Go.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import cast

from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.drpcwire import (
    DEFAULT_MAX_BUFFER_SIZE,
    DEFAULT_SPLIT_SIZE,
    DRPCError,
    Frame,
    FrameParser,
    FrameWriter,
    Kind,
    Packet,
    PacketAssembler,
    ProtocolError,
    encodeMetadata,
    kindName,
    splitFrames,
    unmarshalError,
)

__all__ = [
    "DRPCCanceledError",
    "DRPCClientProtocol",
    "DRPCConnectionLost",
    "DRPCEOFError",
    "DRPCError",
    "DRPCProtocol",
    "ProtocolError",
]

_log = Logger()


# --- what a call fails with (and drpcwire's DRPCError and ProtocolError, re-exported) -


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


# --- the shared connection machinery ----------------------------------------------


class DRPCProtocol(Protocol):
    """What client and server share: Go's reader loop and its stalls.

    drpcmanager reads packets one by one and hands each to the current stream.
    When a packet can only be delivered to a stream that does not exist yet,
    Go's reader waits, without reading further.  A wait that can end is a
    *stall* (the transport is paused and input buffered); one that cannot end
    in Go (it would need the reader itself to move on) makes us discard all
    further input, where Go simply stops reading.

    Subclasses handle each packet in ``_dispatch`` and a broken connection in
    ``_fatal``.  They do not provide ``IHalfCloseableProtocol``: like Go's
    manager, a connection that closes its transport reads nothing more.
    """

    def __init__(self, maxBufferSize: int, splitSize: int) -> None:
        self._parser = FrameParser(maxFrameSize=maxBufferSize)
        self._assembler = PacketAssembler(maxBufferSize)
        self._splitSize = splitSize
        self._writer: FrameWriter | None = None
        self._dead = False  # fatal error or connection gone: input is ignored
        self._deaf = False  # stalled for good: input is discarded
        self._stalled = False
        self._reading = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._writer = FrameWriter(self.transport)

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
        for frame in splitFrames(kind, streamID, messageID, data, self._splitSize):
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
        """Close the transport; a yamux stream then credits the peer no more window."""
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


class DRPCClientProtocol(DRPCProtocol):
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
                    kind=kindName(packet.kind),
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
            self._fatal(ProtocolError(f"unknown packet kind: {kindName(kind)}"))


