"""Bytes for the DRPC tests, written and read without coderagent's own encoder.

Expected bytes are spelled out by hand (:func:`W`) or taken from the streams
recorded from Go (``tests/golden``); :func:`decodeFrames` is the tests' own
frame splitter, so that an encoder bug cannot hide behind a matching decoder.
"""

from __future__ import annotations

import hashlib

from tests.vectors import load

H = bytes.fromhex
METHOD = "/coder.agent.v2.Agent/ReportBoundaryLogs"
MIB = 1 << 20
CHUNKINGS = [None, 1, 7]  # all at once, byte by byte, odd-sized pieces


def W(*frames: str) -> bytes:
    """Hand-written bytes, one string per frame (spaces between fields for reading)."""
    return b"".join(H(frame.replace(" ", "")) for frame in frames)


def hexOf(text: str | bytes) -> str:
    """``text`` as hex, for writing frame bodies by hand."""
    return (text.encode() if isinstance(text, str) else text).hex()


def readVarint(buf: bytes, pos: int) -> tuple[int, int]:
    """The test's own LEB128 reader, independent of the module's."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def decodeFrames(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """Independent frame splitter for assertions: (control byte, stream, message, data)."""
    out = []
    pos = 0
    while pos < len(stream):
        control = stream[pos]
        sid, pos = readVarint(stream, pos + 1)
        mid, pos = readVarint(stream, pos)
        length, pos = readVarint(stream, pos)
        data = stream[pos : pos + length]
        assert len(data) == length
        pos += length
        out.append((control, sid, mid, data))
    return out


def largeRequest() -> bytes:
    """drpc_large's request from its recipe, checked against the recorded sha256."""
    vector = load("drpc_large")
    body = bytes(ord("a") + i % 26 for i in range(149996))
    request = H("1aec9309") + body
    assert len(request) == vector["request_len"]
    assert hashlib.sha256(request).hexdigest() == vector["request_sha256"]
    return request
