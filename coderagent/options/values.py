"""Option values: how each kind of option is written, parsed and refused.

Every parser takes the text a user typed (flag or environment variable) and
returns the typed value or raises :class:`ValueError` with the reason; the
caller (:mod:`coderagent.options`) names the flag or variable in the one line
an operator reads.  Nothing here knows which options exist.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from coderagent.coderd.headers import validHeaderName, validHeaderValue
from coderagent.compat import parseServerDescription
from coderagent.netaddr import splitHostPort


class ConfigError(ValueError):
    """One bad option value, worded as the single line an operator will see.

    ``where`` is what the operator typed or set (``--ssh-max-timeout`` or
    ``CODER_AGENT_SSH_MAX_TIMEOUT``), so the message says where to look;
    ``problem`` says what was wrong and what was expected.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _quote(text: str) -> str:
    """Quote a value for an error line, escaping control characters.

    A value with a newline in it must not split the one-line error in two,
    and quotes make leading or trailing spaces visible.
    """
    return json.dumps(text, ensure_ascii=False)


# --- value kinds ------------------------------------------------------------
#
# Each parser takes the raw text and returns the typed value, or raises
# ValueError whose message is the problem part of the error line.  They never
# see where the text came from; Options.validate adds that.


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _parseBool(text: str) -> bool:
    """Accept the spellings templates actually use, in any case, and no others.

    A closed list (rather than "anything non-empty is true") means a typo such
    as ``ture`` stops the agent instead of silently meaning false.
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"invalid boolean {_quote(text)} (expected true, false, 1, 0, yes or no)")


#: Nanoseconds per unit, as Go's time.ParseDuration spells the units
#: (both the micro sign U+00B5 and the Greek mu U+03BC are accepted there).
_DURATION_UNITS: Mapping[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
#: Go stores a duration in an int64 of nanoseconds; larger values are errors there.
_MAX_DURATION_NS = 2**63 - 1
_DURATION_EXPECTED = "expected a duration such as 72h, 1h30m, 1.5s or 500ms"


def parseDuration(text: str) -> float:
    """Parse a Go ``time.ParseDuration`` string into seconds.

    Upstream's duration options are written in Go's syntax in existing
    templates (``72h``, ``1h30m``), so we accept exactly that: an optional
    sign, then one or more ``<number><unit>`` pairs, or the bare ``0``.  A
    number without a unit (``10``) is refused, as Go refuses it, because
    guessing seconds versus minutes is how timeouts end up wrong.  Negative
    durations mean nothing for our options and are refused too.  Surrounding
    whitespace is ignored, since values often come from YAML or shell files.
    """
    body = text.strip()
    sign = ""
    if body[:1] in ("+", "-"):
        sign, body = body[0], body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"invalid duration {_quote(text)} ({_DURATION_EXPECTED})")
    total = Decimal(0)
    position = 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            raise ValueError(f"invalid duration {_quote(text)} ({_DURATION_EXPECTED})")
        try:
            number = Decimal(match.group(1))
        except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
            raise ValueError(f"invalid duration {_quote(text)} ({_DURATION_EXPECTED})") from e
        total += number * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if total > _MAX_DURATION_NS:
        raise ValueError(f"invalid duration {_quote(text)} (too large)")
    if sign == "-" and total != 0:
        raise ValueError(f"invalid duration {_quote(text)} (must not be negative)")
    return float(total / 1_000_000_000)


def _parsePositiveDuration(text: str) -> float:
    """A duration that must be above zero, for timers where 0 would mean "at once"."""
    seconds = parseDuration(text)
    if seconds <= 0:
        raise ValueError(f"invalid duration {_quote(text)} (must be greater than zero)")
    return seconds


def _parseInteger(text: str, what: str, low: int, high: int | None) -> int:
    """Decimal integers only: no ``0x``, no ``1_000``, which Python's int() would take."""
    word = text.strip()
    if re.fullmatch(r"[+-]?[0-9]+", word):
        value = int(word)
        if value >= low and (high is None or value <= high):
            return value
    expected = f"from {low} to {high}" if high is not None else f"of at least {low}"
    raise ValueError(f"invalid {what} {_quote(text)} (expected an integer {expected})")


