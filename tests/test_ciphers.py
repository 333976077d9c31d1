"""The agent's packet constructions against independent ones, byte for byte.

Three references, none of them ours in the agent's sense:

* ``tests/sshclient.Reference``: each construction written again from the
  specifications, a whole packet at a time, directly on ``cryptography``;
* asyncssh's own implementation (``asyncssh.encryption``), a third party's;
* RFC 8439's test vectors, for the ChaCha20 and Poly1305 primitives as
  the ChaCha20-Poly1305 construction uses them.

(The real OpenSSH client against the real agent is in
``tests/integration/test_ciphers_openssh.py``.)
"""

from __future__ import annotations

import os
import struct

import pytest
from asyncssh.encryption import get_encryption
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh.transport import SSHCiphers, SSHTransportBase

from coderagent.ssh.ciphers import (
    CIPHERS,
    IMPLICIT_MAC,
    MACS,
    OFFERED_CIPHERS,
    OFFERED_MACS,
    NegotiatedKeys,
    chachaStream,
    openerFor,
    sealerFor,
    weakWithoutStrictKex,
)
from coderagent.ssh.packets import (
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MAX_PACKET_LENGTH,
    MSG_CHANNEL_DATA,
    PacketError,
    Sealer,
)
from tests.sshclient import BadPacket, Reference

AEAD = [c for c in CIPHERS if CIPHERS[c].aead]
ETM = [m for m in MACS if MACS[m].etm]
#: Every construction the agent offers that Conch does not have.
NEW = [(c, IMPLICIT_MAC) for c in AEAD] + [
    (c, m) for c in (b"aes128-ctr", b"aes256-ctr") for m in ETM
]
#: And every one it offers at all.
ALL = NEW + [(c, m) for c in CIPHERS if not CIPHERS[c].aead for m in MACS if not MACS[m].etm]

PAYLOADS = [
    bytes([2]),  # IGNORE, empty
    bytes([50]) + b"x" * 3,
    bytes([MSG_CHANNEL_DATA]) + struct.pack(">2L", 7, 5) + b"hello",
    bytes([MSG_CHANNEL_DATA]) + struct.pack(">2L", 1, 32768) + os.urandom(32768),
    bytes([90]) + os.urandom(1000),
    bytes([MSG_CHANNEL_DATA]) + struct.pack(">2L", 3, 99) + b"short",  # lengths disagree
]

Keys = tuple[bytes, bytes, bytes]


def _material() -> Keys:
    """IV, key, integrity key: more than any algorithm takes, as the KDF gives."""
    return os.urandom(64), os.urandom(64), os.urandom(64)


def _ours(cipher: bytes, mac: bytes, keys: Keys) -> NegotiatedKeys:
    """Our keys with ``keys`` both ways (a sender and a receiver of the same stream)."""
    iv, key, integ = keys
    ours = NegotiatedKeys(cipher, cipher, mac, mac)
    ours.setKeys(iv, key, iv, key, integ, integ)
    return ours


def _reference(cipher: bytes, mac: bytes, keys: Keys) -> Reference:
    iv, key, integ = keys
    return Reference(cipher, b"none" if mac == IMPLICIT_MAC else mac, iv, key, integ)


def _sealAll(keys: NegotiatedKeys, first: int) -> list[bytes]:
    sealer = keys.sealer
    return [
        b"".join(sealer.seal(first + i, p[0], (p[1:4], memoryview(p)[4:])))
        for i, p in enumerate(PAYLOADS)
    ]


def _openAll(opener: object, data: bytes, step: int, first: int) -> list[bytes]:
    """Our opener over ``data`` arriving ``step`` bytes at a time; payloads out."""
    buf = bytearray()
    pos = 0
    seq = first
    out = []
    for i in range(0, len(data), step):
        buf += data[i : i + step]
        view = memoryview(buf)
        while True:
            opened = opener.open(view, pos, seq)  # type: ignore[attr-defined]
            if opened is None:
                break
            packet, pos = opened
            seq += 1
            assert type(packet.payload) is bytes and type(packet.data) is bytes
            if packet.recipient >= 0:
                head = struct.pack(">2L", packet.recipient, len(packet.data))
                out.append(bytes([packet.messageType]) + head + packet.data)
            else:
                out.append(bytes([packet.messageType]) + packet.payload)
        view.release()
    assert pos == len(buf)
    return out


