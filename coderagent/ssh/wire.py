"""Strict readers for SSH wire fields (RFC 4251 section 5) in message payloads.

Conch parses payloads with ``getNS``/``struct.unpack`` on slices, which
accept a short string silently and raise ``struct.error``, ``IndexError`` or
``TypeError`` deep inside its handlers.  :class:`Payload` checks each length
against what is left, so truncated, mistyped or absurdly long fields become
:class:`MalformedPayload`, never an exception that escapes into Conch.  The
forwarding requests read their payloads with it, and :func:`layoutProblem`
checks the fixed fields of every message the server handles before Conch
sees it.
"""

from __future__ import annotations

import os
import struct

_U32 = struct.Struct(">L")


class MalformedPayload(ValueError):
    """A request payload that does not have the fields its type requires."""


class Payload:
    """Reads SSH wire fields (RFC 4251 §5) from one request's payload."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def raw(self, n: int) -> bytes:
        """``n`` bytes as they are (a KEXINIT cookie)."""
        end = self._pos + n
        if end > len(self._data):
            raise MalformedPayload(f"{n} bytes wanted, {len(self._data) - self._pos} left")
        value = self._data[self._pos : end]
        self._pos = end
        return value

    def boolean(self) -> bool:
        return self.raw(1) != b"\0"

    def uint32(self) -> int:
        end = self._pos + 4
        if end > len(self._data):
            raise MalformedPayload("truncated uint32")
        (value,) = _U32.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def string(self) -> bytes:
        length = self.uint32()
        end = self._pos + length
        if end > len(self._data):
            raise MalformedPayload(
                f"string of {length} bytes with {len(self._data) - self._pos} left"
            )
        value = self._data[self._pos : end]
        self._pos = end
        return value

    def text(self) -> str:
        """A string field that must be UTF-8 (host names)."""
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedPayload("string is not UTF-8") from e

    def host(self) -> str:
        """A host name or address: UTF-8 without NUL (no resolver or bind takes one)."""
        text = self.text()
        if "\0" in text:
            raise MalformedPayload("NUL in host name")
        return text

    def path(self) -> str:
        """A file system path: any bytes but NUL, decoded as the OS does."""
        raw = self.string()
        if not raw or b"\0" in raw:
            raise MalformedPayload("empty path or NUL in path")
        return os.fsdecode(raw)

    def port(self) -> int:
        value = self.uint32()
        if value > 0xFFFF:
            raise MalformedPayload(f"port {value} out of range")
        return value

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedPayload(f"{len(self._data) - self._pos} unexpected trailing bytes")


# -- whole messages ------------------------------------------------------------------

#: The fields each message from a client must have, in order: ``u`` uint32,
#: ``b`` boolean, ``s`` string (or mpint); ``*`` means that what follows is
#: the request's own (checked by whoever handles it).  Without ``*`` the
#: message must end after its fields, as OpenSSH requires.  Messages not
#: listed are either refused by the transport's state checks or answered
#: with UNIMPLEMENTED; KEXINIT is parsed in full by the transport.
_LAYOUTS: dict[int, str] = {
    1: "us*",  # DISCONNECT: reason, description (language tag)
    3: "u",  # UNIMPLEMENTED
    4: "bss",  # DEBUG
    5: "s",  # SERVICE_REQUEST
    21: "",  # NEWKEYS
    30: "s",  # KEXDH_INIT, KEX_ECDH_INIT, KEX_HYBRID_INIT: one string or mpint
    50: "sss*",  # USERAUTH_REQUEST: user, service, method (see below)
    80: "sb*",  # GLOBAL_REQUEST
    81: "*",  # REQUEST_SUCCESS
    82: "",  # REQUEST_FAILURE
    90: "suuu*",  # CHANNEL_OPEN
    91: "uuuu*",  # CHANNEL_OPEN_CONFIRMATION
    92: "uus*",  # CHANNEL_OPEN_FAILURE
    93: "uu",  # CHANNEL_WINDOW_ADJUST
    94: "us",  # CHANNEL_DATA
    95: "uus",  # CHANNEL_EXTENDED_DATA
    96: "u",  # CHANNEL_EOF
    97: "u",  # CHANNEL_CLOSE
    98: "usb*",  # CHANNEL_REQUEST
    99: "u",  # CHANNEL_SUCCESS
    100: "u",  # CHANNEL_FAILURE
}


def _fields(payload: Payload, layout: str) -> None:
    for code in layout:
        if code == "u":
            payload.uint32()
        elif code == "s":
            payload.string()
        elif code == "b":
            payload.raw(1)
        else:  # "*"
            return
    payload.end()


def layoutProblem(messageNum: int, data: bytes) -> str | None:
    """What is wrong with the fields of message ``messageNum``, or None.

    Only the fields every message of the type has are checked (and, for a
    ``publickey`` USERAUTH_REQUEST, the method's own, which Conch reads
    without checking).
    """
    layout = _LAYOUTS.get(messageNum)
    if layout is None and messageNum != 7:
        return None
    payload = Payload(data)
    try:
        if messageNum == 7:  # EXT_INFO: a count, then that many name/value pairs
            for _ in range(payload.uint32()):
                payload.string()
                payload.string()
            payload.end()
        elif messageNum == 50:
            payload.string()
            payload.string()
            if payload.string() == b"publickey":
                signed = payload.boolean()
                _fields(payload, "sss" if signed else "ss")
        else:
            assert layout is not None
            _fields(payload, layout)
    except MalformedPayload as e:
        return str(e)
    return None