_SIZE = re.compile(r"([0-9]+)\s*([KMG]i?B?|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}


def _parseSize(text: str) -> int:
    """A byte count: ``268435456``, ``256MiB``, ``500MB``, ``1GiB`` (at least 64 KiB)."""
    match = _SIZE.fullmatch(text.strip())
    if match is not None:
        value = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
        if value >= 64 * 1024:
            return value
    raise ValueError(
        f"invalid size {_quote(text)} (expected bytes, or a number with KiB, MiB, GiB, KB, MB "
        "or GB, of at least 64KiB)"
    )


def _parsePort(text: str) -> int:
    return _parseInteger(text, "port", 0, 65535)


def _parseCount(text: str) -> int:
    return _parseInteger(text, "number", 1, None)


def _parseAddress(text: str) -> str:
    """``host:port`` as Go's net.SplitHostPort reads it, or empty for "disabled".

    Checked when the options are read, so that a typo in a template stops the
    agent at start-up, with the option named, rather than when its server
    binds.  The host may be empty (all interfaces) or an IPv6 literal in
    brackets.
    """
    if text == "":
        return text
    try:
        splitHostPort(text)
    except ValueError:
        raise ValueError(
            f"invalid address {_quote(text)} "
            "(expected host:port with a port from 0 to 65535, or empty to disable)"
        ) from None
    return text


def _parseHeaders(text: str) -> list[tuple[str, str]]:
    """Comma-separated ``key=value`` items, as serpent's StringArray reads them.

    Upstream splits every occurrence (flag or variable) as one CSV record, so
    an item containing a comma is written in double quotes.  Each item must
    have a non-empty header name before its ``=``; a header that could never
    be sent (Go's net/http rule, :func:`~coderagent.coderd.headers.validHeaderName`)
    is better refused at start-up than by every coderd request later.
    """
    if text == "":
        return []
    if "\n" in text or "\r" in text:
        raise ValueError(f"invalid header list {_quote(text)} (line breaks are not allowed)")
    try:
        items = next(csv.reader([text], strict=True))
    except csv.Error as e:
        raise ValueError(
            f"invalid header list {_quote(text)} ({e}; expected comma-separated key=value "
            'items, with " around an item that contains a comma)'
        ) from e
    headers = []
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not validHeaderName(key):
            raise ValueError(
                f"invalid header {_quote(item)} "
                "(expected key=value with a non-empty HTTP header name as key)"
            )
        if not validHeaderValue(value):
            raise ValueError(
                f"invalid header {_quote(item)} "
                "(control characters other than tab are not allowed in a header value)"
            )
        headers.append((key, value))
    return headers


#: Upstream's ``--auth`` values.  Only ``token`` is implemented by the coderd
#: credentials code; the others are accepted here so that the refusal there
#: can say "not supported yet" rather than "unknown".
AUTH_TYPES: tuple[str, ...] = (
    "token",
    "google-instance-identity",
    "aws-instance-identity",
    "azure-instance-identity",
)


def _parseAuth(text: str) -> str:
    """Upstream's exact error text, plus the list of values that would work."""
    if text in AUTH_TYPES:
        return text
    shown = text if text.isprintable() else _quote(text)
    expected = ", ".join(AUTH_TYPES[:-1]) + " or " + AUTH_TYPES[-1]
    raise ValueError(f"unknown agent auth type: {shown} (expected {expected})")


def _parseURL(text: str) -> str:
    """An http(s) URL with a host, or empty (whether empty is acceptable is decided later).

    The coderd credentials code refuses an empty URL with upstream's wording;
    here we only make sure a given URL could ever be dialled.
    """
    if text == "":
        return text
    try:
        parts = urlsplit(text)
        valid = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"invalid URL {_quote(text)} (expected an http or https URL with a host)")
    return text


def _parseEndpoint(text: str) -> str:
    """A Twisted strports server description, checked without listening.

    The SSH listener is built much later, after twistd has daemonized; a typo
    found there would only reach the log.  ``parseServerDescription`` reads
    it as ``serverFromString`` does, without a reactor.
    """
    expected = "expected a Twisted endpoint description such as tcp:2222:interface=127.0.0.1"
    if not text.strip():
        raise ValueError(f"invalid endpoint {_quote(text)} ({expected})")
    try:
        parsed = parseServerDescription(text)
    except Exception as e:  # anything the parser raises means the text is unusable
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"invalid endpoint {_quote(text)} ({reason}; {expected})") from e
    kind, args = parsed[0], parsed[1]
    if kind in ("TCP", "SSL") and not 0 <= args[0] <= 65535:
        raise ValueError(f"invalid endpoint {_quote(text)} (port out of range; {expected})")
    return text


def _parseText(text: str) -> str:
    return text


def _parsePath(text: str) -> str:
    """A path that must be given; an empty one would quietly mean the current directory."""
    if text == "":
        raise ValueError(f"invalid path {_quote(text)} (expected a non-empty path)")
    return text


@dataclass(frozen=True)
class Kind:
    """How one kind of option is written, shown and parsed.

    ``flag`` kinds become Twisted flags (no argument); ``repeatable`` kinds
    collect every occurrence on the command line instead of keeping the last.
    """

    name: str
    metavar: str
    parse: Callable[[str], Any]
    flag: bool = False
    repeatable: bool = False


TEXT = Kind("text", "<text>", _parseText)
PATH = Kind("path", "<path>", _parsePath)
OPTIONAL_PATH = Kind("optional path", "<path>", _parseText)
BOOL = Kind("boolean", "true|false", _parseBool, flag=True)
DURATION = Kind("duration", "<duration>", parseDuration)
POSITIVE_DURATION = Kind("positive duration", "<duration>", _parsePositiveDuration)
ADDRESS = Kind("address", "<host:port>", _parseAddress)
PORT = Kind("port", "<port>", _parsePort)
COUNT = Kind("count", "<n>", _parseCount)
HEADERS = Kind("headers", "<key=value>", _parseHeaders, repeatable=True)
AUTH = Kind("auth type", "<type>", _parseAuth)
SIZE = Kind("size", "<bytes>", _parseSize)
URL = Kind("URL", "<url>", _parseURL)
ENDPOINT = Kind("endpoint", "<description>", _parseEndpoint)