# Sequence numbers from 0, and across the uint32 wrap (the transport's counter
# is a Python int; only the low 32 bits are on the wire).
FIRSTS = [0, 2**32 - 3]


@pytest.mark.parametrize("first", FIRSTS)
@pytest.mark.parametrize(("cipher", "mac"), ALL)
def test_what_we_seal_is_byte_for_byte_the_reference(cipher: bytes, mac: bytes, first: int) -> None:
    keys = _material()
    opening, resealing = _reference(cipher, mac, keys), _reference(cipher, mac, keys)
    for i, (wire, payload) in enumerate(
        zip(_sealAll(_ours(cipher, mac, keys), first), PAYLOADS, strict=True)
    ):
        seq = (first + i) & 0xFFFFFFFF
        assert opening.wireSize(seq, wire[: opening.firstSize]) == len(wire)
        assert opening.open(seq, wire) == payload
        # Sealed again by the reference with our padding: the very same bytes.
        assert resealing.seal(seq, payload, opening.lastPadding) == wire


@pytest.mark.parametrize("first", FIRSTS)
@pytest.mark.parametrize(("cipher", "mac"), ALL)
def test_what_the_reference_seals_we_open_however_it_is_split(
    cipher: bytes, mac: bytes, first: int
) -> None:
    keys = _material()
    sender = _reference(cipher, mac, keys)
    data = b"".join(sender.seal((first + i) & 0xFFFFFFFF, p) for i, p in enumerate(PAYLOADS))
    for step in (1, 3, 4, 5, 17, 4096, len(data)):
        opener = _ours(cipher, mac, keys).opener
        assert _openAll(opener, data, step, first) == PAYLOADS


def _asyncssh(cipher: bytes, mac: bytes, keys: Keys) -> object:
    iv, key, integ = keys
    spec = CIPHERS[cipher]
    if spec.aead:
        return get_encryption(cipher, key[: spec.keySize], iv[: spec.ivSize])
    macSpec = MACS[mac]
    return get_encryption(
        cipher, key[: spec.keySize], iv[:16], mac, integ[: macSpec.size], macSpec.etm
    )


@pytest.mark.parametrize(("cipher", "mac"), ALL)
def test_asyncssh_opens_what_we_seal_and_we_open_what_it_seals(cipher: bytes, mac: bytes) -> None:
    keys = _material()
    theirs: object = _asyncssh(cipher, mac, keys)
    apart = CIPHERS[cipher].aead or MACS[mac].etm
    tagSize = 16 if CIPHERS[cipher].aead else MACS[mac].size
    for seq, wire in enumerate(_sealAll(_ours(cipher, mac, keys), 0)):
        firstSize = 4 if apart else 16
        first, length = theirs.decrypt_header(seq, wire[:firstSize], 4)  # type: ignore[attr-defined]
        (n,) = struct.unpack(">L", length)
        assert len(wire) == 4 + n + tagSize
        packet = theirs.decrypt_packet(  # type: ignore[attr-defined]
            seq, first, wire[len(first) : 4 + n], 4, wire[4 + n :]
        )
        assert packet is not None
        assert packet[1 : len(packet) - packet[0]] == PAYLOADS[seq]

    theirs = _asyncssh(cipher, mac, keys)
    blockSize = CIPHERS[cipher].blockSize
    wires = []
    for seq, payload in enumerate(PAYLOADS):
        padLength = blockSize - (1 + len(payload) + (0 if apart else 4)) % blockSize
        padLength += blockSize if padLength < 4 else 0
        header = struct.pack(">LB", 1 + len(payload) + padLength, padLength)
        body = payload + os.urandom(padLength)
        if apart:
            packet, tag = theirs.encrypt_packet(seq, header[:4], header[4:] + body)  # type: ignore[attr-defined]
        else:
            packet, tag = theirs.encrypt_packet(seq, header, body)  # type: ignore[attr-defined]
        wires.append(packet + tag)
    assert _openAll(_ours(cipher, mac, keys).opener, b"".join(wires), 7, 0) == PAYLOADS


