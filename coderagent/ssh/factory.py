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

from twisted.conch.ssh import common, factory, transport
from twisted.conch.ssh.common import getNS
from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.ssh.auth import AgentUserAuthServer
from coderagent.ssh.forwarding.opening import DeferredOpenConnection

log = Logger()

#: Channel window we advertise, like OpenSSH (64 packets of 32 KiB).  Conch's
#: 128 KiB default costs a round trip every 64 KiB of upload.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PACKET = 32 * 1024

#: Below this, upstream treats --ssh-max-timeout as an absolute deadline.
KEEPALIVE_THRESHOLD = 3.0
KEEPALIVE_COUNT_MAX = 3


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

    def connectionMade(self) -> None:
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
        if service.name == b"ssh-connection" and self._graceTimer is not None:
            self._graceTimer.cancel()
            self._graceTimer = None

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
        localChannel, dataLength = struct.unpack(">2L", packet[:8])
        channel = self.channels.get(localChannel)
        if channel is None:
            log.warn("data for unknown channel {id}", id=localChannel)
            return
        if dataLength > channel.localWindowLeft or dataLength > channel.localMaxPacket:
            log.warn("peer overran the window of channel {id}", id=localChannel)
            self.sendClose(channel)
            return
        data = getNS(packet[4:])[0]
        channel.localWindowLeft -= len(data)
        channel.dataReceived(data)
        self.reopenWindow(channel)

    def reopenWindow(self, channel: Any) -> None:
        """Give the peer more window once half is used and the consumer keeps up."""
        if getattr(channel, "consumerPaused", False) or channel.localClosed:
            return
        if channel.localWindowLeft < channel.localWindowSize // 2:
            self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)


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
    ) -> None:
        self.config = config
        self.portal = portal
        self.privateKeys = hostKeys
        self.publicKeys = {kind: key.public() for kind, key in hostKeys.items()}
        self.reactor = reactor
        self.primes = None

    def buildProtocol(self, addr: Any) -> AgentServerTransport:
        # Skip SSHFactory.buildProtocol: it logs a line per connection when
        # no moduli file is loaded, and our key exchange list needs none.
        t = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(t, AgentServerTransport)
        t.supportedPublicKeys = [
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms()
        ]
        return t
