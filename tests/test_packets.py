"""The packet layer against Conch's own implementation of the same wire format.

Conch's ``SSHTransportBase.sendPacket``/``getPacket`` are an independent
implementation of RFC 4253 §6: what our :class:`Sealer` writes must come out
of Conch's ``getPacket`` unchanged, and what Conch's ``sendPacket`` writes
must come out of our :class:`Opener`, for every cipher and MAC the agent
offers and however the bytes are split on arrival.
"""

from __future__ import annotations

import os
import struct

import pytest
from twisted.conch.ssh.transport import SSHCiphers, SSHTransportBase
from twisted.internet.testing import StringTransport

from coderagent.ssh.packets import (
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MAX_PACKET_LENGTH,
    MSG_CHANNEL_DATA,
    Opener,
    PacketError,
    Sealer,
)
from coderagent.ssh.transport import AgentServerTransport

# The offered algorithms Conch implements too (the others, which Conch does
# not have, are checked against independent implementations in
# tests/test_ciphers.py).
CIPHERS = [c for c in AgentServerTransport.supportedCiphers if c in SSHCiphers.cipherMap]
MACS = [m for m in AgentServerTransport.supportedMACs if m in SSHCiphers.macMap]


Keys = tuple[bytes, bytes, bytes]


def _keys() -> Keys:
    return os.urandom(16), os.urandom(32), os.urandom(64)


def _sender(cipher: bytes, mac: bytes, keys: Keys) -> SSHCiphers:
    iv, key, integ = keys
    c = SSHCiphers(cipher, cipher, mac, mac)
    c.setKeys(iv, key, b"\0" * 16, b"\0" * 32, integ, b"\0" * 64)
    return c


def _receiver(cipher: bytes, mac: bytes, keys: Keys) -> SSHCiphers:
    """A fresh receiving end (a CTR decryptor is stateful: one per stream)."""
    iv, key, integ = keys
    c = SSHCiphers(cipher, cipher, mac, mac)
    c.setKeys(b"\0" * 16, b"\0" * 32, iv, key, b"\0" * 64, integ)
    return c


def _none() -> SSHCiphers:
    c = SSHCiphers(b"none", b"none", b"none", b"none")
    c.setKeys(b"", b"", b"", b"", b"", b"")
    return c


def _conchReceiver(ciphers: SSHCiphers, data: bytes) -> SSHTransportBase:
    t = SSHTransportBase()
    t.currentEncryptions = ciphers
    t.incomingPacketSequence = 0
    t.buf = data
    return t


def _conchSender(ciphers: SSHCiphers) -> tuple[SSHTransportBase, StringTransport]:
    t = SSHTransportBase()
    t.currentEncryptions = ciphers
    t.outgoingPacketSequence = 0
    t._keyExchangeState = t._KEY_EXCHANGE_NONE
    wire = StringTransport()
    t.transport = wire
    return t, wire


PAYLOADS = [
    (2, b""),  # SSH_MSG_IGNORE, empty
    (50, b"x" * 3),
    (MSG_CHANNEL_DATA, struct.pack(">2L", 7, 5) + b"hello"),
    (MSG_CHANNEL_DATA, struct.pack(">2L", 1, 32768) + os.urandom(32768)),
    (90, os.urandom(1000)),
]


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_what_we_seal_conch_opens(cipher: bytes, mac: bytes) -> None:
    keys = _keys()
    sealer = Sealer(_sender(cipher, mac, keys))
    wire = b"".join(
        b"".join(sealer.seal(seq, kind, (body[:3], memoryview(body)[3:])))
        for seq, (kind, body) in enumerate(PAYLOADS)
    )
    conch = _conchReceiver(_receiver(cipher, mac, keys), wire)
    for kind, body in PAYLOADS:
        assert conch.getPacket() == bytes([kind]) + body
    assert conch.buf == b""


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("cipher", CIPHERS)
def test_what_conch_seals_we_open_however_it_is_split(cipher: bytes, mac: bytes) -> None:
    keys = _keys()
    conch, wire = _conchSender(_sender(cipher, mac, keys))
    for kind, body in PAYLOADS:
        conch.sendPacket(kind, body)
    data = wire.value()
    # Arrival in pieces of every awkward size, one byte at a time included.
    for step in (1, 5, 6, 7, 17, 4096, len(data)):
        opener = Opener(_receiver(cipher, mac, keys))
        assert _openAll(opener, data, step) == [_expected(k, b) for k, b in PAYLOADS]