# -- RFC 8439 ----------------------------------------------------------------------------


def test_rfc8439_chacha20_encryption_from_block_1() -> None:
    # Section 2.4.2: key 00..1f, 96-bit nonce 00000000 0000004a 00000000,
    # block counter 1.  As DJB's 64-bit nonce that is 0000004a00000000 (the
    # nonce's first word is the counter's high half, zero), and starting
    # at block 1 is what the construction does after the Poly1305 key.
    key = bytes(range(32))
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for"
        b" the future, sunscreen would be it."
    )
    stream = chachaStream(key, bytes.fromhex("0000004a00000000"))
    stream.update(bytes(64))  # block 0
    assert stream.update(plaintext) == bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )


def test_rfc8439_poly1305_key_generation_is_block_0() -> None:
    # Section 2.6.2: the one-time key is the first 32 bytes of block 0.
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("0001020304050607")  # the 96-bit nonce 00000000 0001020304050607
    assert chachaStream(key, nonce).update(bytes(64))[:32] == bytes.fromhex(
        "8ad5a08b905f81cc815040274ab29471a833b637e3fd0da508dbb8e2fdd1a646"
    )


def test_rfc8439_poly1305() -> None:
    # Section 2.5.2.
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    assert Poly1305.generate_tag(key, b"Cryptographic Forum Research Group") == bytes.fromhex(
        "a8061dc1305136c6c22b8baf0c0127a9"
    )


