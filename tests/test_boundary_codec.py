"""The boundary framing, from bytes written out by hand, not from our encoder.

Upstream's layout: a big-endian uint32 header, the tag in its top 8 bits and
the payload length in the low 24, then the payload.
"""

from __future__ import annotations

import pytest

from coderagent.boundary.codec import (
    MAX_PAYLOAD,
    TAG_V1,
    TAG_V2,
    FrameError,
    FrameParser,
    Logs,
    MessageError,
    Status,
    decodePayload,
    encodeFrame,
)
from coderagent.pb import agent_pb2, boundary_pb2


def test_the_header_is_a_big_endian_tag_and_24_bit_length() -> None:
    assert encodeFrame(TAG_V1, b"abc") == bytes.fromhex("01000003") + b"abc"
    assert encodeFrame(TAG_V2, b"x" * 300)[:4] == bytes.fromhex("0200012c")


def test_frames_come_out_whole_however_the_bytes_arrive() -> None:
    stream = (
        bytes.fromhex("01000003")
        + b"abc"
        + bytes.fromhex("02000000")
        + bytes.fromhex("01000001")
        + b"z"
    )
    for step in (1, 2, 3, 5, len(stream)):
        parser = FrameParser()
        frames = []
        for i in range(0, len(stream), step):
            frames += parser.feed(stream[i : i + step])
        assert frames == [(1, b"abc"), (2, b""), (1, b"z")]
        assert parser.buffered == 0


def test_32768_bytes_is_allowed_32769_is_not() -> None:
    parser = FrameParser()
    ok = bytes.fromhex("01008000") + b"p" * MAX_PAYLOAD
    assert parser.feed(ok) == [(1, b"p" * 32768)]
    bad = FrameParser()
    assert bad.feed(bytes.fromhex("01008001")) == []
    assert str(bad.error) == "message too large: 32769 bytes (at most 32768)"


@pytest.mark.parametrize("tag", [0, 3, 0xFF])
def test_an_unsupported_tag_ends_the_stream(tag: int) -> None:
    parser = FrameParser()
    assert parser.feed(bytes([tag, 0, 0, 1, 0x41])) == []
    assert isinstance(parser.error, FrameError)
    assert str(parser.error) == f"unsupported tag: {tag}"


def test_the_frames_before_a_bad_header_are_still_delivered() -> None:
    parser = FrameParser()
    good = bytes.fromhex("01000001") + b"a"
    assert parser.feed(good + good + bytes.fromhex("09000001") + good) == [(1, b"a"), (1, b"a")]
    assert parser.error is not None and parser.buffered == 0
    assert parser.feed(good) == []  # nothing more is read from a broken stream


def _request() -> agent_pb2.ReportBoundaryLogsRequest:
    request = agent_pb2.ReportBoundaryLogsRequest(session_id="s", confined_process_name="claude")
    entry = request.logs.add(allowed=True, sequence_number=4)
    entry.http_request.method = "GET"
    entry.http_request.url = "https://example.com"
    return request


def test_v1_is_a_bare_request_and_keeps_its_bytes() -> None:
    encoded = _request().SerializeToString()
    decoded = decodePayload(TAG_V1, encoded)
    assert isinstance(decoded, Logs)
    assert decoded.request == _request() and decoded.encoded == encoded


def test_v2_is_an_envelope_of_logs_or_status() -> None:
    logs = boundary_pb2.BoundaryMessage(logs=_request()).SerializeToString()
    decoded = decodePayload(TAG_V2, logs)
    assert isinstance(decoded, Logs) and decoded.request == _request()
    status = boundary_pb2.BoundaryMessage(
        status=boundary_pb2.BoundaryStatus(dropped_channel_full=3, dropped_batch_full=4)
    ).SerializeToString()
    assert decodePayload(TAG_V2, status) == Status(3, 4)
    assert decodePayload(TAG_V2, b"") is None  # an envelope with nothing we know


def test_garbage_protobuf_is_a_message_error() -> None:
    with pytest.raises(MessageError, match="undecodable ReportBoundaryLogsRequest payload"):
        decodePayload(TAG_V1, b"\xff\xff\xff")
    with pytest.raises(MessageError, match="undecodable BoundaryMessage payload"):
        decodePayload(TAG_V2, b"\x0a\x05ab")
