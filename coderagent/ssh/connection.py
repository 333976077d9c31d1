"""The ``ssh-connection`` service: keep-alives and consumer-driven windows.

Keep-alives follow upstream's ``--ssh-max-timeout``: every max/3 we ask the
client for a reply; three unanswered in a row close the connection.  (Below
:data:`KEEPALIVE_THRESHOLD` upstream treats the timeout as an absolute
deadline instead; the transport enforces that one.)

Stock Conch re-opens a channel's window as soon as data arrives, so a slow
consumer makes us buffer without bound.  Here a channel may set
``consumerPaused``; the window then stays shut until the channel calls
:meth:`AgentConnection.reopenWindow` once its consumer has drained (the
contract is :mod:`coderagent.ssh.interfaces`).  All of one connection's
channels share :data:`~coderagent.ssh.windows.CONNECTION_WINDOW_BUDGET`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import connection, transport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from coderagent.ssh.forwarding.opening import DeferredOpenConnection
from coderagent.ssh.interfaces import IChannelWindows
from coderagent.ssh.packets import CHANNEL_DATA_HEAD, Chunk
from coderagent.ssh.windows import CONNECTION_WINDOW_BUDGET, MIN_CHANNEL_WINDOW

if TYPE_CHECKING:
    from coderagent.ssh.transport import AgentServerTransport

log = Logger()

#: WINDOW_ADJUST's payload: the recipient channel, the bytes to add.
_WINDOW_ADJUST = struct.Struct(">LL")

#: Below this, upstream treats --ssh-max-timeout as an absolute deadline.
KEEPALIVE_THRESHOLD = 3.0
KEEPALIVE_COUNT_MAX = 3


@implementer(IChannelWindows)
class AgentConnection(DeferredOpenConnection):
    """``ssh-connection`` with keep-alives and consumer-driven window re-opening."""

    transport: AgentServerTransport
    _keepalive: LoopingCall | None = None
    _missedKeepalives = 0

    def serviceStarted(self) -> None:
        super().serviceStarted()
        config = self.transport.factory.config
        if config.maxTimeout >= KEEPALIVE_THRESHOLD:
            self._keepalive = LoopingCall(self._sendKeepalive)
            self._keepalive.clock = self.transport.factory.reactor
            self._keepalive.start(config.maxTimeout / KEEPALIVE_COUNT_MAX, now=False)

    def serviceStopped(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        super().serviceStopped()

    def _sendKeepalive(self) -> None:
        if self._missedKeepalives >= KEEPALIVE_COUNT_MAX:
            log.info(
                "closing connection from {peer}: keep-alive timeout",
                peer=self.transport.describePeer(),
            )
            self.transport.sendDisconnect(
                transport.DISCONNECT_CONNECTION_LOST, b"keep-alive timeout"
            )
            return
        self._missedKeepalives += 1
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        # Success and failure both prove the client is alive.
        d.addBoth(self._keepaliveAnswered)

    def _keepaliveAnswered(self, _: object) -> None:
        self._missedKeepalives = 0

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        # Only reached for packets the transport's fast path could not take
        # apart (a length that disagrees with the packet's): refuse those.
        localChannel, dataLength = struct.unpack(">2L", packet[:8])
        data = packet[8:]
        if len(data) != dataLength:
            raise ValueError(f"channel data of {len(data)} bytes claims {dataLength}")
        self.channelDataReceived(localChannel, data)

    def channelDataReceived(self, localChannel: int, data: bytes) -> None:
        """CHANNEL_DATA for ``localChannel``, already parsed by the transport."""
        channel = self.channels.get(localChannel)
        if channel is None:
            log.warn("data for unknown channel {id}", id=localChannel)
            return
        dataLength = len(data)
        if dataLength > channel.localWindowLeft or dataLength > channel.localMaxPacket:
            log.warn("peer overran the window of channel {id}", id=localChannel)
            self.sendClose(channel)
            return
        channel.localWindowLeft -= dataLength
        channel.dataReceived(data)
        self.reopenWindow(channel)

    def sendData(self, channel: Any, data: Chunk) -> None:
        # As Conch's, but the data is not copied into the payload.
        if channel.localClosed:
            return
        head = CHANNEL_DATA_HEAD.pack(self.channelsToRemoteChannel[channel], len(data))
        self.transport.sendPacketParts(connection.MSG_CHANNEL_DATA, (head, data))

    def sendDataChunks(self, channel: Any, chunks: list[Chunk]) -> None:
        """One CHANNEL_DATA packet per chunk, written to the socket together."""
        if channel.localClosed:
            return
        remote = self.channelsToRemoteChannel[channel]
        self.transport.sendPackets(
            connection.MSG_CHANNEL_DATA,
            [(CHANNEL_DATA_HEAD.pack(remote, len(chunk)), chunk) for chunk in chunks],
        )

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        # As Conch's, without the debug log event it emits for every
        # adjustment (one every few packets per channel).
        if channel.localClosed:
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_WINDOW_ADJUST,
            _WINDOW_ADJUST.pack(self.channelsToRemoteChannel[channel], bytesToAdd),
        )
        channel.localWindowLeft += bytesToAdd

    def windowShare(self, cap: int) -> int:
        """The window one channel may have now: an even share of the budget."""
        share = CONNECTION_WINDOW_BUDGET // max(1, len(self.channels))
        return min(cap, max(MIN_CHANNEL_WINDOW, share))

    def sizeWindow(self, channel: Any) -> None:
        # The window the channel asked for is its cap from now on.  A new
        # channel also gets no more than what the others leave of the budget,
        # so a burst of opens cannot add up to many budgets.
        channel.windowCap = channel.localWindowSize
        granted = sum(c.localWindowLeft for c in self.channels.values() if c is not channel)
        free = max(MIN_CHANNEL_WINDOW, CONNECTION_WINDOW_BUDGET - granted)
        window = min(self.windowShare(channel.windowCap), free)
        channel.localWindowSize = channel.localWindowLeft = window

    def reopenWindow(self, channel: Any) -> None:
        """Give the peer more window once half is used and the consumer keeps up."""
        if channel.consumerPaused or channel.localClosed:
            return
        target = self.windowShare(channel.windowCap)
        if channel.localWindowLeft < target // 2:
            self.adjustWindow(channel, target - channel.localWindowLeft)
