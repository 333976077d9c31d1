"""The session requests' strict readers: every field checked, nothing left over."""

from __future__ import annotations

import struct

import pytest
from twisted.conch.ssh.common import NS

from coderagent.ssh.requests import (
    MalformedPayload,
    PtyRequest,
    parseEnv,
    parseExec,
    parsePtyReq,
    parseShell,
    parseSignal,
    parseSubsystem,
    parseTerminalModes,
    parseWindowChange,
)


def u32(n: int) -> bytes:
    return struct.pack(">L", n)


def mode(opcode: int, value: int) -> bytes:
    return bytes((opcode,)) + u32(value)


SIZE = u32(80) + u32(24) + u32(640) + u32(480)  # columns, rows, width px, height px
MODES = mode(53, 0) + mode(128, 38400) + b"\x00"  # ECHO off, ISPEED, TTY_OP_END


def test_pty_req_reads_every_field_in_wire_order() -> None:
    assert parsePtyReq(NS(b"xterm-256color") + SIZE + NS(MODES)) == PtyRequest(
        "xterm-256color", (24, 80, 640, 480), [(53, 0), (128, 38400)]
    )


def test_window_change_is_rows_then_columns() -> None:
    assert parseWindowChange(SIZE) == (24, 80, 640, 480)


def test_the_one_string_requests() -> None:
    assert parseEnv(NS(b"LANG") + NS(b"C.UTF-8")) == (b"LANG", b"C.UTF-8")
    assert parseEnv(NS(b"EMPTY") + NS(b"")) == (b"EMPTY", b"")
    assert parseExec(NS(b"echo hi; exit 3")) == "echo hi; exit 3"
    assert parseExec(NS(b"printf '\xff'")) == "printf '\udcff'"  # any bytes, as the OS decodes
    assert parseSubsystem(NS(b"sftp")) == "sftp"
    assert parseSignal(NS(b"TERM")) == "TERM"
    parseShell(b"")


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (b"", []),  # paramiko sends no modes at all
        (b"\x00", []),
        (mode(1, 3) + b"\x00" + b"ignored after the end", [(1, 3)]),
        (mode(1, 3) + mode(160, 7) + mode(2, 4), [(1, 3)]),  # 160+: parsing stops
        (mode(1, 3) + mode(2, 4), [(1, 3), (2, 4)]),  # no TTY_OP_END: the string ends them
    ],
)
def test_terminal_modes(encoded: bytes, expected: list[tuple[int, int]]) -> None:
    assert parseTerminalModes(encoded) == expected


def test_a_terminal_mode_cut_short_is_malformed() -> None:
    with pytest.raises(MalformedPayload, match="terminal mode 53 cut short"):
        parseTerminalModes(mode(1, 3) + b"\x35\x00\x00")


#: The malformed forms of issue 11 (Conch accepted each): strings that claim more than
#: is there, lengths cut short, fields missing, bytes left over.
MALFORMED = {
    "pty-req": (
        parsePtyReq,
        [
            b"",
            u32(200) + b"xterm",  # TERM claims 200 bytes, 5 present
            NS(b"xterm") + SIZE[:10],  # window size cut short
            NS(b"xterm") + SIZE,  # modes missing
            NS(b"xterm") + SIZE + u32(50) + MODES,  # modes claim 50 bytes
            NS(b"xterm") + SIZE + NS(MODES) + b"junk",  # trailing bytes
            NS(b"xterm") + SIZE + NS(b"\x35\x00"),  # a mode cut short
        ],
    ),
    "env": (
        parseEnv,
        [
            b"",
            NS(b"LANG"),  # value missing
            u32(200) + b"LANG",  # name claims 200 bytes
            NS(b"LANG") + u32(200) + b"C.UTF-8",  # value claims 200 bytes
            NS(b"LANG") + NS(b"C") + b"\x00",  # trailing byte
            NS(b"LANG") + b"\x00\x00",  # value length cut short
        ],
    ),
    "exec": (
        parseExec,
        [
            b"",
            b"\x00\x00",  # length cut short
            u32(200) + b"id; ls",  # claims 200 bytes, 6 present: ran the 6
            u32(0xFFFFFFFF) + b"x",  # absurd length
            NS(b"id") + b"; rm -rf ~",  # trailing bytes
        ],
    ),
}


@pytest.mark.parametrize(
    ("request_", "data"),
    [(name, data) for name, (_, forms) in MALFORMED.items() for data in forms],
)
def test_malformed_pty_req_env_and_exec(request_: str, data: bytes) -> None:
    parse = MALFORMED[request_][0]
    with pytest.raises(MalformedPayload):
        parse(data)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("parse", "data"),
    [
        (parseWindowChange, SIZE[:12]),
        (parseWindowChange, SIZE + b"\x00"),
        (parseSubsystem, u32(10) + b"sftp"),
        (parseSubsystem, NS(b"sftp") + b"x"),
        (parseSignal, u32(4) + b"KI"),
        (parseSignal, NS(b"KILL") + NS(b"")),
        (parseShell, b"\x00"),
    ],
)
def test_malformed_window_change_subsystem_signal_and_shell(parse: object, data: bytes) -> None:
    with pytest.raises(MalformedPayload):
        parse(data)  # type: ignore[operator]
