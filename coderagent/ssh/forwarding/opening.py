"""Channel opens that may take time: confirm only once the channel is ready.

Conch's ``SSHConnection.ssh_CHANNEL_OPEN`` confirms a channel the moment the
avatar returns it, so ``direct-tcpip`` would confirm before it has connected
and an unreachable target would show up as a channel that closes, not as
OpenSSH's ``open failed: connect failed: <reason>``.  It also logs a traceback
for every refused open, including policy refusals.

:class:`DeferredOpenConnection` lets the avatar's lookup return a
:class:`~twisted.internet.defer.Deferred` that fires with the channel (then
the open is confirmed) or fails with ``ConchError(text, reasonCode)`` (then
it is refused with that code and text).  A plain channel is confirmed at
once, as before.  Opens still pending when the connection ends are
cancelled, so a slow connect cannot outlive its SSH connection.

It is Conch's connection with only that changed, and imports nothing from
``coderagent``; :class:`coderagent.ssh.connection.AgentConnection` builds
on it.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.transport import SSHTransportBase
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class DeferredOpenConnection(connection.SSHConnection):
    """``ssh-connection`` whose channel lookups may answer with a Deferred."""

    transport: SSHTransportBase
    _pendingOpens: set[Deferred[Any]] | None = None
    _stopped = False

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        # A packet too short to name its sender channel raises here; the
        # transport turns that into a protocol-error disconnect.
        channelType, rest = common.getNS(packet)
        senderChannel, windowSize, maxPacket = struct.unpack(">3L", rest[:12])
        data = rest[12:]
        try:
            result = self.getChannel(channelType, windowSize, maxPacket, data)
        except ConchError as e:
            self._refuseOpen(senderChannel, e)
            return
        except Exception:
            log.failure("channel open of type {type!r} failed", type=channelType)
            failure = ConchError("unknown failure", connection.OPEN_CONNECT_FAILED)
            self._refuseOpen(senderChannel, failure)
            return
        if not isinstance(result, Deferred):
            self._confirmOpen(result, senderChannel, data)
            return
        if self._pendingOpens is None:
            self._pendingOpens = set()
        pending = self._pendingOpens
        pending.add(result)

        def settled(outcome: object) -> object:
            pending.discard(result)
            return outcome

        result.addBoth(settled)
        result.addCallbacks(
            self._confirmOpen,
            self._pendingOpenFailed,
            callbackArgs=(senderChannel, data),
            errbackArgs=(senderChannel,),
        )

    def openChannels(self) -> int:
        """Channels open on this connection, counting opens still being answered."""
        return len(self.channels) + len(self._pendingOpens or ())

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        avatar = getattr(self.transport, "avatar", None)
        if avatar is None:
            return super().getChannel(channelType, windowSize, maxPacket, data)
        chan = avatar.lookupChannel(channelType, windowSize, maxPacket, data)
        if chan is None:
            raise ConchError("unknown channel", connection.OPEN_UNKNOWN_CHANNEL_TYPE)
        if not isinstance(chan, Deferred):
            chan.conn = self
        return chan

    def _confirmOpen(self, channel: Any, senderChannel: int, data: bytes) -> None:
        if self._stopped:
            # Too late: the connection ended while the channel got ready.
            channel.openFailed(ConchError("connection closed", connection.OPEN_CONNECT_FAILED))
            return
        channel.conn = self
        localChannel = self.localChannelID
        self.localChannelID += 1
        channel.id = localChannel
        self.channels[localChannel] = channel
        self.sizeWindow(channel)
        self.channelsToRemoteChannel[channel] = senderChannel
        self.localToRemoteChannel[localChannel] = senderChannel
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(
                ">4L", senderChannel, localChannel, channel.localWindowSize, channel.localMaxPacket
            )
            + channel.specificData,
        )
        try:
            channel.channelOpen(data)
        except Exception:
            log.failure("channel {id} failed to start", id=localChannel)
            self.sendClose(channel)

    def sizeWindow(self, channel: Any) -> None:
        """Hook: set ``channel``'s initial window before it is confirmed.

        Called once the channel is registered; the default keeps the window
        the channel asked for.
        """

    def _pendingOpenFailed(self, reason: Failure, senderChannel: int) -> None:
        if self._stopped:
            return
        error = reason.value
        if not isinstance(error, ConchError):
            if not reason.check(CancelledError):
                log.failure("channel open failed", reason)
            error = ConchError("unknown failure", connection.OPEN_CONNECT_FAILED)
        self._refuseOpen(senderChannel, error)

    def _refuseOpen(self, senderChannel: int, error: ConchError) -> None:
        text, code = (*error.args, connection.OPEN_CONNECT_FAILED)[:2]
        if isinstance(text, int):  # ConchError(code, text), see Twisted #3657
            text, code = code, text
        if not isinstance(code, int):
            code = connection.OPEN_CONNECT_FAILED
        message = text if isinstance(text, bytes) else str(text).encode("utf-8", "replace")
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", senderChannel, code) + common.NS(message) + common.NS(b""),
        )

    def serviceStopped(self) -> None:
        self._stopped = True
        pending, self._pendingOpens = self._pendingOpens, None
        for d in list(pending or ()):
            d.cancel()
        super().serviceStopped()
