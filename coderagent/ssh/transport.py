"""The SSH server transport, hardened and on the agent's packet fast path.

Conch supplies the protocol; this module narrows it to what a security-minded
sshd would offer (no SHA-1 key exchange or MACs, no CBC ciphers) and adds
what current clients prefer (AES-GCM, ChaCha20-Poly1305, EtM MACs: see
:mod:`coderagent.ssh.ciphers`) with OpenSSH's strict key exchange, which
keeps those safe from Terrapin (CVE-2023-48795).  It bounds the
unauthenticated phase and enforces a short ``--ssh-max-timeout`` as a
deadline.

It also keeps the state of the transport protocol itself, which Conch
leaves to the peer's good manners: which messages may arrive before, during
and after a key exchange, before a service is running and before
authentication (RFC 4253 sections 7 and 10, RFC 4252).  A message that is
out of place, or whose fields do not parse, ends the connection with a
DISCONNECT (PROTOCOL_ERROR, or KEY_EXCHANGE_FAILED for a key exchange that
cannot go on) and one log line; it never reaches a Conch handler that would
fail on it with a traceback.

Packets are sealed and opened by :mod:`coderagent.ssh.packets` and
:mod:`coderagent.ssh.ciphers` instead of Conch's ``sendPacket``/
``getPacket``: channel data is handed to the connection straight from the
cipher's output, without Conch's copies.  Each direction switches keys at
its own NEWKEYS (RFC 4253 section 7.3), not, as in Conch, both at the
peer's.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import common, transport
from twisted.conch.ssh.common import getNS
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.compat import (
    answerKexInit,
    canSendNow,
    holdForKeyExchange,
    inKeyExchange,
    sendNow,
    setPeerSupportsExtensions,
    skipNextKexPacket,
)
from coderagent.deferreds import cancelCall
from coderagent.netaddr import describePeer
from coderagent.ssh.auth import AgentUserAuthServer
from coderagent.ssh.ciphers import (
    OFFERED_CIPHERS,
    OFFERED_MACS,
    NegotiatedKeys,
    openerFor,
    sealerFor,
    weakWithoutStrictKex,
)
from coderagent.ssh.connection import KEEPALIVE_THRESHOLD, AgentConnection
from coderagent.ssh.negotiation import STRICT_KEX_SERVER, KexInit, NoAgreement, negotiate
from coderagent.ssh.packets import CHANNEL_DATA_HEAD, SEQUENCE_MASK, Chunk, PacketError
from coderagent.ssh.wire import MalformedPayload, layoutProblem

if TYPE_CHECKING:
    from coderagent.ssh.factory import AgentSSHFactory

log = Logger()

#: Bytes read from the client's socket at once (Twisted's default is 64 KiB):
#: fewer, larger reads cost fewer Python calls per packet.
READ_SIZE = 256 * 1024


def _withoutWeakAlgorithms(names: list[bytes]) -> list[bytes]:
    # group-exchange needs a moduli file and costs a prime search; the fixed
    # curves are what every current client picks anyway.
    return [n for n in names if b"sha1" not in n and b"group-exchange" not in n]


#: The key exchange methods (each needs one message from the client, 30).
KEY_EXCHANGES = _withoutWeakAlgorithms(list(transport.SSHServerTransport.supportedKeyExchanges))

MSG_KEXINIT = 20
MSG_NEWKEYS = 21
#: The client's one message of every key exchange method offered.
MSG_KEX_INIT = 30
MSG_USERAUTH_REQUEST = 50
#: The first message of the ``ssh-connection`` service (GLOBAL_REQUEST).
MSG_CONNECTION_FIRST = 80

_NAMES = {
    1: "DISCONNECT",
    2: "IGNORE",
    3: "UNIMPLEMENTED",
    4: "DEBUG",
    5: "SERVICE_REQUEST",
    6: "SERVICE_ACCEPT",
    7: "EXT_INFO",
    20: "KEXINIT",
    21: "NEWKEYS",
    30: "KEX_ECDH_INIT",
    31: "KEX_ECDH_REPLY",
    50: "USERAUTH_REQUEST",
    80: "GLOBAL_REQUEST",
    90: "CHANNEL_OPEN",
    98: "CHANNEL_REQUEST",
}


def _describe(messageNum: int) -> str:
    name = _NAMES.get(messageNum)
    return f"message {messageNum} ({name})" if name else f"message {messageNum}"


def _unassigned(messageNum: int) -> bool:
    """Transport message numbers with no message (answered with UNIMPLEMENTED)."""
    return 8 <= messageNum <= 19 or 22 <= messageNum <= 29


# Where the client is in the key exchange protocol (its side of it).
#: Before its first KEXINIT.
_AWAIT_KEXINIT = "awaiting KEXINIT"
#: KEXINIT received; its key exchange method's message (30) comes next.
_AWAIT_KEX = "awaiting the key exchange message"
#: Our NEWKEYS is sent; the client's comes next.
_AWAIT_NEWKEYS = "awaiting NEWKEYS"
#: No exchange on the client's side: a KEXINIT starts a re-key.
_IDLE = "idle"

#: The one message each state of a key exchange waits for.
_EXPECTED = {_AWAIT_KEXINIT: MSG_KEXINIT, _AWAIT_KEX: MSG_KEX_INIT, _AWAIT_NEWKEYS: MSG_NEWKEYS}


class AgentServerTransport(transport.SSHServerTransport):
    """Server transport with hardened algorithms and connection-level timers."""

    factory: AgentSSHFactory
    supportedCiphers = OFFERED_CIPHERS
    supportedMACs = OFFERED_MACS
    # Strict key exchange is a signal in the list, never chosen (see
    # coderagent.ssh.negotiation); Conch appends ext-info-s itself.
    supportedKeyExchanges = [*KEY_EXCHANGES, STRICT_KEX_SERVER]
    supportedCompressions = [b"none"]

    _graceTimer: IDelayedCall | None = None
    _deadline: IDelayedCall | None = None
    #: The sealer of the fast path: None during a key exchange, when every
    #: packet sent goes through _sendOutsideFastPath.
    _sealer: Any = None
    #: The sealer for the keys this side sends with (switched at our NEWKEYS).
    _outSealer: Any = None
    _opener: Any = None
    #: Where fast-path channel data goes (AgentConnection.channelDataReceived).
    _channelData: Any = None
    _kexState = _AWAIT_KEXINIT
    #: Until the client's first NEWKEYS.
    _initialKex = True
    #: The client asked for strict key exchange in its first KEXINIT.
    strictKex = False
    #: The client has authenticated (the ``ssh-connection`` service started).
    authenticated = False
    #: When the connection was made (for the debug server).
    since = 0.0
    #: Bytes of the SSH stream read from and written to the client (coderagent.ssh.traffic).
    rxBytes = 0
    txBytes = 0
    #: Whether the socket can be written to at once (a plain TCP or Unix connection).
    _sendNow = False
    #: The sealed packets held back while a read is handled (see _readPackets).
    _held: list[bytes] | None = None

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
        # Packets are written straight to the socket while nothing is
        # buffered (see coderagent.compat.sendNow).
        self._sendNow = canSendNow(tcp)
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
        return describePeer(self.transport)

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        # Conch builds a fresh ssh-userauth service for every request, and
        # with it a fresh failed-attempt counter and login timer: a client
        # (paramiko does this) re-requesting the service would get unlimited
        # tries.  Accept the repeat but keep the service that is counting.
        name = getNS(packet)[0]
        if name == b"ssh-userauth" and isinstance(self.service, AgentUserAuthServer):
            self.sendPacket(transport.MSG_SERVICE_ACCEPT, common.NS(name))
            return
        if self.factory.getService(self, name) is None:
            log.info(
                "{peer} asked for service {name!r}, which it cannot have",
                peer=self.describePeer(),
                name=name.decode("ascii", "replace"),
            )
        super().ssh_SERVICE_REQUEST(packet)  # accepts, or disconnects

    def setService(self, service: Any) -> None:
        super().setService(service)
        self._updateFastPath()
        if service.name == b"ssh-connection":
            self.authenticated = True
            if self._graceTimer is not None:
                self._graceTimer.cancel()
                self._graceTimer = None

    # -- the packet path: see coderagent.ssh.packets -------------------------

    def _updateFastPath(self) -> None:
        # Channel data goes straight to the connection only while it may
        # arrive at all: after authentication, outside a key exchange.
        # Otherwise it takes dispatchMessage, which refuses it.
        service = self.service
        if self._kexState is _IDLE and isinstance(service, AgentConnection):
            self._channelData = service.channelDataReceived
        else:
            self._channelData = None

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.sendPacketParts(messageType, (payload,))

    def sendPacketParts(self, messageType: int, parts: tuple[Chunk, ...]) -> None:
        """Send one packet whose payload is ``parts`` joined, without joining them.

        During a key exchange there is no fast-path sealer (see
        :meth:`sendKexInit`), so every packet takes the branch that holds
        back what may not be sent until the exchange ends, as Conch's
        ``sendPacket`` does, and switches keys after our NEWKEYS.
        Otherwise the check costs nothing extra.
        """
        sealer = self._sealer
        if sealer is None:
            self._sendOutsideFastPath(messageType, parts)
            return
        pieces = sealer.seal(self.outgoingPacketSequence, messageType, parts)
        self.outgoingPacketSequence += 1
        held = self._held
        if held is not None:
            held += pieces
        elif self._sendNow:
            sendNow(self.transport, pieces, self)
        else:
            tcp: Any = self.transport
            tcp.writeSequence(pieces)

    def sendPackets(self, messageType: int, packets: list[tuple[Chunk, ...]]) -> None:
        """Send several packets of ``messageType`` (each one's payload parts) in one write."""
        sealer = self._sealer
        if sealer is None or not self._sendNow:
            for parts in packets:
                self.sendPacketParts(messageType, parts)
            return
        pieces: list[bytes] = []
        sequence = self.outgoingPacketSequence
        for parts in packets:
            pieces += sealer.seal(sequence, messageType, parts)
            sequence += 1
        self.outgoingPacketSequence = sequence
        held = self._held
        if held is not None:
            held += pieces
        else:
            sendNow(self.transport, pieces, self)

    def _holdWrites(self) -> bool:
        """Collect what is sent from now on for one write (False: already collecting)."""
        if self._held is not None or not self._sendNow:
            return False
        self._held = []
        return True

    def _releaseWrites(self) -> None:
        """Write what was collected since :meth:`_holdWrites`, with one ``sendmsg``."""
        held, self._held = self._held, None
        if held and self.transport is not None:
            sendNow(self.transport, held, self)

    def _sendOutsideFastPath(self, messageType: int, parts: tuple[Chunk, ...]) -> None:
        if self._held:
            self._releaseWrites()  # what was sent before goes first
            self._held = []
        exchanging = inKeyExchange(self)
        if exchanging and holdForKeyExchange(self, messageType, parts):
            return
        sealer = self._outSealer
        if sealer is None:  # the first packet: the keys are Conch's "none"
            sealer = self._outSealer = sealerFor(self.currentEncryptions)
        tcp: Any = self.transport
        tcp.writeSequence(sealer.seal(self.outgoingPacketSequence, messageType, parts))
        self.outgoingPacketSequence += 1
        if messageType == MSG_NEWKEYS:
            # RFC 4253 section 7.3: what we send after NEWKEYS uses the new
            # keys (the DISCONNECT of a failed exchange included), whenever
            # the client's NEWKEYS comes.
            self._outSealer = sealerFor(self.nextEncryptions)
            self._kexState = _AWAIT_NEWKEYS
            if self.strictKex:
                self.outgoingPacketSequence = 0
        elif not exchanging:
            self._sealer = sealer

    def sendKexInit(self) -> None:
        # Every key exchange starts here (ours, or in answer to the peer's
        # KEXINIT).  Dropping the fast-path sealer sends the packets that
        # follow, until the exchange ends, through _sendOutsideFastPath.
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

    def _currentOpener(self) -> Any:
        ciphers = self.currentEncryptions
        opener = self._opener
        if opener is None or opener.ciphers is not ciphers:
            opener = self._opener = openerFor(ciphers)
        return opener

    def _readPackets(self) -> None:
        buf = self._rbuf
        pos = 0
        view = memoryview(buf)
        # The opener, the fast path's target and the sequence number change
        # only in what dispatchMessage runs (NEWKEYS, a service starting):
        # they are looked up again after each message, not for each packet.
        opener = self._currentOpener()
        deliver = self._channelData
        sequence = self.incomingPacketSequence
        # What handling these packets sends (window adjustments above all,
        # one per channel every few packets) is written once, at the end.
        holding = self._holdWrites()
        try:
            while True:
                tcp: Any = self.transport
                if tcp is None or tcp.disconnecting:
                    pos = len(buf)  # nothing more is read from a closing peer
                    break
                try:
                    opened = opener.open(view, pos, sequence)
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
                sequence += 1
                self.incomingPacketSequence = sequence
                if packet.recipient >= 0 and deliver is not None:
                    deliver(packet.recipient, packet.data)
                    continue
                if packet.recipient >= 0:
                    self.dispatchMessage(
                        packet.messageType,
                        CHANNEL_DATA_HEAD.pack(packet.recipient, len(packet.data)) + packet.data,
                    )
                else:
                    self.dispatchMessage(packet.messageType, packet.payload)
                opener = self._currentOpener()
                deliver = self._channelData
                sequence = self.incomingPacketSequence
        finally:
            view.release()
            if holding:
                self._releaseWrites()
        if pos:
            del buf[:pos]

    # -- what may arrive when ------------------------------------------------

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        problem = self._outOfPlace(messageNum)
        if problem is None:
            problem = layoutProblem(messageNum, payload)
            if problem is not None:
                problem = f"malformed {_describe(messageNum)}: {problem}"
        if problem is not None:
            self._protocolError(problem)
            return
        # What the layout cannot say (a key blob that is no key, a channel
        # that does not exist, a reply to nothing) still raises inside
        # Conch: it costs the peer its connection, not us a traceback.
        try:
            super().dispatchMessage(messageNum, payload)
        except (struct.error, IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
            log.warn(
                "malformed SSH message {num} from {peer}: {error}",
                num=messageNum,
                peer=self.describePeer(),
                error=repr(e),
            )
            kex = MSG_KEX_INIT <= messageNum < MSG_USERAUTH_REQUEST
            reason = transport.DISCONNECT_PROTOCOL_ERROR
            if kex:  # a key exchange value that is no key
                reason = transport.DISCONNECT_KEY_EXCHANGE_FAILED
            self.sendDisconnect(reason, b"malformed packet")

    def _outOfPlace(self, messageNum: int) -> str | None:
        """Why ``messageNum`` may not arrive now, or None if it may."""
        state = self._kexState
        if state is _IDLE:
            if messageNum >= MSG_USERAUTH_REQUEST:
                if self.service is None:
                    return f"{_describe(messageNum)} before a service request"
                if messageNum >= MSG_CONNECTION_FIRST and not self.authenticated:
                    return f"{_describe(messageNum)} before authentication"
                return None
            if messageNum == transport.MSG_SERVICE_REQUEST and self.authenticated:
                return "service request after authentication"
            if messageNum in (0, transport.MSG_SERVICE_ACCEPT, MSG_NEWKEYS) or (
                MSG_KEX_INIT <= messageNum < MSG_USERAUTH_REQUEST
            ):
                return f"unexpected {_describe(messageNum)}"
            return None
        # A key exchange is under way, or the first has yet to start
        # (RFC 4253 section 7.1: no service messages until it has ended).
        if messageNum == _EXPECTED[state] or messageNum == transport.MSG_DISCONNECT:
            return None
        if self._initialKex and self.strictKex:
            return f"strict KEX violation: unexpected {_describe(messageNum)}"
        if messageNum in (2, 3, 4) or _unassigned(messageNum):
            return None  # IGNORE, UNIMPLEMENTED, DEBUG; UNIMPLEMENTED for the rest
        if state is _AWAIT_KEXINIT:
            return f"{_describe(messageNum)} before key exchange"
        return f"{_describe(messageNum)} during key exchange ({state})"

    def _protocolError(self, problem: str) -> None:
        log.warn("protocol error from {peer}: {problem}", peer=self.describePeer(), problem=problem)
        self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, problem.encode("utf-8"))

    # -- key exchange ----------------------------------------------------------

    def ssh_KEXINIT(self, packet: bytes) -> None:
        # Conch's ssh_KEXINIT reads the message leniently and insists on a
        # MAC for AEAD ciphers; this reads it strictly and negotiates with
        # coderagent.ssh.negotiation, then leaves the rest to Conch.
        try:
            offer = KexInit.parse(packet)
        except MalformedPayload as e:
            self._protocolError(f"malformed KEXINIT: {e}")
            return
        if self._initialKex:
            self.strictKex = offer.strict
            # The KEXINIT was packet incomingPacketSequence - 1.
            if self.strictKex and self.incomingPacketSequence != 1:
                self._protocolError("strict KEX violation: KEXINIT was not the first packet")
                return
            setPeerSupportsExtensions(self, offer.extInfo)
        try:
            agreed = negotiate(
                offer,
                kex=KEY_EXCHANGES,
                hostKeys=self.supportedPublicKeys,
                ciphers=self.supportedCiphers,
                macs=self.supportedMACs,
                compressions=self.supportedCompressions,
            )
        except NoAgreement as e:
            log.info(
                "key exchange with {peer} failed: {problem} (the client offers {offered})",
                peer=self.describePeer(),
                problem=str(e),
                offered=b",".join(e.offered).decode("ascii", "replace")[:500],
            )
            self.sendDisconnect(transport.DISCONNECT_KEY_EXCHANGE_FAILED, str(e).encode())
            return
        if self._initialKex and not self.strictKex:
            for cipher, mac in ((agreed.cipherIn, agreed.macIn), (agreed.cipherOut, agreed.macOut)):
                if weakWithoutStrictKex(cipher, mac):
                    log.info(
                        "{peer} uses {cipher} {mac} without strict key exchange: open to "
                        "Terrapin (CVE-2023-48795); its client should be updated",
                        peer=self.describePeer(),
                        cipher=cipher.decode(),
                        mac=mac.decode(),
                    )
                    break
        self.otherKexInitPayload = bytes((MSG_KEXINIT,)) + packet
        self.kexAlg = agreed.kex
        self.keyAlg = agreed.hostKey
        self.nextEncryptions = NegotiatedKeys(
            agreed.cipherOut, agreed.cipherIn, agreed.macOut, agreed.macIn
        )
        self.outgoingCompressionType = agreed.compressionOut
        self.incomingCompressionType = agreed.compressionIn
        if offer.firstKexPacketFollows and (
            offer.kexAlgorithms[:1] != self.supportedKeyExchanges[:1]
            or offer.hostKeyAlgorithms[:1] != self.supportedPublicKeys[:1]
        ):
            skipNextKexPacket(self)  # the guess that follows is for another method
        self._kexState = _AWAIT_KEX
        self._updateFastPath()
        answerKexInit(self)

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        super().ssh_NEWKEYS(packet)  # the client's keys are in use from the next packet
        self._kexState = _IDLE
        self._initialKex = False
        self._updateFastPath()
        if self.strictKex:
            self.incomingPacketSequence = 0

    def sendUnimplemented(self) -> None:
        # RFC 4253 section 11.4: the number of the packet not understood.
        # Conch sends the next one (its counter has moved on by then, as
        # ours has).
        self.sendPacket(
            transport.MSG_UNIMPLEMENTED,
            struct.pack(">L", (self.incomingPacketSequence - 1) & SEQUENCE_MASK),
        )

    def receiveUnimplemented(self, seqnum: int) -> None:
        # Conch logs this as a warning; for a client it is chatter.
        log.debug(
            "{peer} did not implement our packet {seqnum}", peer=self.describePeer(), seqnum=seqnum
        )

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
        cancelCall(self._graceTimer)
        cancelCall(self._deadline)
        self._graceTimer = self._deadline = None
        super().connectionLost(reason)
