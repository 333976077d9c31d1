"""The SSH server transport, hardened and on the agent's packet fast path.

Conch supplies the protocol; this module narrows it to what a security-minded
sshd would offer (no SHA-1 key exchange or MACs, no CBC ciphers), bounds the
unauthenticated phase, enforces a short ``--ssh-max-timeout`` as a deadline,
and turns malformed packets into a clean disconnect instead of a traceback.

Packets are sealed and opened by :mod:`coderagent.ssh.packets` instead of
Conch's ``sendPacket``/``getPacket``: channel data is handed to the
connection straight from the cipher's output, without Conch's copies.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import common, transport
from twisted.conch.ssh.common import getNS
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.compat import holdForKeyExchange, inKeyExchange
from coderagent.ssh.auth import AgentUserAuthServer
from coderagent.ssh.connection import KEEPALIVE_THRESHOLD, AgentConnection
from coderagent.ssh.packets import CHANNEL_DATA_HEAD, Chunk, Opener, PacketError, Sealer

if TYPE_CHECKING:
    from coderagent.ssh.factory import AgentSSHFactory

log = Logger()

#: Bytes read from the client's socket at once (Twisted's default is 64 KiB):
#: fewer, larger reads cost fewer Python calls per packet.
READ_SIZE = 64 * 1024


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
    #: The client has authenticated (the ``ssh-connection`` service started).
    authenticated = False
    #: When the connection was made (for the debug server).
    since = 0.0
    #: Bytes of the SSH stream read from and written to the client (coderagent.ssh.traffic).
    rxBytes = 0
    txBytes = 0

    def connectionMade(self) -> None:
        self._rbuf = bytearray()
        self.factory.connectionStarted(self)
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
            peer=self.describePeer(),
            seconds=self.factory.config.loginGraceTime,
        )
        self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"login timeout")

    def _deadlineReached(self) -> None:
        self._deadline = None
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"maximum connection time reached")

    def describePeer(self) -> str:
        """The client's ``host:port``, for log lines (``?`` once disconnected)."""
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
            self.authenticated = True
            if self._graceTimer is not None:
                self._graceTimer.cancel()
                self._graceTimer = None

    # -- the packet path: see coderagent.ssh.packets -------------------------

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.sendPacketParts(messageType, (payload,))

    def sendPacketParts(self, messageType: int, parts: tuple[Chunk, ...]) -> None:
        """Send one packet whose payload is ``parts`` joined, without joining them.

        During a key exchange there is no cached sealer (see
        :meth:`sendKexInit`), so every packet takes the branch that holds
        back what may not be sent until the exchange ends, as Conch's
        ``sendPacket`` does.  Otherwise the check costs nothing extra.
        """
        ciphers = self.currentEncryptions
        sealer = self._sealer
        if sealer is None or sealer.ciphers is not ciphers:
            if inKeyExchange(self):
                if holdForKeyExchange(self, messageType, parts):
                    return
                sealer = Sealer(ciphers)  # not kept: the next packet checks again
            else:
                sealer = self._sealer = Sealer(ciphers)
        tcp: Any = self.transport
        tcp.writeSequence(sealer.seal(self.outgoingPacketSequence, messageType, parts))
        self.outgoingPacketSequence += 1

    def sendKexInit(self) -> None:
        # Every key exchange starts here (ours, or in answer to the peer's
        # KEXINIT).  Dropping the sealer sends the packets that follow, until
        # the new keys are in use, through sendPacketParts' checking branch.
        super().sendKexInit()
        self._sealer = None

    def getPacket(self) -> None:
        # Conch's dataReceived calls this after the version exchange; our
        # own loop (_readPackets) parses packets instead.
        return None

    def dataReceived(self, data: bytes) -> None:
        self.rxBytes += len(data)
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
                    log.warn(
                        "bad packet from {peer}: {error}", peer=self.describePeer(), error=str(e)
                    )
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
                        CHANNEL_DATA_HEAD.pack(packet.recipient, len(packet.data)) + packet.data,
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
                peer=self.describePeer(),
                error=repr(e),
            )
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"malformed packet")

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # Conch logs every client disconnect as an error; a user closing
        # their session is not one.
        level = log.info if reasonCode == transport.DISCONNECT_BY_APPLICATION else log.warn
        level(
            "{peer} disconnected: {reason} (code {code})",
            peer=self.describePeer(),
            reason=description.decode("utf-8", "replace"),
            code=reasonCode,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connectionEnded(self)
        for timer in (self._graceTimer, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._graceTimer = self._deadline = None
        super().connectionLost(reason)
