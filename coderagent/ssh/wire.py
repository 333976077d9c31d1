"""Strict readers for SSH wire fields (RFC 4251 section 5) in request payloads.

Conch parses payloads with ``getNS``/``struct.unpack`` on slices, which
accept a short string silently and raise ``struct.error`` or ``IndexError``
deep inside its handlers.  :class:`Payload` checks each length against what
is left, so truncated, mistyped or absurdly long fields become
:class:`MalformedPayload`, never an exception that escapes into Conch.  The
forwarding requests read their payloads with it.
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
