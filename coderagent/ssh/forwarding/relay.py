"""The byte pipe between one SSH channel and one local socket.

Used by all four forwarding paths: ``direct-tcpip`` and
``direct-streamlocal@openssh.com`` (we connected the socket, the client opened
the channel) and ``forwarded-tcpip`` / ``forwarded-streamlocal@openssh.com``
(we accepted the socket and open the channel).  What stock Conch forwarding
lacks, this adds:

* **Half-close.**  EOF travels both ways: the client's channel EOF shuts the
  socket's write side; the socket's EOF becomes a channel EOF (after any
  buffered data).  The socket closes once both directions are done, the
  channel once the socket is gone.
* **Back-pressure both ways.**  The channel is the socket transport's
  streaming producer: when the socket's write buffer fills, the channel sets
  ``consumerPaused`` and ``AgentConnection`` stops re-opening the client's
  window until the socket drains.  When the client's window is exhausted,
  Conch calls :meth:`RelayChannel.stopWriting` and the socket stops being
  read until :meth:`RelayChannel.startWriting`.  Memory per channel is thus
  bounded by the window plus one socket read.

The per-packet path is a method call each way, with no logging, no Deferreds
and no copies beyond what Conch itself makes.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import channel
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.compat import canSendNow, sendNow
from coderagent.ssh.interfaces import IWindowedChannel
from coderagent.ssh.windows import CHANNEL_MAX_PACKET, CHANNEL_WINDOW

log = Logger()


@implementer(IHalfCloseableProtocol)
class SocketSide(Protocol):
    """The local socket's end of a relay; what it reads goes to its channel.

    The socket is not read until the channel is open (``connectionMade``
    pauses it), so nothing can arrive before there is somewhere to send it.
    """

    #: A TCP or Unix connection: producer, consumer, half-closeable.
    transport: Any
    channel: RelayChannel | None = None
    #: The socket will send no more (EOF, error or closed).
    readDone = False
    #: Our write side has been shut down after the client's EOF.
    writeShut = False
    #: The socket is fully closed.
    lost = False

    #: The socket can be written to at once (see coderagent.compat.sendNow).
    sendNow = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.sendNow = canSendNow(self.transport)

    def dataReceived(self, data: bytes) -> None:
        chan = self.channel
        if chan is not None:
            chan.write(data)

    def readConnectionLost(self) -> None:
        self.readDone = True
        if self.channel is not None:
            self.channel.socketReadDone()
        if self.writeShut and not self.lost:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeShut = True
        if self.readDone and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.readDone = self.lost = True
        if self.channel is not None:
            self.channel.socketLost()


@implementer(IPushProducer, IWindowedChannel)
class RelayChannel(channel.SSHChannel):
    """An SSH channel relaying to :class:`SocketSide` ``socket``.

    As an ``IPushProducer`` it is registered on the socket's transport, which
    pauses it while the socket's write buffer is full.
    """

    #: The AgentConnection this channel lives on (Conch types it loosely).
    conn: Any

    def __init__(self, socket: SocketSide, *, name: bytes | None = None, **kw: Any) -> None:
        kw.setdefault("localWindow", CHANNEL_WINDOW)
        kw.setdefault("localMaxPacket", CHANNEL_MAX_PACKET)
        super().__init__(**kw)
        if name is not None:
            self.name = name
        self.socket = socket
        socket.channel = self
        self.consumerPaused = False
        self.windowCap = self.localWindowSize
        self._open = False
        # Socket-to-client direction: an EOF (and maybe CLOSE) waits for the
        # buffered data to be sent first.
        self._finishPending = False
        self._closeAfterFlush = False
        self._eofSent = False

    # -- opening -------------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self._open = True
        sock = self.socket
        if sock.lost:
            self._finishOutput(close=True)
            return
        sock.transport.registerProducer(self, True)
        if sock.readDone:
            self._finishOutput(close=False)
        else:
            sock.transport.resumeProducing()

    def openFailed(self, reason: Any) -> None:
        """The client refused our ``forwarded-*`` channel, or the connection went away."""
        log.info(
            "{name} channel refused by the client: {reason}",
            name=(self.name or b"?").decode("ascii", "replace"),
            reason=getattr(reason, "value", reason),
        )
        self._dropSocket(abort=True)

    # -- client to socket ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        transport = self.socket.transport
        if self.socket.sendNow:
            sendNow(transport, [data])
        else:
            transport.write(data)

    def eofReceived(self) -> None:
        sock = self.socket
        if sock.lost:
            return
        # No more writes: stop being the producer first, or a paused
        # producer keeps Twisted from ever finishing the half-close.
        self.consumerPaused = False
        sock.transport.unregisterProducer()
        sock.transport.loseWriteConnection()

    # -- IPushProducer: the socket's write buffer --------------------------------

    def pauseProducing(self) -> None:
        self.consumerPaused = True

    def resumeProducing(self) -> None:
        self.consumerPaused = False
        if self._open and not self.localClosed:
            self.conn.reopenWindow(self)

    def stopProducing(self) -> None:
        self.consumerPaused = False

    # -- socket to client --------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Conch's ``SSHChannel.write``, cutting packets as views instead of copies."""
        if self.buf:
            self.buf += data
            return
        top = len(data)
        left = self.remoteWindowLeft
        if top > left:
            # What the window cannot take waits (one socket read at most:
            # stopWriting pauses the socket).
            self.buf = data[left:]
            top = left
            self.areWriting = 0
            self.stopWriting()
        rmp = self.remoteMaxPacket
        if top == len(data) and top <= rmp:
            if top:
                self.conn.sendData(self, data)
        elif top:
            view = memoryview(data)
            self.conn.sendDataChunks(
                self, [view[offset : min(offset + rmp, top)] for offset in range(0, top, rmp)]
            )
        self.remoteWindowLeft -= top
        if self.closing and not self.buf:
            self.loseConnection()

    def stopWriting(self) -> None:
        # The client's window is exhausted: stop reading the socket.
        if not self.socket.readDone:
            self.socket.transport.pauseProducing()

    def startWriting(self) -> None:
        if not self.socket.readDone:
            self.socket.transport.resumeProducing()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        if self._finishPending and not self.buf:
            self._sendFinish()

    def socketReadDone(self) -> None:
        if self._open:
            self._finishOutput(close=False)

    def socketLost(self) -> None:
        self.consumerPaused = False
        if self._open:
            self._finishOutput(close=True)

    def _finishOutput(self, *, close: bool) -> None:
        """EOF (and CLOSE when ``close``) once the buffered data has gone out."""
        if close:
            self._closeAfterFlush = True
        if self.buf:
            self._finishPending = True
        else:
            self._sendFinish()

    def _sendFinish(self) -> None:
        self._finishPending = False
        if not self._eofSent:
            self._eofSent = True
            self.conn.sendEOF(self)
        if self._closeAfterFlush:
            self.conn.sendClose(self)

    # -- closing -----------------------------------------------------------------

    def closeReceived(self) -> None:
        # The client reads no more: drop what it has not taken, let the socket
        # flush what the client sent, and close our side.
        self.buf = b""
        self._finishPending = False
        self._dropSocket(abort=False)
        self.conn.sendClose(self)

    def closed(self) -> None:
        self.buf = b""
        self._finishPending = False
        self._dropSocket(abort=False)

    def _dropSocket(self, *, abort: bool) -> None:
        sock = self.socket
        if sock.lost or sock.transport is None:
            return
        self.consumerPaused = False
        sock.transport.unregisterProducer()
        if abort:
            sock.transport.abortConnection()
        else:
            sock.transport.loseConnection()
