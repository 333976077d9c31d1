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

import hmac
import os
import struct
from collections.abc import Sequence
from typing import Any

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

#: Bytes of a packet decrypted before the rest has to be there.
HEAD_SIZE = _HEAD.size

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


def _macBase(params: Any) -> Any:
    """A keyed HMAC to ``copy()`` per packet, or None for the ``none`` MAC.

    Conch keeps the key zero-padded to the hash's block size; HMAC pads short
    keys with zeros itself, so the result is the same MAC Conch computes.
    """
    digestmod = params[0]
    if not digestmod:
        return None
    return hmac.new(params.key, digestmod=digestmod)


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
        """The wire bytes of one packet, as pieces to write in order."""
        size = 1  # the message type
        for part in parts:
            size += len(part)
        bs = self.blockSize
        padLength = bs - (size + 5) % bs
        if padLength < 4:
            padLength += bs
        head = _HEAD.pack(size + padLength + 1, padLength, messageType)
        padding = self._padding(padLength)
        update = self._update
        out = [update(head)]
        for part in parts:
            out.append(update(part))
        out.append(update(padding))
        base = self._mac
        if base is not None:
            mac = base.copy()
            mac.update(_SEQ.pack(sequence & 0xFFFFFFFF))
            mac.update(head)
            for part in parts:
                mac.update(part)
            mac.update(padding)
            out.append(mac.digest())
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
        self._head: tuple[bytes, int, int, int] | None = None

    def open(self, view: memoryview, pos: int, sequence: int) -> tuple[Opened, int] | None:
        update = self._update
        head = self._head
        if head is None:
            if len(view) - pos < HEAD_SIZE:
                return None
            raw = update(view[pos : pos + HEAD_SIZE])
            packetLength, padLength, messageType = _HEAD.unpack(raw)
            if packetLength > MAX_PACKET_LENGTH:
                raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad packet length {packetLength}")
            if (packetLength + 4) % self.blockSize:
                raise PacketError(
                    DISCONNECT_PROTOCOL_ERROR,
                    f"bad packet mod ({packetLength + 4}%{self.blockSize})",
                )
            if padLength < 4 or padLength + 2 > packetLength:
                raise PacketError(DISCONNECT_PROTOCOL_ERROR, f"bad padding length {padLength}")
            head = (raw, packetLength, padLength, messageType)
        # ``pos`` stays at the packet's start until the whole packet is here.
        pos += HEAD_SIZE
        raw, packetLength, padLength, messageType = head
        rest = packetLength + 4 - HEAD_SIZE  # payload after the type byte, then padding
        if len(view) - pos < rest + self._macSize:
            self._head = head
            return None
        self._head = None
        bodyLength = rest - padLength
        dataHead = b""
        data = b""
        body = b""
        recipient = -1
        if messageType == MSG_CHANNEL_DATA and bodyLength >= 8:
            dataHead = update(view[pos : pos + 8])
            recipient, dataLength = CHANNEL_DATA_HEAD.unpack(dataHead)
            if dataLength == bodyLength - 8:
                data = update(view[pos + 8 : pos + bodyLength])
            else:  # malformed: let the ordinary handler refuse it
                body = dataHead + update(view[pos + 8 : pos + bodyLength])
                dataHead, recipient = b"", -1
        else:
            body = update(view[pos : pos + bodyLength])
        padding = update(view[pos + bodyLength : pos + rest])
        pos += rest
        base = self._mac
        if base is not None:
            mac = base.copy()
            mac.update(_SEQ.pack(sequence & 0xFFFFFFFF))
            mac.update(raw)
            if dataHead:
                mac.update(dataHead)
                mac.update(data)
            else:
                mac.update(body)
            mac.update(padding)
            if not hmac.compare_digest(mac.digest(), view[pos : pos + self._macSize]):
                raise PacketError(DISCONNECT_MAC_ERROR, "bad MAC")
            pos += self._macSize
        if dataHead:
            return Opened(messageType, b"", recipient, data), pos
        return Opened(messageType, body), pos
