"""Go's text conventions, where our messages must read exactly like upstream's.

Error texts that a Go client or an operator greps for (drpcmux's
``unknown rpc: "<name>"``, a dial error's ``%q`` path, slog's quoted field
values) are produced by ``strconv.Quote``; this is its one Python copy.  Templates'
``$VARS`` are expanded by ``os.Expand``'s rules (:func:`goExpand`), and
:func:`signalText` is Go's text for a process a signal killed.
"""

from __future__ import annotations

import signal
from collections.abc import Callable


def goQuote(text: bytes | str) -> str:
    """Go's ``%q`` (``strconv.Quote``) of a string holding ``text``.

    Invalid UTF-8 becomes ``\\xNN`` escapes, exactly as Go prints it.
    """
    if isinstance(text, str):
        if text.isprintable() and '"' not in text and "\\" not in text:
            return f'"{text}"'
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
            pass
        else:  # valid text: one C-level pass, each code point's escape computed once
            return '"' + text.translate(_ESCAPES) + '"'
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    out = ['"']
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b < 0x80:
            size = 1
        elif 0xC2 <= b <= 0xDF:
            size = 2
        elif 0xE0 <= b <= 0xEF:
            size = 3
        elif 0xF0 <= b <= 0xF4:
            size = 4
        else:
            size = 0
        ch = ""
        if size:
            try:
                ch = raw[i : i + size].decode("utf-8")
            except UnicodeDecodeError:
                ch = ""
        if len(ch) != 1:
            out.append(f"\\x{b:02x}")
            i += 1
            continue
        i += size
        out.append(_escape(ch))
    out.append('"')
    return "".join(out)


def _escape(ch: str) -> str:
    """One code point as it stands inside Go's quotes."""
    cp = ord(ch)
    if ch in ('"', "\\"):
        return "\\" + ch
    if ch.isprintable():
        return ch
    if ch in _GO_ESCAPES:
        return _GO_ESCAPES[ch]
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


class _EscapeTable(dict[int, str]):
    """``str.translate`` table filled on first use; it keeps at most 4096 code points."""

    def __missing__(self, cp: int) -> str:
        value = _escape(chr(cp))
        if len(self) < 4096:
            self[cp] = value
        return value


_ESCAPES = _EscapeTable()


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def signalText(number: int, coreDumped: bool = False) -> str:
    """Go's ``ExitError`` text for a process killed by signal ``number``: ``signal: killed``.

    Go's signal names are the C library's descriptions in lower case
    (``hangup``, ``segmentation fault``); an unknown number is shown as such.
    """
    try:
        described = signal.strsignal(number)
    except ValueError:
        described = None
    text = f"signal: {described[:1].lower()}{described[1:]}" if described else f"signal: {number}"
    return text + " (core dumped)" if coreDumped else text


# -- os.Expand -----------------------------------------------------------------------

_SHELL_SPECIAL = frozenset("*#$@!?-0123456789")


def _isAlphaNum(c: str) -> bool:
    return c == "_" or "0" <= c <= "9" or "a" <= c <= "z" or "A" <= c <= "Z"


def _shellName(s: str) -> tuple[str, int]:
    """Go's ``getShellName``: the name after a ``$`` and how many characters it takes.

    ``("", n)`` with ``n > 0`` is bad syntax (the characters are eaten);
    ``("", 0)`` means no name follows (the ``$`` stays).
    """
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SHELL_SPECIAL and s[2] == "}":
            return s[1:2], 3
        end = s.find("}", 1)
        if end == -1:
            return "", 1  # bad syntax: eat "${"
        if end == 1:
            return "", 2  # bad syntax: eat "${}"
        return s[1:end], end + 1
    if s[0] in _SHELL_SPECIAL:
        return s[0], 1
    i = 0
    while i < len(s) and _isAlphaNum(s[i]):
        i += 1
    return s[:i], i


def goExpand(text: str, lookup: Callable[[str], str]) -> str:
    """Go's ``os.Expand``: ``$NAME`` and ``${NAME}`` replaced by ``lookup(NAME)``.

    Exactly Go's rules, since templates are written against them: a ``$``
    not followed by a name stays, ``${}`` and an unterminated ``${`` are
    dropped, ``$1``, ``$$`` and the other shell specials are one-character
    names, and there is no escaping.
    """
    if "$" not in text:
        return text
    out: list[str] = []
    i = 0
    j = 0
    n = len(text)
    while j < n:
        if text[j] == "$" and j + 1 < n:
            out.append(text[i:j])
            name, width = _shellName(text[j + 1 :])
            if name:
                out.append(lookup(name))
            elif width == 0:
                out.append("$")
            j += width
            i = j + 1
        j += 1
    out.append(text[i:])
    return "".join(out)
