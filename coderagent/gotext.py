"""Go's text conventions, where our messages must read exactly like upstream's.

Error texts that a Go client or an operator greps for (drpcmux's
``unknown rpc: "<name>"``, a dial error's ``%q`` path, slog's quoted field
values) are produced by ``strconv.Quote``; this is its one Python copy.
"""

from __future__ import annotations


def goQuote(text: bytes | str) -> str:
    """Go's ``%q`` (``strconv.Quote``) of a string holding ``text``.

    Invalid UTF-8 becomes ``\\xNN`` escapes, exactly as Go prints it.
    """
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
        cp = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}
