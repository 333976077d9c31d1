"""The strict wire-field reader: every length is checked against what is left."""

from __future__ import annotations

import os
import struct

import pytest
from twisted.conch.ssh.common import NS

from coderagent.ssh.wire import MalformedPayload, Payload


def u32(n: int) -> bytes:
    return struct.pack(">L", n)


def test_payload_reads_fields_in_order() -> None:
    p = Payload(NS(b"example.com") + u32(8080) + NS(b"10.0.0.1") + u32(4242))
    assert (p.text(), p.port(), p.string(), p.uint32()) == ("example.com", 8080, b"10.0.0.1", 4242)
    p.end()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing at all
        b"\x00\x00",  # truncated length
        u32(10) + b"abc",  # string shorter than its length
        u32(0xFFFFFFFF) + b"x" * 16,  # huge length
        NS(b"host"),  # port missing
        NS(b"host") + b"\x00\x01",  # truncated port
    ],
)
def test_payload_rejects_truncated_and_huge(data: bytes) -> None:
    p = Payload(data)
    with pytest.raises(MalformedPayload):
        p.text()
        p.port()


def test_payload_rejects_trailing_bytes_bad_ports_paths_and_text() -> None:
    p = Payload(NS(b"x") + b"junk")
    p.string()
    with pytest.raises(MalformedPayload, match="trailing"):
        p.end()
    with pytest.raises(MalformedPayload, match="out of range"):
        Payload(u32(65536)).port()
    with pytest.raises(MalformedPayload):
        Payload(NS(b"/tmp/a\0b")).path()
    with pytest.raises(MalformedPayload):
        Payload(NS(b"")).path()
    with pytest.raises(MalformedPayload, match="UTF-8"):
        Payload(NS(b"\xff\xfe")).text()
    assert Payload(NS(b"/tmp/\xff.sock")).path() == os.fsdecode(b"/tmp/\xff.sock")


def test_a_host_is_utf8_without_nul() -> None:
    assert Payload(NS(b"example.com")).host() == "example.com"
    assert Payload(NS(b"")).host() == ""  # "all interfaces" for tcpip-forward
    with pytest.raises(MalformedPayload, match="NUL"):
        Payload(NS(b"127.0.0.1\0x")).host()
    with pytest.raises(MalformedPayload, match="UTF-8"):
        Payload(NS(b"\xff")).host()
