"""coderagent.coderd.drpcwire against storj.io/drpc: varints, frames, packets, bodies.

Expected bytes are written out by hand from the drpc wire format, or taken from
the streams recorded from the real Go library (``tests/golden``), never from
our own encoder.
"""

from __future__ import annotations

import random

import pytest

from coderagent.coderd.drpcwire import (
    DRPCError,
    Frame,
    FrameParser,
    IncompleteError,
    Kind,
    Packet,
    PacketAssembler,
    ProtocolError,
    decodeMetadata,
    decodeVarint,
    encodeFrame,
    encodeMetadata,
    encodeVarint,
    marshalError,
    splitPacket,
    unmarshalError,
)
from tests.drpcbytes import CHUNKINGS, METHOD, MIB, H, W, decodeFrames, largeRequest
from tests.vectors import canonicalStreams, load

# ---------------------------------------------------------------------------
# varints
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "80 01"),
        (300, "ac 02"),
        (16383, "ff 7f"),
        (16384, "80 80 01"),
        (18928, "f0 93 01"),  # drpc_large's last frame
        (65536, "80 80 04"),  # a full 64 KiB frame
        (149996, "ec 93 09"),
        (2**63, "80 80 80 80 80 80 80 80 80 01"),
        (2**64 - 1, "ff ff ff ff ff ff ff ff ff 01"),  # the 10-byte maximum
    ],
)
def test_varint(value: int, wire: str) -> None:
    raw = W(wire)
    assert encodeVarint(value) == raw
    assert decodeVarint(raw) == (value, len(raw))
    assert decodeVarint(b"\xaa" + raw + b"\x05", 1) == (value, len(raw) + 1)


def test_varint_too_long() -> None:
    with pytest.raises(ProtocolError, match=r"^varint too long$"):
        decodeVarint(W("80 80 80 80 80 80 80 80 80 80 01"))  # 11 bytes
    with pytest.raises(ProtocolError, match=r"^varint too long$"):
        decodeVarint(b"\xff" * 10)  # a 10th byte that still continues


def test_varint_tenth_byte_excess_is_dropped_like_go() -> None:
    """Go ORs ``0x7f << 63`` into a uint64: everything above bit 63 is lost."""
    assert decodeVarint(W("ff ff ff ff ff ff ff ff ff 7f")) == (2**64 - 1, 10)
    assert decodeVarint(W("80 80 80 80 80 80 80 80 80 02")) == (0, 10)


def test_varint_incomplete() -> None:
    for raw in (b"", b"\x80", b"\xff" * 9, b"\x01\x80"):
        with pytest.raises(IncompleteError):
            decodeVarint(raw, 1 if raw == b"\x01\x80" else 0)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        encodeVarint(value)


# ---------------------------------------------------------------------------
# frames, written out by hand
# ---------------------------------------------------------------------------

BOOM = "0000000000000007 626f6f6d"  # code 7, "boom"


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Frame(Kind.INVOKE, 1, 1, b"/a/B"), "03 01 01 04 2f612f42"),
        (Frame(Kind.INVOKE, 1, 1, b"/a/B", done=False), "02 01 01 04 2f612f42"),
        (Frame(Kind.MESSAGE, 1, 1, b""), "05 01 01 00"),
        (Frame(Kind.MESSAGE, 1, 2, b"\x01\x02", done=False), "04 01 02 02 0102"),
        (Frame(Kind.ERROR, 1, 1, H(BOOM.replace(" ", ""))), "07 01 01 0c" + BOOM),
        (Frame(Kind.CANCEL, 1, 5, b"", control=True), "89 01 05 00"),
        (Frame(Kind.CLOSE, 1, 4), "0b 01 04 00"),
        (Frame(Kind.CLOSE_SEND, 1, 2), "0d 01 02 00"),
        (Frame(Kind.INVOKE_METADATA, 1, 1, H("0a060a016b120176")), "0f 01 01 08 0a060a016b120176"),
        (Frame(Kind.MESSAGE, 300, 128, b"x"), "05 ac02 8001 01 78"),
        (Frame(9, 1, 1, b"", control=True), "93 01 01 00"),  # a future kind
    ],
)
def test_frame_by_hand(frame: Frame, wire: str) -> None:
    raw = W(wire)
    assert encodeFrame(frame) == raw
    assert FrameParser().feed(raw) == [frame]
    parser = FrameParser()
    got = [f for b in raw for f in parser.feed(bytes([b]))]
    assert got == [frame]


def test_cancel_control_bit_is_bit_7() -> None:
    """Go's SendCancel: control=true, done=true: 0x80 | 4<<1 | 1."""
    assert encodeFrame(Frame(Kind.CANCEL, 1, 5, b"", True, True))[0] == 0x89
    assert encodeFrame(Frame(Kind.CANCEL, 1, 5, b"", True, False))[0] == 0x09


