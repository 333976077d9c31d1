"""SSH binary packets (RFC 4253 §6) sealed and opened with as few copies as possible.

Conch's ``sendPacket``/``getPacket`` build every packet by concatenation and
slice their receive buffer once per packet: a 32 KiB channel-data packet is
copied about seven times on its way out and ten on its way in, and each MAC
is computed with a fresh ``hmac.HMAC`` over ``seq + packet`` (one more copy).
On a bulk forward that copying, not the cipher, is what a Python server
spends its core on.

:class:`Sealer` and :class:`Opener` keep the wire format exactly, but feed
the cipher and the MAC piece by piece (header, payload parts, padding) from
``memoryview`` slices, and hand channel data to the connection as the
cipher's own output.  That needs a cipher whose ``update`` may be called with
any length: CTR and ``none`` (before the first key exchange).  These two
classes are the encrypt-and-MAC construction of RFC 4253 (the MAC over the
plaintext); :mod:`coderagent.ssh.ciphers` has the others (EtM MACs, AES-GCM,
ChaCha20-Poly1305) on the same interface.  Each object is bound to one set
of keys (its ``ciphers``); the transport takes a new one whenever new keys
are installed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

#: packet_length, padding_length, message type.
_HEAD = struct.Struct(">LBB")
_SEQ = struct.Struct(">L")
#: A packet length on its own (the constructions that do not encrypt it
#: with the rest of the header).
U32 = struct.Struct(">L")
#: padding_length, message type: the header after an unencrypted length.
HEAD_AFTER_LENGTH = struct.Struct(">BB")
#: Sequence numbers are uint32 on the wire and wrap (RFC 4253 section 6.4).
SEQUENCE_MASK = 0xFFFFFFFF
#: The head of a CHANNEL_DATA payload: recipient channel, data length.
CHANNEL_DATA_HEAD = struct.Struct(">LL")

#: Bytes of a packet decrypted before the rest has to be there: the header
#: and, for channel data, the channel's head (the smallest packet is 16).
HEAD_SIZE = _HEAD.size + CHANNEL_DATA_HEAD.size
_HEAD_AND_DATA_HEAD = struct.Struct(">LBBLL")

#: Parts of a payload up to this size travel with the header: one cipher
#: call, one MAC call and one written piece fewer for each.
SMALL_PART = 64

#: Largest packet accepted (OpenSSH's PACKET_MAX_SIZE); bounds each
#: connection's receive buffer.
MAX_PACKET_LENGTH = 256 * 1024

MSG_CHANNEL_DATA = 94

Chunk = bytes | memoryview


class PacketError(Exception):
    """The peer sent something that is not a valid packet; the connection must end.

    ``reason`` is an RFC 4253 disconnect reason code.
    """

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


DISCONNECT_PROTOCOL_ERROR = 2
DISCONNECT_MAC_ERROR = 5


def _streamable(cipherName: bytes) -> bool:
    return cipherName == b"none" or cipherName.endswith(b"-ctr")


def _updater(cipherName: bytes, context: Any) -> Any:
    # Conch's null cipher returns its input, which may be a view of our
    # receive buffer; the packet must own its bytes.
    return bytes if cipherName == b"none" else context.update


def keyedMac(digest: str, key: bytes) -> Any:
    """A keyed HMAC (``digest`` is a hash name: ``sha256``) to ``copy()`` per packet.

    ``cryptography``'s HMAC is a native class: ``copy``, ``update``,
    ``finalize`` and ``verify`` are each one call, where the standard
    library's ``hmac.HMAC`` adds a Python frame to every one of them.
    """
    return HMAC(key, getattr(hashes, digest.upper())())


def _macBase(params: Any) -> Any:
    """A keyed HMAC for Conch's MAC parameters, or None for the ``none`` MAC.

    Conch keeps the key zero-padded to the hash's block size; HMAC pads short
    keys with zeros itself, so the result is the same MAC Conch computes.
    """
    digestmod = params[0]
    if not digestmod:
        return None
    return keyedMac(digestmod().name, params.key)


def verifyMac(mac: Any, tag: Chunk) -> None:
    """Raise :class:`PacketError` unless ``tag`` is ``mac``'s (compared in constant time)."""
    try:
        mac.verify(bytes(tag))
    except InvalidSignature:
        raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC") from None


