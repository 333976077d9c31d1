"""The SSH transport, connection service and factory, configured for the agent.

Conch supplies the protocol; this module narrows it to what a security-minded
sshd would offer (no SHA-1 key exchange or MACs, no CBC ciphers), bounds the
unauthenticated phase, answers upstream's ``--ssh-max-timeout`` with
keep-alives, and turns malformed packets into a clean disconnect instead of a
traceback.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twisted.conch.ssh import common, connection, factory, transport
from twisted.conch.ssh.common import getNS
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.observe.metrics import AgentMetrics
from coderagent.ssh.auth import AgentUserAuthServer
from coderagent.ssh.forwarding.opening import DeferredOpenConnection
from coderagent.ssh.packets import Chunk, Opener, PacketError, Sealer

log = Logger()

#: Channel window we advertise, like OpenSSH (64 packets of 32 KiB).  Conch's
#: 128 KiB default costs a round trip every 64 KiB of upload.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PACKET = 32 * 1024

#: Window all of one connection's channels share once there are many: each
#: gets an even share, between MIN_CHANNEL_WINDOW and CHANNEL_WINDOW.  The
#: window is what a peer may send us before we have forwarded it, so this
#: bounds what one client can make the agent buffer (200 channels at 2 MiB
#: would be 400 MiB).  It also keeps OpenSSH's client from reading that much
#: from its local sockets ahead of us, where its buffer growth (a realloc
#: and copy per 32 KiB read) costs more CPU than the transfer itself.
CONNECTION_WINDOW_BUDGET = 8 * 1024 * 1024
MIN_CHANNEL_WINDOW = 128 * 1024

#: Bytes read from the client's socket at once (Twisted's default is 64 KiB):
#: fewer, larger reads cost fewer Python calls per packet.
READ_SIZE = 64 * 1024

_CHANNEL_DATA_HEAD = struct.Struct(">2L")

#: Below this, upstream treats --ssh-max-timeout as an absolute deadline.
KEEPALIVE_THRESHOLD = 3.0
KEEPALIVE_COUNT_MAX = 3

#: How long a graceful shutdown waits for SSH clients to go after telling them.
SHUTDOWN_GRACE = 3.0


@dataclass(frozen=True)
class SSHConfig:
    """The SSH server's knobs, resolved from the options by ``tap``."""

    loginGraceTime: float = 120.0
    maxAuthTries: int = 6
    maxTimeout: float = 72 * 3600.0


def _withoutWeakAlgorithms(names: list[bytes]) -> list[bytes]:
    # group-exchange needs a moduli file and costs a prime search; the fixed
    # curves are what every current client picks anyway.
    return [n for n in names if b"sha1" not in n and b"group-exchange" not in n]