def test_frame_kind_out_of_range() -> None:
    with pytest.raises(ValueError):
        encodeFrame(Frame(64, 1, 1))


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_parser_on_go_stream(chunk: int | None) -> None:
    c2s, _ = canonicalStreams("drpc_unary_metadata")
    parser = FrameParser()
    frames: list[Frame] = []
    if chunk is None:
        frames = parser.feed(c2s)
    else:
        for i in range(0, len(c2s), chunk):
            frames += parser.feed(c2s[i : i + chunk])
    request = H(load("drpc_unary_metadata")["request_hex"])
    assert frames == [
        Frame(7, 1, 1, H("0a060a016b120176")),
        Frame(1, 1, 2, METHOD.encode()),
        Frame(2, 1, 3, request),
        Frame(6, 1, 4),
        Frame(5, 1, 5),
    ]


def test_parser_waits_for_the_whole_frame() -> None:
    parser = FrameParser()
    assert parser.feed(W("05 01 01 03 6162")) == []
    assert parser.feed(b"") == []
    assert parser.feed(W("63 0d")) == [Frame(2, 1, 1, b"abc")]
    assert parser.feed(W("01 02 00")) == [Frame(6, 1, 2)]


def test_parser_varint_too_long_is_a_protocol_error_and_sticks() -> None:
    parser = FrameParser()
    with pytest.raises(ProtocolError, match=r"^varint too long$"):
        parser.feed(W("05", "80" * 10, "01 01 00"))
    with pytest.raises(ProtocolError, match=r"^varint too long$"):
        parser.feed(W("05 01 01 00"))


def test_parser_rejects_a_frame_larger_than_the_cap_from_its_header() -> None:
    parser = FrameParser()
    assert parser.feed(b"\x05\x01\x01" + encodeVarint(4 * MIB)) == []  # exactly 4 MiB: fine
    with pytest.raises(ProtocolError, match=r"^data overflow$"):
        FrameParser().feed(b"\x05\x01\x01" + encodeVarint(4 * MIB + 1))


@pytest.mark.parametrize("seed", range(40))
def test_parser_garbage_never_crashes(seed: int) -> None:
    rng = random.Random(seed)
    garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    parser = FrameParser()
    assembler = PacketAssembler()
    try:
        for i in range(0, len(garbage), 13):
            for frame in parser.feed(garbage[i : i + 13]):
                assert 0 <= frame.kind < 64
                assembler.add(frame)
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------
# packets: the reader's checks
# ---------------------------------------------------------------------------


def packets(wire: bytes, maxBufferSize: int = 4 * MIB) -> list[Packet]:
    return PacketAssembler(maxBufferSize).feed(FrameParser(None).feed(wire))


def test_packets_of_a_go_stream() -> None:
    c2s, s2c = canonicalStreams("drpc_large")
    request = largeRequest()
    assert packets(c2s) == [
        Packet(1, 1, 1, METHOD.encode()),
        Packet(2, 1, 2, request),
        Packet(6, 1, 3, b""),
        Packet(5, 1, 4, b""),
    ]
    assert packets(s2c) == [Packet(2, 1, 1, request), Packet(6, 1, 2, b"")]


def test_id_monotonicity_violation() -> None:
    with pytest.raises(ProtocolError, match=r"^id monotonicity violation$"):
        packets(W("05 01 02 00", "05 01 01 00"))
    with pytest.raises(ProtocolError, match=r"^id monotonicity violation$"):
        packets(W("05 02 01 00", "05 01 09 00"))  # a lower stream


def test_the_reader_starts_at_stream_1_message_1() -> None:
    with pytest.raises(ProtocolError, match=r"^id monotonicity violation$"):
        packets(W("05 00 05 00"))
    with pytest.raises(ProtocolError, match=r"^id monotonicity violation$"):
        packets(W("05 01 00 00"))


def test_an_id_cannot_be_reused_after_its_packet() -> None:
    with pytest.raises(ProtocolError, match=r"^id monotonicity violation$"):
        packets(W("05 01 01 00", "05 01 01 00"))


def test_packet_kind_change() -> None:
    with pytest.raises(ProtocolError, match=r"^packet kind change$"):
        packets(W("04 01 01 01 61", "07 01 01 01 62"))


def test_a_new_id_abandons_an_unfinished_packet() -> None:
    assert packets(W("04 01 01 02 6162", "05 01 02 02 6364")) == [Packet(2, 1, 2, b"cd")]


def test_data_overflow() -> None:
    with pytest.raises(ProtocolError, match=r"^data overflow$"):
        packets(W("04 01 01 03 616263", "05 01 01 02 6465"), maxBufferSize=4)
    assert packets(W("04 01 01 02 6162", "05 01 01 02 6364"), maxBufferSize=4) == [
        Packet(2, 1, 1, b"abcd")
    ]
    # the real cap: 64 frames of 64 KiB is exactly 4 MiB; one byte more is too much
    assembler = PacketAssembler()
    for _ in range(63):
        assert assembler.add(Frame(2, 1, 1, bytes(65536), done=False)) is None
    with pytest.raises(ProtocolError, match=r"^data overflow$"):
        assembler.add(Frame(2, 1, 1, bytes(65537)))
    assembler = PacketAssembler()
    for _ in range(63):
        assembler.add(Frame(2, 1, 1, bytes(65536), done=False))
    packet = assembler.add(Frame(2, 1, 1, bytes(65536)))
    assert packet is not None and len(packet.data) == 4 * MIB


