"""The session channel's requests (RFC 4254 §6), read strictly into typed values.

Conch's parsers (``common.getNS``, ``session.parseRequest_pty_req``) slice
without checking lengths: an ``exec`` whose string claims 200 bytes with 6
present runs the 6, and trailing bytes are ignored.  Every reader here goes
through :class:`~coderagent.ssh.wire.Payload`, so a length that runs past the
payload, a missing field or bytes left over raise
:class:`~coderagent.ssh.wire.MalformedPayload`, which the session answers
with a request failure.  The values come back typed; the session decides
what to do with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coderagent.ssh.wire import MalformedPayload, Payload

__all__ = [
    "MalformedPayload",
    "PtyRequest",
    "WindowSize",
    "parseEnv",
    "parseExec",
    "parsePtyReq",
    "parseShell",
    "parseSignal",
    "parseSubsystem",
    "parseTerminalModes",
    "parseWindowChange",
]

#: RFC 4254 §8: the end of the encoded terminal modes.
TTY_OP_END = 0
#: Opcodes from here on are undefined and "cause parsing to stop".
TTY_OP_UNDEFINED = 160

#: ``(rows, columns, width in pixels, height in pixels)``, the order TIOCSWINSZ takes.
WindowSize = tuple[int, int, int, int]


@dataclass
class PtyRequest:
    """What a ``pty-req`` asked for: the terminal, its size, its modes."""

    term: str
    winSize: WindowSize
    modes: list[tuple[int, int]]


def _windowSize(payload: Payload) -> WindowSize:
    # On the wire: columns, rows, width px, height px.
    cols, rows, xpixel, ypixel = (payload.uint32() for _ in range(4))
    return rows, cols, xpixel, ypixel


def parseTerminalModes(encoded: bytes) -> list[tuple[int, int]]:
    """The ``(opcode, value)`` pairs of RFC 4254 §8's encoded terminal modes.

    Parsing stops at ``TTY_OP_END``, at an undefined opcode (160 and up), or
    at the end of the string (paramiko sends an empty one); an opcode whose
    ``uint32`` is cut short is malformed.
    """
    modes: list[tuple[int, int]] = []
    at = 0
    while at < len(encoded):
        opcode = encoded[at]
        if opcode == TTY_OP_END or opcode >= TTY_OP_UNDEFINED:
            break
        try:
            value = Payload(encoded[at + 1 : at + 5]).uint32()
        except MalformedPayload:
            raise MalformedPayload(f"terminal mode {opcode} cut short") from None
        modes.append((opcode, value))
        at += 5
    return modes


def parsePtyReq(data: bytes) -> PtyRequest:
    """``pty-req``: TERM, the window size, the encoded terminal modes."""
    payload = Payload(data)
    term = os.fsdecode(payload.string())
    winSize = _windowSize(payload)
    modes = parseTerminalModes(payload.string())
    payload.end()
    return PtyRequest(term, winSize, modes)


def parseWindowChange(data: bytes) -> WindowSize:
    """``window-change``: the new window size."""
    payload = Payload(data)
    size = _windowSize(payload)
    payload.end()
    return size


def parseEnv(data: bytes) -> tuple[bytes, bytes]:
    """``env``: a variable's name and value, as the client sent them."""
    payload = Payload(data)
    name = payload.string()
    value = payload.string()
    payload.end()
    return name, value


def _oneString(data: bytes) -> bytes:
    payload = Payload(data)
    value = payload.string()
    payload.end()
    return value


def parseExec(data: bytes) -> str:
    """``exec``: the command line."""
    return os.fsdecode(_oneString(data))


def parseSubsystem(data: bytes) -> str:
    """``subsystem``: the subsystem's name."""
    return os.fsdecode(_oneString(data))


def parseSignal(data: bytes) -> str:
    """``signal``: the signal's name without ``SIG``."""
    return os.fsdecode(_oneString(data))


def parseShell(data: bytes) -> None:
    """``shell``: no fields at all."""
    Payload(data).end()
