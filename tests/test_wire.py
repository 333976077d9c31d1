"""The strict wire-field reader: every length is checked against what is left."""

from __future__ import annotations

import os
import struct

import pytest
from twisted.conch.ssh.common import NS

from coderagent.ssh.wire import MalformedPayload, Payload, layoutProblem


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


# -- whole messages ---------------------------------------------------------------------

PUBLICKEY = NS(b"coder") + NS(b"ssh-connection") + NS(b"publickey")


@pytest.mark.parametrize(
    ("messageNum", "payload"),
    [
        (1, u32(11) + NS(b"bye") + NS(b"")),
        (1, u32(11) + NS(b"bye")),  # no language tag: they are leaving anyway
        (3, u32(7)),
        (4, b"\1" + NS(b"hello") + NS(b"")),
        (5, NS(b"ssh-userauth")),
        (7, u32(2) + NS(b"a") + NS(b"1") + NS(b"b") + NS(b"")),
        (21, b""),
        (30, NS(b"k" * 32)),
        (50, NS(b"coder") + NS(b"ssh-connection") + NS(b"none")),
        (50, NS(b"coder") + NS(b"ssh-connection") + NS(b"password") + b"\0" + NS(b"pw")),
        (50, PUBLICKEY + b"\0" + NS(b"ssh-ed25519") + NS(b"blob")),
        (50, PUBLICKEY + b"\1" + NS(b"ssh-ed25519") + NS(b"blob") + NS(b"sig")),
        (80, NS(b"keepalive@openssh.com") + b"\1"),
        (80, NS(b"tcpip-forward") + b"\1" + NS(b"") + u32(0)),
        (81, b""),
        (82, b""),
        (90, NS(b"session") + u32(0) + u32(2097152) + u32(32768)),
        (93, u32(0) + u32(1024)),
        (94, u32(0) + NS(b"data")),
        (95, u32(0) + u32(1) + NS(b"err")),
        (96, u32(0)),
        (98, u32(0) + NS(b"exec") + b"\1" + NS(b"true")),
        (2, b"anything at all"),  # IGNORE
        (15, b""),  # unassigned: answered with UNIMPLEMENTED, not parsed
        (192, b"\xff"),  # a local extension
    ],
)
def test_well_formed_messages_pass(messageNum: int, payload: bytes) -> None:
    assert layoutProblem(messageNum, payload) is None


@pytest.mark.parametrize(
    ("messageNum", "payload", "problem"),
    [
        (1, b"\0\0", "truncated uint32"),
        (3, u32(7) + b"x", "1 unexpected trailing bytes"),
        (4, b"", "1 bytes wanted, 0 left"),
        (4, b"\1" + NS(b"hello"), "truncated uint32"),
        (5, u32(100) + b"ssh-userauth", "string of 100 bytes with 12 left"),
        (7, u32(2) + NS(b"a") + NS(b"1"), "truncated uint32"),
        (7, u32(0xFFFFFFFF) + NS(b"a"), "truncated uint32"),
        (21, b"\0", "1 unexpected trailing bytes"),
        (30, b"", "truncated uint32"),
        (50, NS(b"coder") + NS(b"ssh-connection"), "truncated uint32"),
        (50, PUBLICKEY, "1 bytes wanted, 0 left"),
        (50, PUBLICKEY + b"\0" + NS(b"ssh-ed25519"), "truncated uint32"),
        (50, PUBLICKEY + b"\1" + NS(b"ssh-ed25519") + NS(b"blob"), "truncated uint32"),
        (50, PUBLICKEY + b"\0" + NS(b"ssh-ed25519") + NS(b"blob") + b"x", "1 unexpected"),
        (80, NS(b"keepalive@openssh.com"), "1 bytes wanted, 0 left"),
        (82, b"x", "1 unexpected trailing bytes"),
        (90, NS(b"session") + u32(0) + u32(2097152), "truncated uint32"),
        (93, u32(0), "truncated uint32"),
        (94, u32(0) + u32(5) + b"abc", "string of 5 bytes with 3 left"),
        (96, b"", "truncated uint32"),
        (98, u32(0) + NS(b"exec"), "1 bytes wanted, 0 left"),
    ],
)
def test_malformed_messages_say_what_is_wrong(
    messageNum: int, payload: bytes, problem: str
) -> None:
    found = layoutProblem(messageNum, payload)
    assert found is not None and found.startswith(problem)


def test_a_host_is_utf8_without_nul() -> None:
    assert Payload(NS(b"example.com")).host() == "example.com"
    assert Payload(NS(b"")).host() == ""  # "all interfaces" for tcpip-forward
    with pytest.raises(MalformedPayload, match="NUL"):
        Payload(NS(b"127.0.0.1\0x")).host()
    with pytest.raises(MalformedPayload, match="UTF-8"):
        Payload(NS(b"\xff")).host()
