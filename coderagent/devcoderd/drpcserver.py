"""coderd's side of DRPC, for coderd-dev: ``drpcserver.ServeOne`` with a ``drpcmux``.

coderd serves every agent RPC on its own yamux stream, one drpc connection
per stream.  This is that server, written against the same Go sources as the
agent's client (drpc v0.0.33/v0.0.34: ``drpcstream``, ``drpcmanager``,
``drpcserver``, ``drpcmux``) and checked against the streams recorded from
Go's server in ``tests/golden``, so that the agent is tested against coderd's
behaviour and not merely against our own client.  The wire format and the
reader loop are the agent's (:mod:`coderagent.coderd.drpcwire`,
:class:`coderagent.coderd.drpc.DRPCProtocol`); only coderd-dev uses this side.

What Go's server does, and therefore what we do: it answers a unary call with
Message then CloseSend (an empty response is a zero-length Message; only a nil
one is CloseSend alone), or with an Error whose body is the code and the text;
an unknown method is answered at once, before the request is read.  A new
Invoke waits until the previous handler returned; a packet for a stream that
has not been invoked stops Go's reader for good.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.drpc import DRPCProtocol
from coderagent.coderd.drpcwire import (
    DEFAULT_MAX_BUFFER_SIZE,
    DEFAULT_SPLIT_SIZE,
    DRPCError,
    Kind,
    Packet,
    ProtocolError,
    decodeMetadata,
    kindName,
    marshalError,
)
from coderagent.gotext import goQuote

__all__ = ["DRPCServerProtocol", "Handler", "HandlerResult"]

_log = Logger()

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


class DRPCServerProtocol(DRPCProtocol):
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
            kind=kindName(packet.kind),
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
        self._fatal(ProtocolError(f"unknown packet kind: {kindName(kind)}"))

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
