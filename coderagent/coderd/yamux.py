"""yamux, byte for byte as ``github.com/hashicorp/yamux`` speaks it, on Twisted.

coderd multiplexes every agent RPC over one WebSocket with hashicorp/yamux
(``DefaultConfig()`` on both ends; the agent is the client, coderd the server),
so this module has to reproduce what the Go library puts on the wire and how it
reacts to what it reads, including its quirks, not merely "a yamux".  The
golden streams in ``tests/golden/yamux_*.json`` and ``drpc_over_yamux*.json``
were recorded from the Go library and the tests compare against them.  The
header, constants and errors are in :mod:`coderagent.coderd.yamuxframe`.

What Go does, and therefore what we do:

* SYN, ACK and FIN travel on WindowUpdate frames with delta 0: ``Open()``
  sends ``WindowUpdate(SYN)`` at once; accepting a stream sends
  ``WindowUpdate(ACK)``; ``Close()`` sends ``WindowUpdate(FIN)`` (a half-close).
* Every ``Write`` becomes one Data frame of ``min(len, send window)`` bytes; the
  rest waits for window credit.  Frames are never merged across writes.
* A receiver credits its window only once the consumed-but-uncredited amount
  reaches half the maximum window (128 KiB by default).
* At most ``AcceptBacklog`` (256) of our SYNs may be un-ACKed; further opens
  wait.  An incoming stream beyond an unaccepted backlog of 256 is RST.
* A frame for an unknown stream is ignored (its payload skipped): that is how a
  Data frame arriving after the stream's FIN is dropped.  Go logs "frame for
  missing stream" for a WindowUpdate it gets after both FINs; Go's drpc never
  causes one, because its reader stops once it closed the stream.  Hence a
  protocol that cannot half-close (drpc, here) reads nothing after
  ``loseConnection``, as with TCP, and its peer is credited no more window;
  and when the peer's FIN ends such a protocol, what it had queued is
  dropped and our FIN goes at once, as Go's ``Close`` abandons a ``Write``
  still waiting for window.
* Protocol violations (window overrun, duplicate SYN, unexpected FIN) answer
  ``GoAway(1)`` and close the connection; ``Close()`` itself sends no GoAway.
* A keep-alive ping goes out every 30 s; one unanswered for 10 s
  (``ConnectionWriteTimeout``) closes the session.  A stream un-ACKed for 75 s
  closes the session; a half-closed stream whose peer never FINs is RST after
  5 minutes.

The Twisted shape: :class:`YamuxSession` is a :class:`Protocol` on the byte
stream; each :class:`YamuxStream` is the ``ITransport`` of the protocol attached
to it, with Twisted's flow control mapped onto yamux's windows (a paused stream
withholds window credit, so the peer stops; a stream whose peer stopped
crediting pauses its registered producer).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, cast

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.coderd.yamuxframe import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER,
    HEADER_SIZE,
    INITIAL_STREAM_WINDOW,
    PROTO_VERSION,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    KeepaliveTimeoutError,
    RemoteGoAwayError,
    RemoteSessionError,
    SessionClosedError,
    SessionShutdownError,
    StreamCloseTimeoutError,
    StreamOpenTimeoutError,
    StreamResetError,
    StreamsExhaustedError,
    YamuxProtocolError,
    YamuxTimeoutError,
)
from coderagent.deferreds import Waiters, cancelCall

__all__ = ["YamuxSession", "YamuxStream"]

_log = Logger()

_MAX_STREAM_ID = 0xFFFFFFFF - 1  # Go refuses to allocate ids >= MaxUint32-1

_pack = HEADER.pack

# Stream states, numbered as in Go's stream.go.  Order matters: everything
# from _REMOTE_CLOSE on has seen the peer's FIN or is dead.
_INIT = 0
_SYN_SENT = 1
_SYN_RECEIVED = 2
_ESTABLISHED = 3
_LOCAL_CLOSE = 4
_REMOTE_CLOSE = 5
_CLOSED = 6
_RESET = 7


# --- streams -----------------------------------------------------------------


@implementer(ITransport, IConsumer, IPushProducer)
class YamuxStream:
    """One yamux stream: the transport of the protocol attached to it.

    Writes go out as one Data frame each, as far as the peer's window allows;
    the remainder is queued, and a registered producer is paused while more
    than a window's worth is queued.  Incoming data goes straight to the
    protocol unless it paused us, in which case it is kept (never more than
    our receive window, since we stop crediting) until it resumes.

    ``disconnecting`` keeps its Twisted meaning: True once ``loseConnection``
    or ``abortConnection`` was called or the stream ended.
    """

    disconnecting: bool

    def __init__(self, session: YamuxSession, streamID: int, state: int) -> None:
        self.streamID = streamID
        self.disconnecting = False
        self._session = session
        self._state = state
        self._protocol: IProtocol | None = None
        # receive side
        self._recvWindow = INITIAL_STREAM_WINDOW
        self._recvBuf: deque[bytes] = deque()
        self._recvBuffered = 0
        self._readPaused = False
        self._readStopped = False  # the protocol reads nothing more: no delivery, no credit
        self._finPending = False  # peer's FIN seen, not yet given to the protocol
        self._eofDelivered = False
        self._delivering = False
        self._lostReason: Failure | None = None  # died before a protocol was attached
        self._lostDelivered = False
        # send side
        self._sendWindow = INITIAL_STREAM_WINDOW
        self._pending: deque[memoryview] = deque()
        self._pendingBytes = 0
        self._closing = False  # no more writes accepted
        self._finRequested = False
        self._finSent = False
        self._producer: IProducer | None = None
        self._streamingProducer = False
        self._producerPaused = False
        self._pullCall: IDelayedCall | None = None
        # Go's StreamOpenTimeout / StreamCloseTimeout
        self._openTimer: IDelayedCall | None = None
        self._closeTimer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<YamuxStream {self.streamID} state={self._state}>"

    # -- wiring a protocol ------------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to this stream and deliver anything already received."""
        if self._protocol is not None:
            raise RuntimeError(f"yamux stream {self.streamID} already has a protocol")
        self._protocol = protocol
        try:
            protocol.makeConnection(self)
        except Exception:
            self._protocolFailed()
            return
        if self._lostReason is not None:
            reason, self._lostReason = self._lostReason, None
            self._deliverLost(reason)
            return
        self._drive()
        self._maybeCredit()

    # -- ITransport -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` as one Data frame, or queue what the peer's window cannot take yet."""
        if self._closing or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        session = self._session
        if (
            not self._pending
            and n <= self._sendWindow
            and self._state != _INIT
            and not session._sendPaused
        ):
            session._writeData(self._sendFlags(), self.streamID, data)
            self._sendWindow -= n
            if self._producer is not None:
                self._updateProducer()
            return
        self._pending.append(memoryview(data))
        self._pendingBytes += n
        self._flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """One frame for the lot, as a single Go ``Write`` would be."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send FIN once the queued data is out; ``connectionLost`` once the peer FINs too.

        A protocol providing ``IHalfCloseableProtocol`` keeps receiving until
        then (a half-close).  Any other reads nothing more, as with a TCP
        transport: what arrives is dropped and the peer is credited no more
        window, so it stops sending.
        """
        if self._closing:
            return
        self._closing = True
        self._finRequested = True
        self.disconnecting = True
        protocol = self._protocol
        if protocol is not None and IHalfCloseableProtocol(protocol, None) is None:
            self._stopReading()
        self._flush()

    def abortConnection(self) -> None:
        """Reset the stream (RST), dropping whatever is queued either way."""
        if self._state >= _CLOSED or self._lostDelivered or self._lostReason is not None:
            return
        if self._state == _INIT:
            # Never announced: the peer has not heard of it, so no RST.
            self._state = _RESET
            self._session._forgetQueued(self)
        else:
            self._state = _RESET
            self._session._writeFrame(TYPE_WINDOW_UPDATE, FLAG_RST, self.streamID, 0)
            self._session._closeStream(self.streamID)
        self._die(Failure(error.ConnectionAborted()))

    def getPeer(self) -> IAddress:
        """The address of the connection the session runs over."""
        return self._session._sessionTransport().getPeer()

    def getHost(self) -> IAddress:
        """Our address on the connection the session runs over."""
        return self._session._sessionTransport().getHost()

    # -- IConsumer --------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Pause ``producer`` while more than a window's worth of data is queued."""
        if self._producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, "
                f"because producer {self._producer!r} was never unregistered."
            )
        if self._lostDelivered or self._state >= _CLOSED:
            producer.stopProducing()
            return
        self._producer = producer
        self._streamingProducer = streaming
        self._producerPaused = False
        self._updateProducer()

    def unregisterProducer(self) -> None:
        """Forget the producer (it is not resumed)."""
        self._producer = None
        cancelCall(self._pullCall)
        self._pullCall = None

    # -- IPushProducer: the protocol on top throttles what we deliver ----------

    def pauseProducing(self) -> None:
        """Stop delivering data; the peer is no longer credited, so it stops after one window."""
        self._readPaused = True

    def resumeProducing(self) -> None:
        """Deliver what was kept while paused, then credit the peer again."""
        if not self._readPaused:
            return
        self._readPaused = False
        self._drive()
        self._maybeCredit()

    def stopProducing(self) -> None:
        """A consumer we feed has gone: close, as a TCP transport does."""
        self.loseConnection()

    # -- sending ----------------------------------------------------------------

    def _sendFlags(self) -> int:
        """Go's sendFlags: the first frame we send carries SYN (opener) or ACK (acceptor)."""
        state = self._state
        if state == _INIT:
            self._state = _SYN_SENT
            return FLAG_SYN
        if state == _SYN_RECEIVED:
            self._state = _ESTABLISHED
            return FLAG_ACK
        return 0

    def _flush(self) -> None:
        """Send queued data as the window allows, then the FIN if one is due."""
        if self._state == _INIT:
            return  # waiting for a SYN slot; Go's Open would still be blocked
        session = self._session
        pending = self._pending
        while pending and self._sendWindow > 0:
            if session._sendPaused:
                session._blocked[self.streamID] = self
                break
            view = pending[0]
            n = len(view)
            if n > self._sendWindow:
                n = self._sendWindow
                pending[0] = view[n:]
                view = view[:n]
            else:
                pending.popleft()
            session._writeData(self._sendFlags(), self.streamID, view)
            self._sendWindow -= n
            self._pendingBytes -= n
            if session._shutdown:
                return
        if self._producer is not None:
            self._updateProducer()
        if not pending and self._finRequested and not self._finSent:
            self._sendFin()

    def _sendFin(self) -> None:
        """Go's Stream.Close(): FIN on a WindowUpdate; fully closed if the peer FIN'd first."""
        self._finSent = True
        state = self._state
        session = self._session
        if state in (_SYN_SENT, _SYN_RECEIVED, _ESTABLISHED):
            # Go moves to LocalClose *before* computing flags, so a FIN never
            # carries the ACK of a stream that was never accepted.
            self._state = _LOCAL_CLOSE
            fullyClosed = False
        elif state == _REMOTE_CLOSE:
            self._state = _CLOSED
            fullyClosed = True
        else:
            return
        self._cancelOpenTimer()
        session._writeFrame(TYPE_WINDOW_UPDATE, self._sendFlags() | FLAG_FIN, self.streamID, 0)
        if fullyClosed:
            session._closeStream(self.streamID)
            self._drive()
        elif session._streamCloseTimeout is not None and not session._shutdown:
            self._closeTimer = session._clock.callLater(
                session._streamCloseTimeout, self._closeTimedOut
            )

    def _incrSendWindow(self, delta: int) -> None:
        self._sendWindow += delta
        if self._pending or (self._finRequested and not self._finSent):
            self._flush()

    def _updateProducer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        if self._streamingProducer:
            highWater = self._session._maxWindow
            if not self._producerPaused and self._pendingBytes > highWater:
                self._producerPaused = True
                cast(IPushProducer, producer).pauseProducing()
            elif self._producerPaused and self._pendingBytes <= highWater // 2:
                self._producerPaused = False
                cast(IPushProducer, producer).resumeProducing()
        elif self._pendingBytes == 0 and self._pullCall is None and not self._closing:
            # A pull producer is asked for more once everything went out; via
            # the clock so that its write cannot recurse into this call.
            self._pullCall = self._session._clock.callLater(0, self._pull)

    def _pull(self) -> None:
        self._pullCall = None
        if self._producer is not None and not self._streamingProducer and not self._closing:
            cast(IPullProducer, self._producer).resumeProducing()

    # -- receiving --------------------------------------------------------------

    def _sendWindowUpdate(self) -> None:
        """Go's sendWindowUpdate: credit consumed bytes once they reach half the window.

        A pending SYN/ACK flag forces the frame out even with delta 0.
        """
        maxWindow = self._session._maxWindow
        delta = maxWindow - self._recvBuffered - self._recvWindow
        flags = self._sendFlags()
        if delta < maxWindow // 2 and flags == 0:
            return
        self._recvWindow += delta
        self._session._writeFrame(TYPE_WINDOW_UPDATE, flags, self.streamID, delta)

    def _maybeCredit(self) -> None:
        state = self._state
        if self._readPaused or self._readStopped or self._protocol is None:
            return
        if state >= _CLOSED or state == _INIT:
            return  # (an unannounced stream's first frame must be Go's SYN, from _announce)
        self._sendWindowUpdate()

    def _stopReading(self) -> None:
        """The protocol will read nothing more: drop what is kept for it, credit no more."""
        self._readStopped = True
        self._recvBuf.clear()
        self._recvBuffered = 0

    def _dataArrived(self, chunk: bytes) -> None:
        if self._state >= _REMOTE_CLOSE or self._finPending or self._readStopped:
            return  # after the peer's FIN, dead, or nobody reads: dropped, as Go never reads it
        self._recvBuf.append(chunk)
        self._recvBuffered += len(chunk)
        self._drive()

    def _frameEnded(self, fin: bool) -> None:
        """A Data frame's payload is complete: credit per frame, as Go's reader sees it."""
        if self._state >= _CLOSED:
            return  # reset or closed while the payload was arriving
        if fin:
            if not self._processFlags(FLAG_FIN):
                self._session._protocolViolation(
                    f"unexpected FIN on stream {self.streamID} in state {self._state}"
                )
            return
        self._maybeCredit()

    def _processFlags(self, flags: int) -> bool:
        """Go's processFlags.  False means a protocol error (an unexpected FIN)."""
        fullyClosed = False
        session = self._session
        if flags & FLAG_ACK:
            if self._state == _SYN_SENT:
                self._state = _ESTABLISHED
            self._cancelOpenTimer()
            session._establish(self.streamID)
        if flags & FLAG_FIN:
            state = self._state
            if state in (_SYN_SENT, _SYN_RECEIVED, _ESTABLISHED):
                self._state = _REMOTE_CLOSE
            elif state == _LOCAL_CLOSE:
                self._state = _CLOSED
                fullyClosed = True
            else:
                return False
            self._cancelOpenTimer()
            self._finPending = True
        if flags & FLAG_RST:
            self._state = _RESET
            session._closeStream(self.streamID)
            self._die(Failure(StreamResetError()))
            return True
        if fullyClosed:
            self._cancelCloseTimer()
            session._closeStream(self.streamID)
        if flags & FLAG_FIN:
            self._drive()
        return True

    def _drive(self) -> None:
        """Give the protocol, in order, what it may have now: data, EOF, then connectionLost."""
        protocol = self._protocol
        if protocol is None or self._delivering or self._lostDelivered:
            return
        if self._readStopped:
            # Nothing is delivered any more: the peer's FIN only completes the close.
            if self._finPending:
                self._finPending = False
                self._eofDelivered = True
                self._closeAtEOF()
            if self._state == _CLOSED and self._eofDelivered:
                self._deliverLost(Failure(error.ConnectionDone()))
            return
        self._delivering = True
        try:
            buf = self._recvBuf
            while buf and not self._readPaused:
                chunk = buf.popleft()
                self._recvBuffered -= len(chunk)
                try:
                    protocol.dataReceived(chunk)
                except Exception:
                    self._protocolFailed()
                    return
                if self._lostDelivered:
                    return
            if buf or self._readPaused:
                return
            if self._finPending:
                self._finPending = False
                self._eofDelivered = True
                halfCloseable = IHalfCloseableProtocol(protocol, None)
                if halfCloseable is None:
                    # Like a TCP transport: EOF ends a protocol that cannot half-close.
                    self._closeAtEOF()
                    self._deliverLost(Failure(error.ConnectionDone()))
                    return
                try:
                    halfCloseable.readConnectionLost()
                except Exception:
                    self._protocolFailed()
                    return
            if self._state == _CLOSED and self._eofDelivered:
                self._deliverLost(Failure(error.ConnectionDone()))
        finally:
            self._delivering = False

    # -- endings ----------------------------------------------------------------

    def _closeAtEOF(self) -> None:
        """The peer's FIN ends a protocol that cannot half-close: FIN now, unsent data dropped.

        As TCP drops a closed connection's buffer, and as Go's drpc, whose
        ``Close`` abandons a ``Write`` still waiting for window: a peer that
        stopped crediting us would otherwise never see our FIN.
        """
        self._pending.clear()
        self._pendingBytes = 0
        self._closing = True
        self._finRequested = True
        self.disconnecting = True
        self._stopReading()
        self._flush()

    def _deliverLost(self, reason: Failure) -> None:
        if self._lostDelivered:
            return
        self._lostDelivered = True
        self._closing = True
        self.disconnecting = True
        self._cancelOpenTimer()
        self._cancelCloseTimer()
        producer = self._producer
        if producer is not None:
            self.unregisterProducer()
            producer.stopProducing()
        protocol = self._protocol
        if protocol is not None:
            try:
                protocol.connectionLost(reason)
            except Exception:
                _log.failure(
                    "yamux stream {streamID}: connectionLost raised", streamID=self.streamID
                )

    def _die(self, reason: Failure) -> None:
        """Reset, abort or session loss: drop both buffers and tell the protocol now."""
        self._recvBuf.clear()
        self._recvBuffered = 0
        self._finPending = False
        self._pending.clear()
        self._pendingBytes = 0
        self._closing = True
        self.disconnecting = True
        self._cancelOpenTimer()
        self._cancelCloseTimer()
        self._session._blocked.pop(self.streamID, None)
        if self._protocol is None:
            if self._lostReason is None:
                self._lostReason = reason
            return
        self._deliverLost(reason)

    def _protocolFailed(self) -> None:
        """A protocol callback raised: log it and reset this stream, not the whole session."""
        _log.failure("yamux stream {streamID}: protocol raised; resetting", streamID=self.streamID)
        if self._state >= _CLOSED:
            self._deliverLost(Failure(error.ConnectionAborted()))
        else:
            self.abortConnection()

    def _closeTimedOut(self) -> None:
        """Go's closeTimeout: the peer never FIN'd after our FIN; RST and forget the stream."""
        self._closeTimer = None
        if self._state != _LOCAL_CLOSE:
            return
        self._state = _RESET
        self._session._writeFrame(TYPE_WINDOW_UPDATE, FLAG_RST, self.streamID, 0)
        self._session._closeStream(self.streamID)
        self._die(Failure(StreamCloseTimeoutError()))

    def _openTimedOut(self) -> None:
        self._openTimer = None
        self._session._closeWith(
            StreamOpenTimeoutError(
                f"aborted stream open: stream {self.streamID} was not acknowledged in time"
            )
        )

    def _cancelOpenTimer(self) -> None:
        timer = self._openTimer
        self._openTimer = None
        cancelCall(timer)

    def _cancelCloseTimer(self) -> None:
        timer = self._closeTimer
        self._closeTimer = None
        cancelCall(timer)

    def _announce(self) -> None:
        """Go's OpenStream after it got a SYN slot: SYN now, then whatever was written meanwhile."""
        session = self._session
        self._sendWindowUpdate()
        if session._streamOpenTimeout is not None:
            self._openTimer = session._clock.callLater(
                session._streamOpenTimeout, self._openTimedOut
            )
        self._flush()