class AgentServerTransport(transport.SSHServerTransport):
    """Server transport with hardened algorithms and connection-level timers."""

    factory: AgentSSHFactory
    supportedCiphers = [c for c in transport.SSHServerTransport.supportedCiphers if b"-ctr" in c]
    supportedMACs = [m for m in transport.SSHServerTransport.supportedMACs if b"sha2" in m]
    supportedKeyExchanges = _withoutWeakAlgorithms(
        list(transport.SSHServerTransport.supportedKeyExchanges)
    )
    supportedCompressions = [b"none"]

    _graceTimer: IDelayedCall | None = None
    _deadline: IDelayedCall | None = None
    _sealer: Sealer | None = None
    _opener: Opener | None = None
    _authenticated = False
    #: When the connection was made (for the debug server).
    since = 0.0

    def connectionMade(self) -> None:
        self._rbuf = bytearray()
        self.factory.connections.add(self)
        self.since = self.factory.reactor.seconds()
        tcp: Any = self.transport
        if hasattr(tcp, "setTcpNoDelay"):
            # Replies are small and latency-bound (exit-status, EOF, CLOSE
            # leave as separate writes); Nagle would hold each for the
            # peer's delayed ACK.  OpenSSH sets TCP_NODELAY too.
            tcp.setTcpNoDelay(True)
        if hasattr(tcp, "bufferSize"):
            tcp.bufferSize = READ_SIZE
        super().connectionMade()
        clock = self.factory.reactor
        config = self.factory.config
        self._graceTimer = clock.callLater(config.loginGraceTime, self._loginGraceExpired)
        if 0 < config.maxTimeout < KEEPALIVE_THRESHOLD:
            self._deadline = clock.callLater(config.maxTimeout, self._deadlineReached)

    def _loginGraceExpired(self) -> None:
        self._graceTimer = None
        log.info(
            "closing unauthenticated connection from {peer} after {seconds}s",
            peer=self._peer(),
            seconds=self.factory.config.loginGraceTime,
        )
        self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"login timeout")

    def _deadlineReached(self) -> None:
        self._deadline = None
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"maximum connection time reached")

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        # Conch builds a fresh ssh-userauth service for every request, and
        # with it a fresh failed-attempt counter and login timer: a client
        # (paramiko does this) re-requesting the service would get unlimited
        # tries.  Accept the repeat but keep the service that is counting.
        name = getNS(packet)[0]
        if name == b"ssh-userauth" and isinstance(self.service, AgentUserAuthServer):
            self.sendPacket(transport.MSG_SERVICE_ACCEPT, common.NS(name))
            return
        super().ssh_SERVICE_REQUEST(packet)

    def setService(self, service: Any) -> None:
        super().setService(service)
        if service.name == b"ssh-connection":
            self._authenticated = True
            if self._graceTimer is not None:
                self._graceTimer.cancel()
                self._graceTimer = None

    # -- the packet path: see coderagent.ssh.packets -------------------------

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.sendPacketParts(messageType, (payload,))

    def sendPacketParts(self, messageType: int, parts: tuple[Chunk, ...]) -> None:
        """Send one packet whose payload is ``parts`` joined, without joining them."""
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            if not self._allowedKeyExchangeMessageType(messageType):
                self._blockedByKeyExchange.append((messageType, b"".join(parts)))
                return
        ciphers = self.currentEncryptions
        sealer = self._sealer
        if sealer is None or sealer.ciphers is not ciphers:
            sealer = self._sealer = Sealer(ciphers)
        tcp: Any = self.transport
        tcp.writeSequence(sealer.seal(self.outgoingPacketSequence, messageType, parts))
        self.outgoingPacketSequence += 1

    def getPacket(self) -> None:
        # Conch's dataReceived calls this after the version exchange; our
        # own loop (_readPackets) parses packets instead.
        return None

    def dataReceived(self, data: bytes) -> None:
        if self.gotVersion:
            self._rbuf += data
        else:
            super().dataReceived(data)  # the version line; the rest stays in self.buf
            if not self.gotVersion:
                return
            self._rbuf += self.buf
            self.buf = b""
        self._readPackets()

    def _readPackets(self) -> None:
        buf = self._rbuf
        pos = 0
        view = memoryview(buf)
        try:
            while True:
                tcp = self.transport
                if tcp is None or getattr(tcp, "disconnecting", False):
                    pos = len(buf)  # nothing more is read from a closing peer
                    break
                ciphers = self.currentEncryptions
                opener = self._opener
                if opener is None or opener.ciphers is not ciphers:
                    opener = self._opener = Opener(ciphers)
                try:
                    opened = opener.open(view, pos, self.incomingPacketSequence)
                except PacketError as e:
                    log.warn("bad packet from {peer}: {error}", peer=self._peer(), error=str(e))
                    self.sendDisconnect(e.reason, str(e).encode("utf-8"))
                    pos = len(buf)
                    break
                if opened is None:
                    break
                packet, pos = opened
                self.incomingPacketSequence += 1
                service = self.service
                if packet.recipient >= 0 and isinstance(service, AgentConnection):
                    service.channelDataReceived(packet.recipient, packet.data)
                elif packet.recipient >= 0:
                    self.dispatchMessage(
                        packet.messageType,
                        _CHANNEL_DATA_HEAD.pack(packet.recipient, len(packet.data)) + packet.data,
                    )
                else:
                    self.dispatchMessage(packet.messageType, packet.payload)
        finally:
            view.release()
        if pos:
            del buf[:pos]

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        # Conch indexes payloads without checking their length; a truncated
        # or garbage packet must cost the peer its connection, not cost us a
        # traceback in the log.
        try:
            super().dispatchMessage(messageNum, payload)
        except (struct.error, IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
            log.warn(
                "malformed SSH message {num} from {peer}: {error}",
                num=messageNum,
                peer=self._peer(),
                error=repr(e),
            )
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"malformed packet")

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # Conch logs every client disconnect as an error; a user closing
        # their session is not one.
        level = log.info if reasonCode == transport.DISCONNECT_BY_APPLICATION else log.warn
        level(
            "{peer} disconnected: {reason} (code {code})",
            peer=self._peer(),
            reason=description.decode("utf-8", "replace"),
            code=reasonCode,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections.discard(self)
        if not self.factory.connections:
            self.factory._drain()
        if not self._authenticated and self.factory.metrics is not None:
            self.factory.metrics.sshFailedConnections.inc()
        for timer in (self._graceTimer, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._graceTimer = self._deadline = None
        super().connectionLost(reason)


class AgentConnection(DeferredOpenConnection):
    """``ssh-connection`` with keep-alives and consumer-driven window re-opening.

    Keep-alives follow upstream's ``--ssh-max-timeout``: every max/3 we ask the
    client for a reply; three unanswered in a row close the connection.

    Stock Conch re-opens a channel's window as soon as data arrives, so a slow
    consumer makes us buffer without bound.  Here a channel may set
    ``consumerPaused``; the window then stays shut until the channel calls
    :meth:`reopenWindow` once its consumer has drained.
    """

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
                "closing connection from {peer}: keep-alive timeout", peer=self.transport._peer()
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
        head = _CHANNEL_DATA_HEAD.pack(self.channelsToRemoteChannel[channel], len(data))
        self.transport.sendPacketParts(connection.MSG_CHANNEL_DATA, (head, data))

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
        if getattr(channel, "consumerPaused", False) or channel.localClosed:
            return
        target = self.windowShare(getattr(channel, "windowCap", channel.localWindowSize))
        if channel.localWindowLeft < target // 2:
            self.adjustWindow(channel, target - channel.localWindowLeft)


class AgentSSHFactory(factory.SSHFactory):
    """Builds :class:`AgentServerTransport` with the agent's keys and portal."""

    protocol = AgentServerTransport
    noisy = False
    services = {
        b"ssh-userauth": AgentUserAuthServer,
        b"ssh-connection": AgentConnection,
    }

    def __init__(
        self,
        *,
        config: SSHConfig,
        portal: Any,
        hostKeys: dict[bytes, Any],
        reactor: IReactorTime,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        #: Live connections (for the debug server and a graceful shutdown).
        self.connections: set[AgentServerTransport] = set()
        self._drained: list[Deferred[None]] = []
        self.portal = portal
        self.privateKeys = hostKeys
        self.publicKeys = {kind: key.public() for kind, key in hostKeys.items()}
        self.reactor = reactor
        self.primes = None

    def describeConnections(self) -> list[dict[str, Any]]:
        """Every live connection: who, since when, its channels and forwards."""
        out = []
        for t in list(self.connections):
            peer = t.transport.getPeer() if t.transport is not None else None
            service = t.service
            channels = []
            for chan in getattr(service, "channels", {}).values():
                channels.append(
                    {
                        "id": chan.id,
                        "type": (chan.name or b"?").decode("ascii", "replace"),
                        **{
                            k: v
                            for k, v in (
                                ("command", getattr(chan, "command", None)),
                                ("pty", getattr(chan, "pty", None) is not None),
                            )
                            if v is not None
                        },
                    }
                )
            avatar = getattr(t, "avatar", None)
            forwards = getattr(avatar, "forwards", None)
            out.append(
                {
                    "peer": f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
                    "user": getattr(avatar, "username", None),
                    "authenticated": t._authenticated,
                    "connected_seconds": round(self.reactor.seconds() - t.since, 3),
                    "client": (t.otherVersionString or b"").decode("ascii", "replace"),
                    "channels": channels,
                    "forwards": sorted(
                        listener.description
                        for listener in getattr(forwards, "listeners", {}).values()
                    ),
                }
            )
        return out

    def shutdown(self, timeout: float = SHUTDOWN_GRACE) -> Deferred[None]:
        """Tell every client the agent is going away; fires once they are gone (or ``timeout``)."""
        done: Deferred[None] = Deferred()
        if not self.connections:
            done.callback(None)
            return done
        for t in list(self.connections):
            t.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"the agent is shutting down")
        self._drained.append(done)
        timer = self.reactor.callLater(timeout, self._drain, True)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(settled)

    def _drain(self, force: bool = False) -> None:
        if self.connections and not force:
            return
        if force:
            for t in list(self.connections):
                tcp: Any = t.transport
                if tcp is not None:
                    tcp.abortConnection()
        waiters, self._drained = self._drained, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def buildProtocol(self, addr: Any) -> AgentServerTransport:
        # Skip SSHFactory.buildProtocol: it logs a line per connection when
        # no moduli file is loaded, and our key exchange list needs none.
        t = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(t, AgentServerTransport)
        t.supportedPublicKeys = [
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms()
        ]
        return t