class PaddingPool:
    """Random padding for outgoing packets, shared by every kind of sealer."""

    __slots__ = ("_pool", "_poolPos")

    def __init__(self) -> None:
        self._pool = b""
        self._poolPos = 0

    def _padding(self, n: int) -> bytes:
        # Random padding from a pooled os.urandom: one syscall per ~200
        # packets instead of one per packet.
        pos = self._poolPos
        if pos + n > len(self._pool):
            self._pool = os.urandom(4096)
            pos = 0
        self._poolPos = pos + n
        return self._pool[pos : pos + n]


class Sealer(PaddingPool):
    """Encrypts and MACs outgoing packets (CTR or ``none``, encrypt-and-MAC)."""

    __slots__ = ("_mac", "_update", "blockSize", "ciphers")

    def __init__(self, ciphers: Any) -> None:
        """For Conch's ``SSHCiphers`` (the ``none`` cipher before the first exchange)."""
        if not _streamable(ciphers.outCipType):
            raise ValueError(f"cipher {ciphers.outCipType!r} cannot be sealed piecewise")
        self._setUp(
            ciphers,
            max(ciphers.encBlockSize, 8),
            _updater(ciphers.outCipType, ciphers.encryptor),
            _macBase(ciphers.outMAC),
        )

    @classmethod
    def withKeys(cls, owner: Any, blockSize: int, update: Any, mac: Any) -> Sealer:
        """A sealer over a CTR ``update`` and a keyed HMAC to copy per packet."""
        sealer = cls.__new__(cls)
        sealer._setUp(owner, blockSize, update, mac)
        return sealer

    def _setUp(self, owner: Any, blockSize: int, update: Any, mac: Any) -> None:
        PaddingPool.__init__(self)
        self.ciphers = owner
        self.blockSize = blockSize
        self._update = update
        self._mac = mac

    def seal(self, sequence: int, messageType: int, parts: Sequence[Chunk]) -> list[bytes]:
        """The wire bytes of one packet, as pieces to write in order.

        Small parts (a channel's head) are joined to the header, and the
        padding's ciphertext to the MAC: channel data goes out in three
        pieces, a small message in one or two.
        """
        size = 1  # the message type
        for part in parts:
            size += len(part)
        bs = self.blockSize
        padLength = bs - (size + 5) % bs
        if padLength < 4:
            padLength += bs
        lead = _HEAD.pack(size + padLength + 1, padLength, messageType)
        rest = parts
        while rest and len(rest[0]) <= SMALL_PART:
            lead += rest[0]
            rest = rest[1:]
        padding = self._padding(padLength)
        update = self._update
        out = [update(lead)]
        for part in rest:
            out.append(update(part))
        base = self._mac
        if base is None:
            out.append(update(padding))
            return out
        mac = base.copy()
        mac.update(_SEQ.pack(sequence & 0xFFFFFFFF) + lead)
        for part in rest:
            mac.update(part)
        mac.update(padding)
        out.append(update(padding) + mac.finalize())
        return out


class Opened:
    """One received packet: a message, or channel data ready for the connection."""

    __slots__ = ("data", "messageType", "payload", "recipient")

    def __init__(
        self, messageType: int, payload: bytes, recipient: int = -1, data: bytes = b""
    ) -> None:
        self.messageType = messageType
        #: The message after its type byte (empty for fast channel data).
        self.payload = payload
        #: For CHANNEL_DATA opened on the fast path: the local channel id and data.
        self.recipient = recipient
        self.data = data