# --- the session -------------------------------------------------------------


class _PendingPing(NamedTuple):
    deferred: Deferred[float]
    sent: float
    timer: IDelayedCall


@implementer(IPushProducer)
class _TransportProducer:
    """Registered with the session's transport, so that a full socket pauses stream data."""

    def __init__(self, session: YamuxSession) -> None:
        self._session = session

    def pauseProducing(self) -> None:
        self._session._sendPaused = True

    def resumeProducing(self) -> None:
        self._session._resumeSending()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows."""


class YamuxSession(Protocol):
    """yamux over any byte stream (a WebSocket carrying binary messages, or TCP).

    ``client=True`` is Go's ``yamux.Client`` (odd stream ids, what the agent
    is); ``client=False`` is ``yamux.Server`` (even ids, coderd).  Each stream
    the peer opens is accepted at once (ACK sent) and handed to ``onStream``;
    with no ``onStream`` streams wait unaccepted, as in Go when nobody calls
    ``Accept``, and beyond ``acceptBacklog`` of them new ones are reset.

    The remaining keyword arguments are Go's ``DefaultConfig()`` values;
    ``None`` disables a timer.
    """

    def __init__(
        self,
        *,
        client: bool,
        clock: IReactorTime,
        onStream: Callable[[YamuxStream], None] | None = None,
        keepaliveInterval: float | None = 30.0,
        maxStreamWindow: int = INITIAL_STREAM_WINDOW,
        acceptBacklog: int = 256,
        connectionWriteTimeout: float = 10.0,
        streamOpenTimeout: float | None = 75.0,
        streamCloseTimeout: float | None = 300.0,
    ) -> None:
        if acceptBacklog <= 0:
            raise ValueError("backlog must be positive")
        if keepaliveInterval is not None and keepaliveInterval <= 0:
            raise ValueError("keep-alive interval must be positive")
        if maxStreamWindow < INITIAL_STREAM_WINDOW or maxStreamWindow > 0xFFFFFFFF:
            raise ValueError(f"maxStreamWindow must be between {INITIAL_STREAM_WINDOW} and 2**32-1")
        self.client = client
        self.onStream = onStream
        #: Why the session ended, once it has.
        self.closeReason: Failure | None = None
        self._clock = clock
        self._keepaliveInterval = keepaliveInterval
        self._maxWindow = maxStreamWindow
        self._acceptBacklog = acceptBacklog
        self._writeTimeout = connectionWriteTimeout
        self._streamOpenTimeout = streamOpenTimeout
        self._streamCloseTimeout = streamCloseTimeout

        self._nextStreamID = 1 if client else 2
        self._streams: dict[int, YamuxStream] = {}
        self._inflight: set[int] = set()  # our SYNs not yet ACKed (Go's synCh)
        self._synQueue: deque[YamuxStream] = deque()  # opens waiting for a SYN slot
        self._backlog: deque[YamuxStream] = deque()  # unaccepted incoming streams
        self._pings: dict[int, _PendingPing] = {}
        self._pingID = 0
        self._localGoAway = False
        self._remoteGoAway = False
        self._shutdown = False
        self._transportGone = False
        self._closedWaiters: Waiters[None] = Waiters()
        self._keepaliveCall: IDelayedCall | None = None
        self._sendPaused = False
        self._blocked: dict[int, YamuxStream] = {}
        # receive parser
        self._hdrBuf = bytearray()
        self._payloadLeft = 0
        self._payloadStream: YamuxStream | None = None
        self._payloadFin = False

    # -- public API -------------------------------------------------------------

    def openStream(self) -> YamuxStream:
        """Go's ``Session.Open()``: allocate the next id and send ``WindowUpdate(SYN)``.

        Raises :class:`SessionShutdownError` once the session is closed and
        :class:`RemoteGoAwayError` after the peer's GoAway.  When
        ``acceptBacklog`` of our SYNs are un-ACKed, Go's Open blocks; here the
        stream is returned at once but its SYN (and anything written to it)
        waits for a slot.
        """
        if self._shutdown:
            raise SessionShutdownError()
        if self._remoteGoAway:
            raise RemoteGoAwayError()
        streamID = self._nextStreamID
        if streamID >= _MAX_STREAM_ID:
            raise StreamsExhaustedError()
        self._nextStreamID = streamID + 2
        stream = YamuxStream(self, streamID, _INIT)
        if len(self._inflight) < self._acceptBacklog and not self._synQueue:
            self._announceStream(stream)
        else:
            self._synQueue.append(stream)
        return stream

    def ping(self) -> Deferred[float]:
        """Go's ``Session.Ping()``: the round trip in seconds.

        Fails with :class:`YamuxTimeoutError` after ``connectionWriteTimeout``
        (the session stays up, as in Go) and with :class:`SessionShutdownError`
        if the session ends first.
        """
        if self._shutdown:
            return fail(SessionShutdownError())
        pingID = self._pingID
        self._pingID = (pingID + 1) & 0xFFFFFFFF

        def cancel(_: Deferred[float]) -> None:
            entry = self._pings.pop(pingID, None)
            if entry is not None:
                cancelCall(entry.timer)

        d: Deferred[float] = Deferred(cancel)
        timer = self._clock.callLater(self._writeTimeout, self._pingTimedOut, pingID)
        self._pings[pingID] = _PendingPing(d, self._clock.seconds(), timer)
        self._writeFrame(TYPE_PING, FLAG_SYN, 0, pingID)
        return d

    def goAway(self, code: int = GO_AWAY_NORMAL) -> None:
        """Go's ``GoAway()``: refuse (RST) new streams from now on; existing ones carry on."""
        if self._shutdown:
            return
        self._localGoAway = True
        self._writeFrame(TYPE_GO_AWAY, 0, 0, code)

    def close(self) -> None:
        """Go's ``Session.Close()``: drop the connection (no GoAway) and end every stream."""
        self._closeWith(SessionShutdownError("closed locally"))

    def whenClosed(self) -> Deferred[None]:
        """Fires (never fails) once the underlying transport is gone; see ``closeReason``."""
        if self._transportGone:
            return succeed(None)
        return self._closedWaiters.wait()

    @property
    def numStreams(self) -> int:
        """Streams the peer knows of and that are not yet closed (Go's NumStreams)."""
        return len(self._streams)

    # -- Protocol ---------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if IConsumer.providedBy(transport):
            try:
                cast(IConsumer, transport).registerProducer(_TransportProducer(self), True)
            except RuntimeError:
                pass  # someone else drives this transport's flow control
        self._scheduleKeepalive()

    def dataReceived(self, data: bytes) -> None:
        if self._shutdown:
            return
        if type(data) is not bytes:
            data = bytes(data)
        pos = 0
        end = len(data)
        hdrBuf = self._hdrBuf
        while pos < end:
            left = self._payloadLeft
            if left:
                take = end - pos
                if take > left:
                    take = left
                target = self._payloadStream
                if target is not None:
                    target._dataArrived(data if take == end else data[pos : pos + take])
                pos += take
                left -= take
                self._payloadLeft = left
                if not left:
                    self._payloadStream = None
                    if target is not None:
                        target._frameEnded(self._payloadFin)
                if self._shutdown:
                    return
                continue
            if hdrBuf:
                need = HEADER_SIZE - len(hdrBuf)
                hdrBuf += data[pos : pos + need]
                if len(hdrBuf) < HEADER_SIZE:
                    return
                pos += need
                version, msgType, flags, streamID, length = HEADER.unpack(hdrBuf)
                hdrBuf.clear()
            elif end - pos >= HEADER_SIZE:
                version, msgType, flags, streamID, length = HEADER.unpack_from(data, pos)
                pos += HEADER_SIZE
            else:
                hdrBuf += data[pos:]
                return
            if version != PROTO_VERSION:
                # Go exits without a GoAway here.
                self._closeWith(YamuxProtocolError(f"invalid protocol version: {version}"))
                return
            if msgType <= TYPE_WINDOW_UPDATE:
                self._handleStreamFrame(msgType, flags, streamID, length)
            elif msgType == TYPE_PING:
                self._handlePing(flags, length)
            elif msgType == TYPE_GO_AWAY:
                self._handleGoAway(length)
            else:
                self._closeWith(YamuxProtocolError(f"invalid msg type: {msgType}"))
            if self._shutdown:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._shutdownWith(reason)
        self._transportGone = True
        self._closedWaiters.fire(None)

    # -- incoming frames ---------------------------------------------------------

    def _handleStreamFrame(self, msgType: int, flags: int, streamID: int, length: int) -> None:
        if flags & FLAG_SYN and not self._incomingStream(streamID):
            return
        stream = self._streams.get(streamID)
        if stream is None:
            # Go: "likely we sent a RST": skip the payload, say nothing.
            if msgType == TYPE_DATA and length:
                self._payloadLeft = length
                self._payloadStream = None
            return
        if msgType == TYPE_WINDOW_UPDATE:
            if not stream._processFlags(flags):
                self._protocolViolation(
                    f"unexpected FIN on stream {streamID} in state {stream._state}"
                )
                return
            stream._incrSendWindow(length)
            return
        # Data.  A FIN riding on a non-empty frame is applied after its payload.
        fin = bool(flags & FLAG_FIN) and length > 0
        if not stream._processFlags(flags & ~FLAG_FIN if fin else flags):
            self._protocolViolation(f"unexpected FIN on stream {streamID} in state {stream._state}")
            return
        if not length:
            return
        if length > stream._recvWindow:
            self._protocolViolation(
                f"receive window exceeded (stream: {streamID}, "
                f"remain: {stream._recvWindow}, recv: {length})"
            )
            return
        stream._recvWindow -= length
        self._payloadLeft = length
        self._payloadFin = fin
        self._payloadStream = stream if stream._state < _CLOSED else None

    def _incomingStream(self, streamID: int) -> bool:
        """Go's incomingStream.  False if the session had to be closed."""
        if self._localGoAway:
            self._writeFrame(TYPE_WINDOW_UPDATE, FLAG_RST, streamID, 0)
            return True
        if streamID in self._streams:
            self._protocolViolation(f"duplicate stream declared: {streamID}")
            return False
        stream = YamuxStream(self, streamID, _SYN_RECEIVED)
        self._streams[streamID] = stream
        onStream = self.onStream
        if onStream is None:
            if len(self._backlog) >= self._acceptBacklog:
                del self._streams[streamID]
                self._writeFrame(TYPE_WINDOW_UPDATE, FLAG_RST, streamID, 0)
                return True
            self._backlog.append(stream)
            return True
        stream._sendWindowUpdate()  # what Go's AcceptStream does: ACK, delta 0
        try:
            onStream(stream)
        except Exception:
            _log.failure("yamux: onStream raised for stream {streamID}", streamID=streamID)
            stream.abortConnection()
        return not self._shutdown

    def _handlePing(self, flags: int, opaque: int) -> None:
        if flags & FLAG_SYN:
            self._writeFrame(TYPE_PING, FLAG_ACK, 0, opaque)
            return
        entry = self._pings.pop(opaque, None)
        if entry is not None:
            cancelCall(entry.timer)
            entry.deferred.callback(self._clock.seconds() - entry.sent)

    def _handleGoAway(self, code: int) -> None:
        if code == GO_AWAY_NORMAL:
            self._remoteGoAway = True
            return
        self._closeWith(RemoteSessionError(code))

    # -- stream bookkeeping -----------------------------------------------------

    def _announceStream(self, stream: YamuxStream) -> None:
        self._streams[stream.streamID] = stream
        self._inflight.add(stream.streamID)
        stream._announce()

    def _establish(self, streamID: int) -> None:
        if streamID in self._inflight:
            self._inflight.discard(streamID)
            self._releaseSynSlot()

    def _closeStream(self, streamID: int) -> None:
        self._streams.pop(streamID, None)
        self._blocked.pop(streamID, None)
        if streamID in self._inflight:
            self._inflight.discard(streamID)
            self._releaseSynSlot()

    def _releaseSynSlot(self) -> None:
        queue = self._synQueue
        while queue and len(self._inflight) < self._acceptBacklog and not self._shutdown:
            stream = queue.popleft()
            if stream._state == _INIT:
                self._announceStream(stream)

    def _forgetQueued(self, stream: YamuxStream) -> None:
        try:
            self._synQueue.remove(stream)
        except ValueError:
            pass

    # -- sending ----------------------------------------------------------------

    def _writeFrame(self, msgType: int, flags: int, streamID: int, length: int) -> None:
        transport = self.transport
        if self._shutdown or transport is None:
            return
        transport.write(_pack(PROTO_VERSION, msgType, flags, streamID, length))

    def _writeData(self, flags: int, streamID: int, body: bytes | memoryview) -> None:
        transport = self.transport
        if self._shutdown or transport is None:
            return
        transport.write(_pack(PROTO_VERSION, TYPE_DATA, flags, streamID, len(body)) + body)

    def _resumeSending(self) -> None:
        self._sendPaused = False
        blocked = list(self._blocked.values())
        self._blocked.clear()
        for stream in blocked:
            if self._sendPaused or self._shutdown:
                if not self._shutdown:
                    self._blocked[stream.streamID] = stream
                continue
            stream._flush()

    def _sessionTransport(self) -> ITransport:
        transport = self.transport
        if transport is None:
            raise SessionShutdownError("no transport")
        return transport

    # -- keep-alive and pings ---------------------------------------------------

    def _scheduleKeepalive(self, _: object = None) -> None:
        if self._keepaliveInterval is not None and not self._shutdown:
            self._keepaliveCall = self._clock.callLater(self._keepaliveInterval, self._keepalive)

    def _keepalive(self) -> None:
        self._keepaliveCall = None
        d = self.ping()
        d.addCallback(self._scheduleKeepalive)
        d.addErrback(self._keepaliveFailed)

    def _keepaliveFailed(self, reason: Failure) -> None:
        if reason.check(YamuxTimeoutError):
            _log.warn("yamux: keepalive failed: {error}", error=reason.getErrorMessage())
            self._closeWith(KeepaliveTimeoutError())

    def _pingTimedOut(self, pingID: int) -> None:
        entry = self._pings.pop(pingID, None)
        if entry is not None:
            entry.deferred.errback(YamuxTimeoutError())

    # -- endings ----------------------------------------------------------------

    def _protocolViolation(self, why: str) -> None:
        """Go's answer to a broken peer: GoAway(protocol error), then close."""
        if self._shutdown:
            return
        _log.error("yamux: protocol error from peer: {why}", why=why)
        self._localGoAway = True
        self._writeFrame(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)
        self._closeWith(YamuxProtocolError(why))

    def _closeWith(self, exc: Exception) -> None:
        """Go's exitErr/Close: end everything and close the connection (no GoAway)."""
        self._shutdownWith(Failure(exc))
        transport = self.transport
        if transport is not None and not self._transportGone:
            transport.loseConnection()

    def _shutdownWith(self, reason: Failure) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self.closeReason = reason
        cancelCall(self._keepaliveCall)
        self._keepaliveCall = None
        pings, self._pings = self._pings, {}
        for entry in pings.values():
            cancelCall(entry.timer)
            entry.deferred.errback(SessionShutdownError(reason.getErrorMessage()))
        streams = list(self._streams.values()) + list(self._synQueue)
        self._streams.clear()
        self._synQueue.clear()
        self._backlog.clear()
        self._blocked.clear()
        self._inflight.clear()
        self._payloadLeft = 0
        self._payloadStream = None
        lost = SessionClosedError(reason.getErrorMessage())
        for stream in streams:
            stream._state = _CLOSED
            stream._die(Failure(lost))