# -- what must fail, and how ------------------------------------------------------------------


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize(("cipher", "mac"), NEW)
def test_a_flipped_bit_anywhere_after_the_length_is_a_mac_error(cipher: bytes, mac: bytes) -> None:
    keys = _material()
    [wire] = [b"".join(_ours(cipher, mac, keys).sealer.seal(0, 50, (b"payload" * 5,)))]
    for index in (4, 5, len(wire) // 2, len(wire) - 1):
        with pytest.raises(PacketError) as e:
            _ours(cipher, mac, keys).opener.open(memoryview(_flip(wire, index)), 0, 0)
        assert e.value.reason == DISCONNECT_MAC_ERROR


@pytest.mark.parametrize(("cipher", "mac"), NEW)
def test_a_packet_out_of_its_place_is_refused(cipher: bytes, mac: bytes) -> None:
    # Fixed keys: with ChaCha20-Poly1305 the length itself depends on the
    # sequence number, and random keys could make it a plausible one.
    keys = (bytes(range(64)), bytes(range(64, 128)), bytes(range(128, 192)))
    sealer = _ours(cipher, mac, keys).sealer
    first = b"".join(sealer.seal(0, 50, (b"first",)))
    second = b"".join(sealer.seal(1, 50, (b"second",)))
    with pytest.raises(PacketError) as e:
        # ChaCha20-Poly1305 and EtM bind the sequence number; GCM, the
        # invocation counter.  Either way the second packet cannot come first.
        _ours(cipher, mac, keys).opener.open(memoryview(second), 0, 0)
    if cipher.startswith(b"chacha20"):
        assert str(e.value) == "bad packet length 1073447460"  # the length key's stream differs
    else:
        assert e.value.reason == DISCONNECT_MAC_ERROR
    assert _ours(cipher, mac, keys).opener.open(memoryview(first), 0, 0) is not None


def _lengthBytes(cipher: bytes, mac: bytes, keys: Keys, length: int) -> bytes:
    """The first 4 bytes of a packet claiming ``length``, as a client would send them."""
    raw = struct.pack(">L", length)
    if cipher.startswith(b"chacha20"):
        return chachaStream(keys[1][32:64], bytes(8)).update(raw)
    return raw


@pytest.mark.parametrize("length", [2**31, MAX_PACKET_LENGTH + 16, 0, 20])
@pytest.mark.parametrize(("cipher", "mac"), NEW)
def test_impossible_lengths_are_refused_from_the_first_4_bytes(
    cipher: bytes, mac: bytes, length: int
) -> None:
    keys = _material()
    head = _lengthBytes(cipher, mac, keys, length)
    with pytest.raises(PacketError) as e:
        _ours(cipher, mac, keys).opener.open(memoryview(head), 0, 0)
    assert e.value.reason == DISCONNECT_PROTOCOL_ERROR
    assert str(e.value).startswith(("bad packet length", "bad packet mod"))


def test_gcms_invocation_counter_runs_on_across_its_64_bits() -> None:
    iv = bytes.fromhex("01020304") + (2**64 - 2).to_bytes(8, "big")
    keys = (iv, os.urandom(32), b"")
    ours = _ours(b"aes256-gcm@openssh.com", IMPLICIT_MAC, keys)
    reference = _reference(b"aes256-gcm@openssh.com", IMPLICIT_MAC, keys)
    for seq in range(4):  # ..fe, ..ff, 0, 1
        wire = b"".join(ours.sealer.seal(seq, 50, (b"n",)))
        assert reference.open(seq, wire) == b"\x32n"


def test_one_keys_state_lives_as_long_as_the_keys() -> None:
    # During a key exchange the transport asks for the sealer once per
    # packet; a GCM counter started again would reuse a nonce.
    keys = _material()
    ours = _ours(b"aes128-gcm@openssh.com", IMPLICIT_MAC, keys)
    reference = _reference(b"aes128-gcm@openssh.com", IMPLICIT_MAC, keys)
    for seq in range(3):
        assert sealerFor(ours) is ours.sealer and openerFor(ours) is ours.opener
        assert reference.open(seq, b"".join(sealerFor(ours).seal(seq, 2, (b"",)))) == b"\x02"
    with pytest.raises(BadPacket):  # the nonce of packet 0 is not valid again
        _reference(b"aes128-gcm@openssh.com", IMPLICIT_MAC, keys).open(
            0, b"".join(sealerFor(ours).seal(3, 2, (b"",)))
        )


@pytest.mark.parametrize("cipher", [b"aes128-ctr", b"aes192-ctr", b"aes256-ctr"])
@pytest.mark.parametrize("mac", [m for m in OFFERED_MACS if not MACS[m].etm])
def test_our_keys_for_conchs_algorithms_are_conchs_bytes(cipher: bytes, mac: bytes) -> None:
    # The same derived keys in Conch's SSHCiphers and in ours: Conch opens
    # what we seal with them, so nothing changed for CTR with plain HMAC.
    iv, key, integ = _material()
    conch = SSHCiphers(cipher, cipher, mac, mac)
    conch.setKeys(iv, key, iv, key, integ, integ)
    reader = SSHTransportBase()
    reader.currentEncryptions = conch
    reader.incomingPacketSequence = 0
    reader.buf = b"".join(_sealAll(_ours(cipher, mac, (iv, key, integ)), 0))
    assert [reader.getPacket() for _ in PAYLOADS] == PAYLOADS
    assert reader.buf == b""
    assert isinstance(_ours(cipher, mac, (iv, key, integ)).sealer, Sealer)


def test_what_is_offered() -> None:
    assert OFFERED_CIPHERS == [
        b"aes128-gcm@openssh.com",
        b"aes256-gcm@openssh.com",
        b"chacha20-poly1305@openssh.com",
        b"aes128-ctr",
        b"aes192-ctr",
        b"aes256-ctr",
    ]
    assert OFFERED_MACS == [
        b"hmac-sha2-256-etm@openssh.com",
        b"hmac-sha2-512-etm@openssh.com",
        b"hmac-sha2-256",
        b"hmac-sha2-512",
    ]
    assert set(OFFERED_CIPHERS) == set(CIPHERS) and set(OFFERED_MACS) == set(MACS)


def test_terrapin_applies_to_chacha20_and_etm_only() -> None:
    weak = {(c, m) for c, m in ALL if weakWithoutStrictKex(c, m)}
    assert weak == {(b"chacha20-poly1305@openssh.com", IMPLICIT_MAC)} | {
        (c, m) for c, m in ALL if m in ETM
    }