def _expected(kind: int, body: bytes) -> tuple[int, bytes, int, bytes]:
    if kind == MSG_CHANNEL_DATA:
        recipient, _ = struct.unpack(">2L", body[:8])
        return (kind, b"", recipient, body[8:])
    return (kind, body, -1, b"")


def _openAll(opener: Opener, data: bytes, step: int) -> list[tuple[int, bytes, int, bytes]]:
    buf = bytearray()
    pos = 0
    seq = 0
    out = []
    for i in range(0, len(data), step):
        buf += data[i : i + step]
        view = memoryview(buf)
        while True:
            opened = opener.open(view, pos, seq)
            if opened is None:
                break
            packet, pos = opened
            seq += 1
            assert type(packet.payload) is bytes and type(packet.data) is bytes
            out.append((packet.messageType, packet.payload, packet.recipient, packet.data))
        view.release()
    assert pos == len(buf)
    return out


def test_before_key_exchange_packets_are_plain_and_owned() -> None:
    conch, wire = _conchSender(_none())
    conch.sendPacket(20, b"kexinit")
    sealed = b"".join(Sealer(_none()).seal(0, 20, (b"kexinit",)))
    assert len(sealed) == len(wire.value()) and sealed[:6] == wire.value()[:6]
    assert _openAll(Opener(_none()), wire.value(), 3) == [(20, b"kexinit", -1, b"")]


def _corrupt(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def _sealOne(cipher: bytes, mac: bytes, kind: int, body: bytes) -> tuple[bytes, Keys]:
    keys = _keys()
    return b"".join(Sealer(_sender(cipher, mac, keys)).seal(0, kind, (body,))), keys


def test_a_flipped_bit_is_a_mac_error() -> None:
    data, keys = _sealOne(b"aes128-ctr", b"hmac-sha2-256", 50, b"payload")
    for index in (7, len(data) - 1):
        opener = Opener(_receiver(b"aes128-ctr", b"hmac-sha2-256", keys))
        with pytest.raises(PacketError) as e:
            opener.open(memoryview(_corrupt(data, index)), 0, 0)
        assert e.value.reason == DISCONNECT_MAC_ERROR


def test_the_wrong_sequence_number_is_a_mac_error() -> None:
    data, keys = _sealOne(b"aes256-ctr", b"hmac-sha2-512", 50, b"payload")
    with pytest.raises(PacketError, match="bad MAC"):
        Opener(_receiver(b"aes256-ctr", b"hmac-sha2-512", keys)).open(memoryview(data), 0, 1)


def _plainPacket(length: int, padLength: int, kind: int = 50) -> bytes:
    return struct.pack(">LBB", length, padLength, kind) + b"\0" * 64


@pytest.mark.parametrize(
    ("length", "padLength", "message"),
    [
        (MAX_PACKET_LENGTH + 4, 4, "bad packet length"),
        (0xFFFFFFFF, 4, "bad packet length"),
        (13, 4, "bad packet mod"),
        (12, 3, "bad padding length"),
        (12, 11, "bad padding length"),
    ],
)
def test_impossible_headers_are_protocol_errors(length: int, padLength: int, message: str) -> None:
    with pytest.raises(PacketError, match=message) as e:
        Opener(_none()).open(memoryview(_plainPacket(length, padLength)), 0, 0)
    assert e.value.reason == DISCONNECT_PROTOCOL_ERROR


def test_channel_data_whose_length_disagrees_is_left_to_the_handler() -> None:
    body = struct.pack(">2L", 3, 99) + b"short"
    data, keys = _sealOne(b"aes128-ctr", b"hmac-sha2-256", MSG_CHANNEL_DATA, body)
    opened = Opener(_receiver(b"aes128-ctr", b"hmac-sha2-256", keys)).open(memoryview(data), 0, 0)
    assert opened is not None
    packet, pos = opened
    assert (packet.messageType, packet.payload, packet.recipient, pos) == (
        MSG_CHANNEL_DATA,
        body,
        -1,
        len(data),
    )


def test_ciphers_that_cannot_be_fed_piecewise_are_refused() -> None:
    cbc = SSHCiphers(b"aes128-cbc", b"aes128-cbc", b"hmac-sha2-256", b"hmac-sha2-256")
    cbc.setKeys(*(b"\0" * 64,) * 6)
    with pytest.raises(ValueError):
        Sealer(cbc)
    with pytest.raises(ValueError):
        Opener(cbc)