class Opener:
    """Decrypts and verifies incoming packets (CTR or ``none``, encrypt-and-MAC).

    :meth:`open` is called with the receive buffer and a read position; it
    returns the next packet and the position after it, or ``None`` while the
    packet is incomplete; the caller then keeps the bytes from ``pos`` on and
    calls again with the packet's start once more has arrived.  The header
    already decrypted is kept meanwhile, since a CTR keystream cannot be
    rewound.
    """

    __slots__ = ("_head", "_mac", "_macSize", "_update", "blockSize", "ciphers")

    def __init__(self, ciphers: Any) -> None:
        """For Conch's ``SSHCiphers`` (the ``none`` cipher before the first exchange)."""
        if not _streamable(ciphers.inCipType):
            raise ValueError(f"cipher {ciphers.inCipType!r} cannot be opened piecewise")
        mac = _macBase(ciphers.inMAC)
        self._setUp(
            ciphers,
            max(ciphers.decBlockSize, 8),
            _updater(ciphers.inCipType, ciphers.decryptor),
            mac,
            ciphers.verifyDigestSize if mac is not None else 0,
        )

    @classmethod
    def withKeys(cls, owner: Any, blockSize: int, update: Any, mac: Any, macSize: int) -> Opener:
        """An opener over a CTR ``update`` and a keyed HMAC to copy per packet."""
        opener = cls.__new__(cls)
        opener._setUp(owner, blockSize, update, mac, macSize)
        return opener

    def _setUp(self, owner: Any, blockSize: int, update: Any, mac: Any, macSize: int) -> None:
        self.ciphers = owner
        self.blockSize = blockSize
        self._update = update
        self._mac = mac
        self._macSize = macSize
        self._head: tuple[bytes, int, int, int, int, int] | None = None

    def open(self, view: memoryview, pos: int, sequence: int) -> tuple[Opened, int] | None:
        update = self._update
        head = self._head
        if head is None:
            have = len(view) - pos
            if have >= HEAD_SIZE:
                # The header and the next 8 bytes at once: a channel's head
                # if this is channel data, inside the packet in any case
                # (the smallest is 16 bytes).
                raw = update(view[pos : pos + HEAD_SIZE])
                packetLength, padLength, messageType, recipient, dataLength = (
                    _HEAD_AND_DATA_HEAD.unpack(raw)
                )
            elif have >= _HEAD.size:
                # The header alone is enough to refuse a bad length at once.
                raw = update(view[pos : pos + _HEAD.size])
                packetLength, padLength, messageType = _HEAD.unpack(raw)
                recipient = dataLength = -1
            else:
                return None
            if packetLength > MAX_PACKET_LENGTH:
                raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad packet length {packetLength}")
            if (packetLength + 4) % self.blockSize:
                raise PacketError(
                    DISCONNECT_PROTOCOL_ERROR,
                    f"bad packet mod ({packetLength + 4}%{self.blockSize})",
                )
            if padLength < 4 or padLength + 2 > packetLength:
                raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad padding length {padLength}")
            head = (raw, packetLength, padLength, messageType, recipient, dataLength)
        elif len(head[0]) < HEAD_SIZE:  # only the header had arrived
            if len(view) - pos < HEAD_SIZE:
                return None
            raw = head[0] + update(view[pos + _HEAD.size : pos + HEAD_SIZE])
            recipient, dataLength = CHANNEL_DATA_HEAD.unpack_from(raw, _HEAD.size)
            head = (raw, head[1], head[2], head[3], recipient, dataLength)
        raw, packetLength, padLength, messageType, recipient, dataLength = head
        # ``pos`` stays at the packet's start until the whole packet is here.
        end = pos + 4 + packetLength
        macSize = self._macSize
        if len(view) < end + macSize:
            self._head = head
            return None
        self._head = None
        bodyEnd = end - padLength
        start = pos + HEAD_SIZE
        # A short message's padding starts inside ``raw``: the keystream
        # only moves forward, so what follows ``raw`` is decrypted once.
        split = bodyEnd if bodyEnd > start else start
        data = update(view[start:split])
        if messageType == MSG_CHANNEL_DATA and dataLength == bodyEnd - start:
            opened = Opened(messageType, b"", recipient, data)
        else:  # a message, or channel data whose length disagrees (refused later)
            opened = Opened(messageType, (raw + data)[6 : bodyEnd - pos])
        padding = update(view[split:end])
        base = self._mac
        if base is not None:
            mac = base.copy()
            mac.update(_SEQ.pack(sequence & 0xFFFFFFFF) + raw)
            mac.update(data)
            mac.update(padding)
            verifyMac(mac, view[end : end + macSize])
        return opened, end + macSize