def test_control_frames_are_skipped_before_any_check() -> None:
    """Cancel (sent with the control bit) and unknown control kinds are ignored,
    even with an id that would otherwise be a violation."""
    assert packets(W("05 01 02 00", "89 01 01 00", "93 00 00 01 ff", "0d 01 03 00")) == [
        Packet(2, 1, 2, b""),
        Packet(6, 1, 3, b""),
    ]


def test_unknown_kind_without_control_bit_reaches_the_stream() -> None:
    assert packets(W("13 01 01 00")) == [Packet(9, 1, 1, b"")]


# ---------------------------------------------------------------------------
# splitting, as the Go writer does
# ---------------------------------------------------------------------------


def test_split_150000_bytes_as_go_did() -> None:
    vector = load("drpc_large")
    c2s, _ = canonicalStreams("drpc_large")
    request = largeRequest()
    wire = splitPacket(Kind.MESSAGE, 1, 2, request)
    assert wire == c2s[44:150062]
    headers = [f["header_hex"] for f in vector["client_to_server_frames"][1:4]]
    assert headers == ["040102808004", "040102808004", "050102f09301"]
    assert [(c, len(d)) for c, _, _, d in decodeFrames(wire)] == [
        (0x04, 65536),
        (0x04, 65536),
        (0x05, 18928),
    ]


def test_split_boundaries() -> None:
    assert splitPacket(Kind.MESSAGE, 1, 2, b"") == W("05 01 02 00")
    one = decodeFrames(splitPacket(Kind.MESSAGE, 1, 2, bytes(65536)))
    assert [(c, len(d)) for c, _, _, d in one] == [(0x05, 65536)]
    two = decodeFrames(splitPacket(Kind.MESSAGE, 1, 2, bytes(65537)))
    assert [(c, len(d)) for c, _, _, d in two] == [(0x04, 65536), (0x05, 1)]
    exact = decodeFrames(splitPacket(Kind.MESSAGE, 1, 2, bytes(131072)))
    assert [(c, len(d)) for c, _, _, d in exact] == [(0x04, 65536), (0x05, 65536)]
    assert splitPacket(Kind.INVOKE, 1, 1, b"abcde", maxFrame=2) == W(
        "02 01 01 02 6162", "02 01 01 02 6364", "03 01 01 01 65"
    )
    assert splitPacket(Kind.MESSAGE, 1, 2, bytes(70000), maxFrame=-1)[:6] == W("05 01 02 f0a204")
    assert splitPacket(Kind.MESSAGE, 1, 2, bytes(70000), maxFrame=0) == splitPacket(
        Kind.MESSAGE, 1, 2, bytes(70000)
    )


# ---------------------------------------------------------------------------
# error and metadata bodies
# ---------------------------------------------------------------------------


def test_error_body() -> None:
    assert marshalError(7, "boom") == W(BOOM)
    assert marshalError(0, "") == bytes(8)
    assert marshalError(2**64 - 1, "é") == W("ffffffffffffffff c3a9")
    e = unmarshalError(W(BOOM))
    assert (e.code, e.message) == (7, "boom")
    short = unmarshalError(b"abc")
    assert (short.code, short.message) == (0, "abc (drpcwire note: invalid error data)")


def test_drpc_error_shows_code_and_message() -> None:
    e = DRPCError(7, "boom")
    assert str(e) == "boom (drpc error code 7)"
    assert (e.code, e.message) == (7, "boom")


def test_metadata_body() -> None:
    frame = load("drpc_unary_metadata")["client_to_server_frames"][0]
    assert encodeMetadata({"k": "v"}) == H(frame["data_hex"]) == W("0a06 0a01 6b 1201 76")
    assert decodeMetadata(W("0a06 0a01 6b 1201 76")) == {"k": "v"}
    assert encodeMetadata({"": ""}) == W("0a04 0a00 1200")
    two = W("0a06 0a01 61 1201 31", "0a07 0a01 62 1202 3232")
    assert encodeMetadata({"a": "1", "b": "22"}) == two
    assert decodeMetadata(two) == {"a": "1", "b": "22"}
    assert decodeMetadata(b"") == {}
    long = "x" * 200
    assert encodeMetadata({"k": long})[:6] == W("0a ce01 0a 01 6b")


@pytest.mark.parametrize(
    "wire",
    [
        "0a05 0a01 6b 1201",  # entry longer than the data
        "0a06 1201 76 0a01 6b",  # value before key
        "0a03 0a01 6b",  # no value
        "0a08 0a01 6b 1201 76 0800",  # trailing field inside the entry
        "12 06 0a01 6b 1201 76",  # not field 1
        "0a",  # truncated
    ],
)
def test_metadata_body_malformed(wire: str) -> None:
    with pytest.raises(ProtocolError, match=r"^invalid metadata$"):
        decodeMetadata(W(wire))
