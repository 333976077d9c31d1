"""A minimal SSH client of the tests' own, for what OpenSSH's client cannot be made to send.

It speaks just enough SSH over a blocking socket to put any message in any
place: the version exchange, a curve25519-sha256 key exchange (optionally
asking for strict KEX, optionally with messages injected before NEWKEYS),
``publickey`` authentication with an Ed25519 key, and raw packets before,
during and after all of that.  No sleeps: every read blocks on the socket
(with a timeout that fails the test).

:class:`Reference` is each packet construction written a second time, from
the specifications (RFC 4253, RFC 5647, OpenSSH's ``PROTOCOL`` and
``PROTOCOL.chacha20poly1305``) and directly on ``cryptography``, a whole
packet at a time: no pieces, no memoryviews, a CTR counter kept by hand, the
ChaCha20 payload keystream started at block 1 instead of after block 0.
``tests/test_ciphers.py`` checks the agent's implementation against it byte
for byte, and this client uses it on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

MSG_DISCONNECT = 1
MSG_IGNORE = 2
MSG_UNIMPLEMENTED = 3
MSG_DEBUG = 4
MSG_SERVICE_REQUEST = 5
MSG_SERVICE_ACCEPT = 6
MSG_EXT_INFO = 7
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_KEX_ECDH_INIT = 30
MSG_KEX_ECDH_REPLY = 31
MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_FAILURE = 51
MSG_USERAUTH_SUCCESS = 52
MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_FAILURE = 82
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_OPEN_CONFIRMATION = 91
MSG_CHANNEL_DATA = 94

DISCONNECT_PROTOCOL_ERROR = 2
DISCONNECT_KEY_EXCHANGE_FAILED = 3
DISCONNECT_MAC_ERROR = 5
DISCONNECT_SERVICE_NOT_AVAILABLE = 7

TIMEOUT = 30.0


def string(data: bytes) -> bytes:
    return struct.pack(">L", len(data)) + data


def mpint(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return string(data)


def readString(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">L", data, pos)
    return data[pos + 4 : pos + 4 + n], pos + 4 + n


# -- the constructions, a whole packet at a time ----------------------------------------

_CIPHERS = {
    # name: (kind, key size)
    b"none": ("none", 0),
    b"aes128-ctr": ("ctr", 16),
    b"aes192-ctr": ("ctr", 24),
    b"aes256-ctr": ("ctr", 32),
    b"aes128-gcm@openssh.com": ("gcm", 16),
    b"aes256-gcm@openssh.com": ("gcm", 32),
    b"chacha20-poly1305@openssh.com": ("chacha", 64),
}
_MACS = {
    b"none": (None, 0, False),
    b"hmac-sha2-256": (hashlib.sha256, 32, False),
    b"hmac-sha2-512": (hashlib.sha512, 64, False),
    b"hmac-sha2-256-etm@openssh.com": (hashlib.sha256, 32, True),
    b"hmac-sha2-512-etm@openssh.com": (hashlib.sha512, 64, True),
}


class BadPacket(Exception):
    """The MAC or tag of a packet does not verify."""


@dataclass
class Reference:
    """One direction of one construction; sequence numbers are the caller's."""

    cipher: bytes
    mac: bytes
    iv: bytes
    key: bytes
    integ: bytes
    #: AES-CTR's counter block, as an integer (advanced by hand).
    _ctr: int = 0
    #: AES-GCM's invocation counter.
    _invocation: int = 0
    #: The padding of the packet :meth:`open` read last.
    lastPadding: bytes = b""

    def __post_init__(self) -> None:
        self.kind, keySize = _CIPHERS[self.cipher]
        self.key = self.key[:keySize]
        digest, macSize, self.etm = _MACS[self.mac if self.kind in ("none", "ctr") else b"none"]
        self._digest = digest
        self.integ = self.integ[:macSize]
        self.macSize = {"gcm": 16, "chacha": 16}.get(self.kind, macSize if digest else 0)
        self.blockSize = {"none": 8, "chacha": 8}.get(self.kind, 16)
        #: The length field is outside the padded, encrypted block.
        self.lengthApart = self.etm or self.kind in ("gcm", "chacha")
        if self.kind == "ctr":
            self._ctr = int.from_bytes(self.iv[:16], "big")
        if self.kind == "gcm":
            self._invocation = int.from_bytes(self.iv[4:12], "big")

    # AES-CTR with the counter kept here: every packet from its own first block.
    def _ctrApply(self, data: bytes) -> bytes:
        counter = self._ctr.to_bytes(16, "big")
        out = Cipher(algorithms.AES(self.key), modes.CTR(counter)).encryptor().update(data)
        return out

    def _ctrAdvance(self, n: int) -> None:
        assert n % 16 == 0
        self._ctr = (self._ctr + n // 16) % (1 << 128)

    def _gcmNonce(self) -> bytes:
        return self.iv[:4] + self._invocation.to_bytes(8, "big")

    @staticmethod
    def _chacha(key: bytes, counter: int, seq: int, data: bytes) -> bytes:
        nonce = counter.to_bytes(8, "little") + seq.to_bytes(8, "big")
        return Cipher(algorithms.ChaCha20(key, nonce), None).encryptor().update(data)

    def _hmac(self, seq: int, data: bytes) -> bytes:
        return hmac.new(self.integ, struct.pack(">L", seq) + data, self._digest).digest()

    def seal(self, seq: int, payload: bytes, padding: bytes | None = None) -> bytes:
        """The wire bytes of ``payload`` (message type included) as packet ``seq``."""
        bs = self.blockSize
        covered = 1 + len(payload) + (0 if self.lengthApart else 4)
        padLength = bs - covered % bs
        if padLength < 4:
            padLength += bs
        if padding is None:
            padding = os.urandom(padLength)
        assert len(padding) == padLength
        length = struct.pack(">L", 1 + len(payload) + padLength)
        body = bytes([padLength]) + payload + padding
        if self.kind == "none":
            return length + body
        if self.kind == "gcm":
            sealed = AESGCM(self.key).encrypt(self._gcmNonce(), body, length)
            self._invocation = (self._invocation + 1) % (1 << 64)
            return length + sealed
        if self.kind == "chacha":
            mainKey, lengthKey = self.key[:32], self.key[32:]
            encLength = self._chacha(lengthKey, 0, seq, length)
            encBody = self._chacha(mainKey, 1, seq, body)
            polyKey = self._chacha(mainKey, 0, seq, bytes(32))
            return encLength + encBody + Poly1305.generate_tag(polyKey, encLength + encBody)
        if self.etm:
            encBody = self._ctrApply(body)
            self._ctrAdvance(len(body))
            return length + encBody + self._hmac(seq, length + encBody)
        packet = length + body
        mac = self._hmac(seq, packet)
        encrypted = self._ctrApply(packet)
        self._ctrAdvance(len(packet))
        return encrypted + mac

    def lengthOnly(self, seq: int, length: int) -> bytes:
        """The first bytes of a packet that claims ``length``, as they go on the wire."""
        raw = struct.pack(">L", length)
        if self.kind == "chacha":
            return self._chacha(self.key[32:], 0, seq, raw)
        if self.kind == "ctr" and not self.etm:
            return self._ctrApply(raw + bytes(12))  # the first block carries it
        if self.kind == "none":
            return raw + bytes(4)  # and the padding length and type (8 bytes, a block)
        return raw

    @property
    def firstSize(self) -> int:
        """How many bytes :meth:`wireSize` needs."""
        return 4 if self.lengthApart or self.kind == "none" else self.blockSize

    def wireSize(self, seq: int, first: bytes) -> int:
        """The whole packet's size on the wire, from its first bytes."""
        if self.kind == "chacha":
            raw = self._chacha(self.key[32:], 0, seq, first[:4])
        elif self.kind == "ctr" and not self.etm:
            raw = self._ctrApply(first[:16])
        else:
            raw = first[:4]
        (length,) = struct.unpack(">L", raw[:4])
        return 4 + length + self.macSize

    def open(self, seq: int, wire: bytes) -> bytes:
        """The payload (message type included) of one whole packet."""
        if self.kind == "none":
            body = wire[4:]
        elif self.kind == "gcm":
            try:
                body = AESGCM(self.key).decrypt(self._gcmNonce(), wire[4:], wire[:4])
            except Exception as e:
                raise BadPacket("GCM tag") from e
            self._invocation = (self._invocation + 1) % (1 << 64)
        elif self.kind == "chacha":
            mainKey = self.key[:32]
            polyKey = self._chacha(mainKey, 0, seq, bytes(32))
            try:
                Poly1305.verify_tag(polyKey, wire[:-16], wire[-16:])
            except Exception as e:
                raise BadPacket("Poly1305 tag") from e
            body = self._chacha(mainKey, 1, seq, wire[4:-16])
        elif self.etm:
            end = len(wire) - self.macSize
            if not hmac.compare_digest(self._hmac(seq, wire[:end]), wire[end:]):
                raise BadPacket("EtM MAC")
            body = self._ctrApply(wire[4:end])
            self._ctrAdvance(end - 4)
        else:
            end = len(wire) - self.macSize
            packet = self._ctrApply(wire[:end])
            self._ctrAdvance(end)
            if not hmac.compare_digest(self._hmac(seq, packet), wire[end:]):
                raise BadPacket("MAC")
            body = packet[4:]
        padLength = body[0]
        self.lastPadding = body[len(body) - padLength :]
        return body[1 : len(body) - padLength]


def plain() -> Reference:
    return Reference(b"none", b"none", b"", b"", b"")


# -- the client ------------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Offer:
    """What the client's KEXINIT lists."""

    kex: list[bytes] = field(default_factory=lambda: [b"curve25519-sha256"])
    hostKeys: list[bytes] = field(default_factory=lambda: [b"ssh-ed25519"])
    ciphers: list[bytes] = field(default_factory=lambda: [b"aes128-ctr"])
    macs: list[bytes] = field(default_factory=lambda: [b"hmac-sha2-256"])
    compression: list[bytes] = field(default_factory=lambda: [b"none"])
    strict: bool = False
    extInfo: bool = False
    firstKexPacketFollows: bool = False

    def payload(self) -> bytes:
        kex = list(self.kex)
        if self.extInfo:
            kex.append(b"ext-info-c")
        if self.strict:
            kex.append(b"kex-strict-c-v00@openssh.com")
        lists = [kex, self.hostKeys, self.ciphers, self.ciphers, self.macs, self.macs]
        lists += [self.compression, self.compression, [], []]
        return (
            bytes([MSG_KEXINIT])
            + os.urandom(16)
            + b"".join(string(b",".join(names)) for names in lists)
            + bytes([self.firstKexPacketFollows])
            + b"\0\0\0\0"
        )


def _chooses(client: list[bytes], server: list[bytes]) -> bytes:
    for name in client:
        if name in server:
            return name
    raise AssertionError(f"the server offers none of {client}")


class RawClient:
    """One connection to the agent, driven message by message."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rbuf = b""
        self.out = plain()
        self.inn = plain()
        self.outSeq = 0
        self.inSeq = 0
        self.strict = False
        self.version = b"SSH-2.0-coderagent_raw_test"
        self.serverVersion = b""
        self.sessionID = b""
        self.serverKexInit = b""
        #: The negotiated (cipher, mac), the same both ways.
        self.agreed: tuple[bytes, bytes] = (b"none", b"none")
        self._nextOut = plain()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes -----------------------------------------------------------------

    def sendRaw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"closed with {len(self.rbuf)} of {n} bytes")
            self.rbuf += chunk
        data, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return data

    def exchangeVersions(self) -> bytes:
        self.sendRaw(self.version + b"\r\n")
        while b"\n" not in self.rbuf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Closed("closed before its version")
            self.rbuf += chunk
        line, self.rbuf = self.rbuf.split(b"\n", 1)
        self.serverVersion = line.rstrip(b"\r")
        return self.serverVersion

    # -- packets ---------------------------------------------------------------

    def send(self, messageType: int, payload: bytes = b"") -> None:
        self.sendRaw(self.out.seal(self.outSeq & 0xFFFFFFFF, bytes([messageType]) + payload))
        self.outSeq += 1

    def recv(self) -> tuple[int, bytes]:
        first = self._read(self.inn.firstSize)
        size = self.inn.wireSize(self.inSeq & 0xFFFFFFFF, first)
        wire = first + self._read(size - len(first))
        payload = self.inn.open(self.inSeq & 0xFFFFFFFF, wire)
        self.inSeq += 1
        return payload[0], payload[1:]

    def expect(self, messageType: int, skip: tuple[int, ...] = ()) -> bytes:
        while True:
            kind, payload = self.recv()
            if kind == messageType:
                return payload
            if kind not in skip:
                raise AssertionError(f"expected message {messageType}, got {kind}: {payload!r}")

    def disconnection(self, skip: tuple[int, ...] = ()) -> tuple[int, str]:
        """The server's DISCONNECT (reason code, description); the socket then closes."""
        payload = self.expect(MSG_DISCONNECT, skip)
        (code,) = struct.unpack_from(">L", payload)
        description, _ = readString(payload, 4)
        if self.sock.recv(1) != b"":
            raise AssertionError("data after DISCONNECT")
        return code, description.decode()

    # -- key exchange ----------------------------------------------------------

    def sendKexInit(self, offer: Offer) -> bytes:
        payload = offer.payload()
        self.send(payload[0], payload[1:])
        return payload

    def keyExchange(self, offer: Offer | None = None, newKeys: bool = True) -> None:
        """A whole curve25519-sha256 exchange.

        With ``newKeys=False`` it stops after the server's NEWKEYS (whose keys
        are then in use for reading); :meth:`sendNewKeys` finishes it.
        """
        offer = offer or Offer()
        if not self.serverVersion:
            self.exchangeVersions()
        ours = self.sendKexInit(offer)
        self.serverKexInit = bytes([MSG_KEXINIT]) + self.expect(MSG_KEXINIT)
        self.strict = offer.strict and b"kex-strict-s-v00@openssh.com" in self.serverKexInit
        self.finishKeyExchange(offer, ours, newKeys)

    def finishKeyExchange(self, offer: Offer, ours: bytes, newKeys: bool = True) -> None:
        server = self._serverLists()
        cipher = _chooses(offer.ciphers, server[2])
        mac = (
            b"none" if _CIPHERS[cipher][0] in ("gcm", "chacha") else _chooses(offer.macs, server[4])
        )
        secret = X25519PrivateKey.generate()
        qc = secret.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.send(MSG_KEX_ECDH_INIT, string(qc))
        reply = self.expect(MSG_KEX_ECDH_REPLY)
        hostKey, pos = readString(reply, 0)
        qs, pos = readString(reply, pos)
        signature, pos = readString(reply, pos)
        shared = secret.exchange(X25519PublicKey.from_public_bytes(qs))
        k = mpint(int.from_bytes(shared, "big"))
        h = hashlib.sha256(
            string(self.version)
            + string(self.serverVersion)
            + string(ours)
            + string(self.serverKexInit)
            + string(hostKey)
            + string(qc)
            + string(qs)
            + k
        ).digest()
        keyType, p = readString(hostKey, 0)
        publicKey, _ = readString(hostKey, p)
        sigType, p = readString(signature, 0)
        sig, _ = readString(signature, p)
        assert keyType == sigType == b"ssh-ed25519"
        Ed25519PublicKey.from_public_bytes(publicKey).verify(sig, h)
        if not self.sessionID:
            self.sessionID = h

        def derive(letter: bytes) -> bytes:
            out = hashlib.sha256(k + h + letter + self.sessionID).digest()
            while len(out) < 64:
                out += hashlib.sha256(k + h + out).digest()
            return out

        self.expect(MSG_NEWKEYS)
        self.inn = Reference(cipher, mac, derive(b"B"), derive(b"D"), derive(b"F"))
        if self.strict:
            self.inSeq = 0
        self._nextOut = Reference(cipher, mac, derive(b"A"), derive(b"C"), derive(b"E"))
        self.agreed = (cipher, mac)
        if newKeys:
            self.sendNewKeys()

    def sendNewKeys(self) -> None:
        self.send(MSG_NEWKEYS)
        self.out = self._nextOut
        if self.strict:
            self.outSeq = 0

    def _serverLists(self) -> list[list[bytes]]:
        pos = 17
        lists = []
        for _ in range(10):
            names, pos = readString(self.serverKexInit, pos)
            lists.append(names.split(b","))
        return lists

    # -- authentication ------------------------------------------------------------

    def authenticate(self, keyPath: Path, user: bytes = b"coder") -> None:
        """``publickey`` with an OpenSSH Ed25519 private key; must succeed."""
        self.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
        self.expect(MSG_SERVICE_ACCEPT, skip=(MSG_EXT_INFO,))
        key = serialization.load_ssh_private_key(keyPath.read_bytes(), None)
        assert isinstance(key, Ed25519PrivateKey)
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        blob = string(b"ssh-ed25519") + string(public)
        request = (
            string(user)
            + string(b"ssh-connection")
            + string(b"publickey")
            + b"\1"
            + string(b"ssh-ed25519")
            + string(blob)
        )
        signed = string(self.sessionID) + bytes([MSG_USERAUTH_REQUEST]) + request
        signature = string(b"ssh-ed25519") + string(key.sign(signed))
        self.send(MSG_USERAUTH_REQUEST, request + string(signature))
        self.expect(MSG_USERAUTH_SUCCESS)


def loggedIn(host: str, port: int, key: Path, offer: Offer | None = None) -> RawClient:
    """A client past key exchange and authentication."""
    client = RawClient(host, port)
    try:
        client.keyExchange(offer)
        client.authenticate(key)
    except BaseException:
        client.close()
        raise
    return client
