"""The ``coder-agent`` command line: every option, its environment fallback, typed values.

Upstream's ``coder agent`` is configured mostly through ``CODER_AGENT_*``
variables that a workspace template sets, so the environment matters as much
as the command line here.  The option table is written once, as data
(:data:`OPTIONS`); Twisted's ``optFlags``/``optParameters``, the environment
fallback, the help text and the validation are all derived from it, so an
option cannot exist in one place and be forgotten in another.

Precedence is upstream's: command line, then environment, then default.  As in
upstream's CLI library (serpent), an environment variable set to the empty
string counts as unset, so ``CODER_AGENT_X=`` never overrides a default.

Parsing keeps each option's raw text and where it came from; ``postOptions``
coerces everything at once.  A bad value stops the agent with exactly one line
naming the flag or the variable it came from, because that is the line an
operator reads in a workspace's start-up log.  twistd would print its whole
help before a ``UsageError``, burying that line, so validation errors leave as
``SystemExit("coder-agent: ...")`` instead.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar
from urllib.parse import urlsplit

from twisted.python import usage

from coderagent.coderd.headers import validHeaderName, validHeaderValue
from coderagent.compat import parseServerDescription
from coderagent.policy import BLOCKED_FILE_TRANSFER_COMMANDS

__all__ = [
    "AUTH_TYPES",
    "IGNORED_OPTIONS",
    "OPTIONS",
    "ConfigError",
    "Kind",
    "OptionSpec",
    "Options",
    "parseDuration",
]


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


def _isPort(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None and int(text) <= 65535


def _parseAddress(text: str) -> str:
    """``host:port`` as Go's net.SplitHostPort reads it, or empty for "disabled".

    Checked when the options are read, so that a typo in a template stops the
    agent at start-up, with the option named, rather than when its server
    binds.  The host may be empty (all interfaces) or an IPv6 literal in
    brackets.
    """
    if text == "":
        return text
    valid = False
    if text.startswith("["):
        literal, closing, rest = text[1:].partition("]")
        if closing and rest.startswith(":") and _isPort(rest[1:]):
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                pass
            else:
                valid = True
    else:
        host, colon, port = text.rpartition(":")
        valid = bool(colon) and not any(c in host for c in ":[]") and _isPort(port)
    if not valid:
        raise ValueError(
            f"invalid address {_quote(text)} "
            "(expected host:port with a port from 0 to 65535, or empty to disable)"
        )
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


@dataclass(frozen=True)
class OptionSpec:
    """One row of the option table.

    ``default`` is the text a user could have typed, parsed like any other
    value, so a default can never be of a different type than a user's value.
    ``helpDefault`` replaces it in the help when the real default is derived
    (``--ssh-host-key-dir``).  A ``secret`` value is never shown anywhere;
    an ``ignored`` option is accepted for compatibility but has no effect.
    """

    name: str
    env: str
    default: str
    kind: Kind
    help: str
    secret: bool = False
    ignored: bool = False
    helpDefault: str | None = None


_TMP = tempfile.gettempdir()
_IGNORED = "Accepted for compatibility and ignored by this agent."
_HOST_KEY_SUBDIR = "coder-agent-ssh-host-keys"
_SPOOL_SUBDIR = "coder-agent-boundary-spool"
#: Where the control socket is when --socket-path is not given.
DEFAULT_SOCKET_PATH = os.path.join(_TMP, "coder-agent.sock")

#: Every option of ``twistd coder-agent``, upstream's first, then ours.
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "auth",
        "CODER_AGENT_AUTH",
        "token",
        AUTH,
        "How the agent proves its identity to coderd: " + ", ".join(AUTH_TYPES) + ".",
    ),
    OptionSpec(
        "agent-url",
        "CODER_AGENT_URL",
        "",
        URL,
        "Address of the Coder deployment the agent reports to (http or https).",
    ),
    OptionSpec(
        "agent-token",
        "CODER_AGENT_TOKEN",
        "",
        TEXT,
        "Token the agent authenticates with when --auth is token.",
        secret=True,
    ),
    OptionSpec(
        "agent-token-file",
        "CODER_AGENT_TOKEN_FILE",
        "",
        TEXT,
        "File to read the agent token from when no token is given directly.",
    ),
    OptionSpec(
        "agent-header",
        "CODER_AGENT_HEADER",
        "",
        HEADERS,
        "Extra HTTP header sent with every request to coderd, as key=value; repeat the "
        "flag or separate items with commas to send several.",
    ),
    OptionSpec(
        "agent-header-command",
        "CODER_AGENT_HEADER_COMMAND",
        "",
        TEXT,
        "Command whose output, one key=value per line, adds HTTP headers to every "
        "request to coderd.",
    ),
    OptionSpec(
        "log-dir",
        "CODER_AGENT_LOG_DIR",
        _TMP,
        PATH,
        "Directory for the agent's own log files.",
    ),
    OptionSpec(
        "script-data-dir",
        "CODER_AGENT_SCRIPT_DATA_DIR",
        _TMP,
        PATH,
        "Directory where scripts keep their data; the SSH host keys live under it "
        "unless --ssh-host-key-dir says otherwise.",
    ),
    OptionSpec(
        "log-human",
        "CODER_AGENT_LOGGING_HUMAN",
        "/dev/stderr",
        TEXT,
        "File to write human-readable logs to; empty for none.",
    ),
    OptionSpec(
        "log-json",
        "CODER_AGENT_LOGGING_JSON",
        "",
        TEXT,
        "File to write JSON logs to; empty for none.",
    ),
    OptionSpec(
        "log-stackdriver",
        "CODER_AGENT_LOGGING_STACKDRIVER",
        "",
        TEXT,
        "File to write Stackdriver-formatted logs to; empty for none.",
    ),
    OptionSpec(
        "block-file-transfer",
        "CODER_AGENT_BLOCK_FILE_TRANSFER",
        "false",
        BOOL,
        "Refuse file transfers made with well-known tools: "
        + ", ".join(sorted(BLOCKED_FILE_TRANSFER_COMMANDS))
        + ".",
    ),
    OptionSpec(
        "block-local-port-forwarding",
        "CODER_AGENT_BLOCK_LOCAL_PORT_FORWARDING",
        "false",
        BOOL,
        "Refuse local port forwarding (ssh -L), so clients cannot reach other hosts "
        "through the workspace.",
    ),
    OptionSpec(
        "block-reverse-port-forwarding",
        "CODER_AGENT_BLOCK_REVERSE_PORT_FORWARDING",
        "false",
        BOOL,
        "Refuse reverse port forwarding (ssh -R), so clients cannot make the workspace "
        "listen for them.",
    ),
    OptionSpec(
        "ssh-max-timeout",
        "CODER_AGENT_SSH_MAX_TIMEOUT",
        "72h",
        DURATION,
        "Longest an unresponsive SSH connection is kept; best between 60s and 72h, 0 for no limit.",
    ),
    OptionSpec(
        "pprof-address",
        "CODER_AGENT_PPROF_ADDRESS",
        "127.0.0.1:6060",
        ADDRESS,
        "host:port to serve profiling data on; empty to turn it off.",
    ),
    OptionSpec(
        "prometheus-address",
        "CODER_AGENT_PROMETHEUS_ADDRESS",
        "127.0.0.1:2112",
        ADDRESS,
        "host:port to serve Prometheus metrics on; empty to turn it off.",
    ),
    OptionSpec(
        "debug-address",
        "CODER_AGENT_DEBUG_ADDRESS",
        "127.0.0.1:2113",
        ADDRESS,
        "host:port of the debugging HTTP server; empty to turn it off.",
    ),
    OptionSpec(
        "no-reap",
        "CODER_AGENT_NO_REAP",
        "false",
        BOOL,
        "Do not reap orphaned child processes, even when running as PID 1.",
    ),
    OptionSpec(
        "socket-server-enabled",
        "CODER_AGENT_SOCKET_SERVER_ENABLED",
        "false",
        BOOL,
        "Serve the agent's local control socket.",
    ),
    OptionSpec(
        "socket-path",
        "CODER_AGENT_SOCKET_PATH",
        DEFAULT_SOCKET_PATH,
        TEXT,
        "Path of the agent's local control socket (ask it with: coder-agent status).",
    ),
    OptionSpec(
        "boundary-log-proxy-socket-path",
        "CODER_AGENT_BOUNDARY_LOG_PROXY_SOCKET_PATH",
        os.path.join(_TMP, "boundary-audit.sock"),
        TEXT,
        "Unix socket on which Boundary delivers its audit logs to the agent.",
    ),
    OptionSpec(
        "tailnet-listen-port",
        "CODER_AGENT_TAILNET_LISTEN_PORT",
        "0",
        PORT,
        "Fixed port for the tailnet to listen on (0 picks one). " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-enable",
        "CODER_AGENT_DEVCONTAINERS_ENABLE",
        "true",
        BOOL,
        "Notice dev containers running in the workspace. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-project-discovery-enable",
        "CODER_AGENT_DEVCONTAINERS_PROJECT_DISCOVERY_ENABLE",
        "true",
        BOOL,
        "Search the filesystem for dev container projects. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-discovery-autostart-enable",
        "CODER_AGENT_DEVCONTAINERS_DISCOVERY_AUTOSTART_ENABLE",
        "false",
        BOOL,
        "Start discovered dev container projects whose configuration asks for it. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "ssh-endpoint",
        "CODER_AGENT_SSH_ENDPOINT",
        "tcp:2222:interface=127.0.0.1",
        ENDPOINT,
        "Where the SSH server listens, as a Twisted endpoint description "
        "(tcp:PORT:interface=ADDRESS, unix:PATH, ...).",
    ),
    OptionSpec(
        "ssh-authorized-keys",
        "CODER_AGENT_SSH_AUTHORIZED_KEYS",
        os.path.expanduser("~/.ssh/authorized_keys"),
        PATH,
        "authorized_keys file listing the public keys that may log in over SSH.",
    ),
    OptionSpec(
        "ssh-host-key-dir",
        "CODER_AGENT_SSH_HOST_KEY_DIR",
        "",
        OPTIONAL_PATH,
        "Directory of the SSH host keys, generated there on first start.",
        helpDefault=f"<script-data-dir>/{_HOST_KEY_SUBDIR}",
    ),
    OptionSpec(
        "boundary-log-spool-dir",
        "CODER_AGENT_BOUNDARY_LOG_SPOOL_DIR",
        "",
        OPTIONAL_PATH,
        "Directory where boundary audit logs wait until coderd has them (created 0700).",
        helpDefault=f"<script-data-dir>/{_SPOOL_SUBDIR}",
    ),
    OptionSpec(
        "boundary-log-spool-max-bytes",
        "CODER_AGENT_BOUNDARY_LOG_SPOOL_MAX_BYTES",
        "256MiB",
        SIZE,
        "Most boundary audit logs kept waiting for coderd; beyond it the oldest are dropped "
        "and counted.",
    ),
    OptionSpec(
        "boundary-log-commit-interval",
        "CODER_AGENT_BOUNDARY_LOG_COMMIT_INTERVAL",
        "50ms",
        POSITIVE_DURATION,
        "Longest a received boundary audit log waits before it is written to the spool; "
        "what was received earlier survives a crash.",
    ),
    OptionSpec(
        "ssh-login-grace-time",
        "CODER_AGENT_SSH_LOGIN_GRACE_TIME",
        "2m",
        POSITIVE_DURATION,
        "Close SSH connections that have not authenticated within this time.",
    ),
    OptionSpec(
        "ssh-max-auth-tries",
        "CODER_AGENT_SSH_MAX_AUTH_TRIES",
        "6",
        COUNT,
        "Failed authentication attempts allowed per SSH connection before it is closed.",
    ),
)

_SPECS: Mapping[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}

#: Flags accepted so that upstream templates keep working, but acted on by
#: nothing here; the service names those in use once at start-up.
IGNORED_OPTIONS: tuple[str, ...] = tuple(spec.name for spec in OPTIONS if spec.ignored)

COMMAND_LINE = "command line"
_EMPTY = '""'

DEFAULT = "default"


def _helpNotes(spec: OptionSpec) -> list[str]:
    """``[env: ...]`` and ``[default: ...]``; a secret's default is never shown."""
    notes = [f"[env: {spec.env}]"]
    if not spec.secret:
        shown = spec.helpDefault if spec.helpDefault is not None else spec.default
        notes.append(f"[default: {shown or _EMPTY}]")
    return notes


def _helpText(spec: OptionSpec) -> str:
    """The help line: what it does, then where else it can be set and its default."""
    return " ".join([spec.help, *_helpNotes(spec)])


@dataclass(frozen=True)
class _Raw:
    """An option's text(s) before parsing and where they came from.

    ``texts`` holds one entry, except for a repeatable option given several
    times on the command line.
    """

    texts: tuple[str, ...]
    source: str
    where: str


class Options(usage.Options):
    """Options of ``twistd coder-agent``; after parsing, ``self[name]`` is typed.

    Keys are the long flag names.  ``environ`` defaults to ``os.environ`` and
    exists so tests (and embedding code) can pass their own mapping.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a Coder workspace agent: an SSH server for this workspace, configured like "
        "upstream's `coder agent`. Each option can also be set through the environment "
        "variable shown with it; the command line wins over the environment, which wins "
        "over the default. Booleans are written --flag, --flag=true or --flag=false on the "
        "command line and true, false, 1, 0, yes or no in the environment. Durations use "
        "Go's syntax: 72h, 1h30m, 1.5s, 500ms."
    )

    # Twisted reads these two class attributes; the repeatable option is
    # missing from both because Twisted keeps only the last value of a
    # parameter, so it gets an ``opt_`` method instead (added below the class).
    optFlags: ClassVar[list[list[str | None]]] = [
        [spec.name, None, _helpText(spec)] for spec in OPTIONS if spec.kind.flag
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        # The default stays None so that "given on the command line" is
        # visible after getopt, and so that Twisted adds no second default.
        [spec.name, None, None, _helpText(spec)]
        for spec in OPTIONS
        if not spec.kind.flag and not spec.kind.repeatable
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self._repeated: dict[str, list[str]] = {}
        self._booleanAssignments: dict[str, str] = {}
        self._commandLine: dict[str, tuple[str, ...]] | None = None
        self._sources: dict[str, str] = {}

    # --- command line -----------------------------------------------------

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Take ``--<boolean>=<value>`` ourselves, then let Twisted parse the rest.

        Go CLIs accept ``--flag=false``, and templates use it to switch off a
        flag that the environment switched on.  getopt would reject an
        argument to a flag, so those items are removed before it runs.
        """
        arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self._takeBooleanAssignments(arguments))

    def _takeBooleanAssignments(self, arguments: list[str]) -> list[str]:
        """Remove ``--<boolean>=<value>`` items, remembering the last value of each.

        Scanning follows getopt: it stops at ``--`` or at the first operand,
        and skips the value of a parameter written as two items, so a value
        that happens to look like ``--block-file-transfer=x`` is left alone.
        As with pflag, the last occurrence wins, so a bare ``--flag`` after
        ``--flag=false`` turns the flag back on.
        """
        rest: list[str] = []
        assigned: dict[str, tuple[int, str]] = {}
        lastBare: dict[str, int] = {}
        index = 0
        while index < len(arguments):
            argument = arguments[index]
            if argument in ("--", "-") or not argument.startswith("-"):
                rest.extend(arguments[index:])
                break
            if not argument.startswith("--"):
                # Short options: we define none; getopt reports them.
                rest.append(argument)
                index += 1
                continue
            name, equals, value = argument[2:].partition("=")
            spec = _SPECS.get(name)
            if spec is not None and spec.kind.flag:
                if equals:
                    assigned[name] = (index, value)
                    index += 1
                    continue
                lastBare[name] = index
            rest.append(argument)
            if not equals and self._takesValue(name):
                rest.extend(arguments[index + 1 : index + 2])
                index += 1
            index += 1
        self._booleanAssignments = {
            name: value
            for name, (position, value) in assigned.items()
            if position > lastBare.get(name, -1)
        }
        return rest

    def _takesValue(self, name: str) -> bool:
        """Whether getopt will read the next item as this long option's value.

        getopt accepts any unambiguous prefix of a long option, so prefixes
        are resolved the same way here.
        """
        if name in self.longOpt:
            return False
        if name + "=" in self.longOpt:
            return True
        candidates = [option for option in self.longOpt if option.startswith(name)]
        return len(candidates) == 1 and candidates[0].endswith("=")

    def _collect(self, name: str, value: str) -> None:
        """Keep every occurrence of a repeatable option, in order."""
        self._repeated.setdefault(name, []).append(value)

    def _commandLineTexts(self) -> dict[str, tuple[str, ...]]:
        """What the command line said, as raw text, for the options it set.

        Once validation has replaced the raw values with typed ones, the
        snapshot taken then is returned instead, so validating twice (or
        asking :meth:`sourceOf` afterwards) still sees the command line.
        """
        if self._commandLine is not None:
            return self._commandLine
        given: dict[str, tuple[str, ...]] = {}
        for spec in OPTIONS:
            if spec.kind.repeatable:
                if spec.name in self._repeated:
                    given[spec.name] = tuple(self._repeated[spec.name])
            elif spec.kind.flag:
                if spec.name in self._booleanAssignments:
                    given[spec.name] = (self._booleanAssignments[spec.name],)
                elif self.get(spec.name):
                    given[spec.name] = ("true",)
            elif self.get(spec.name) is not None:
                given[spec.name] = (str(self[spec.name]),)
        return given

    # --- resolution ---------------------------------------------------------

    def _raw(self, spec: OptionSpec, commandLine: Mapping[str, tuple[str, ...]]) -> _Raw:
        """Pick the text that wins for one option: command line, environment, default."""
        if spec.name in commandLine:
            return _Raw(commandLine[spec.name], COMMAND_LINE, f"--{spec.name}")
        value = self._environ.get(spec.env, "")
        if value != "":
            return _Raw((value,), f"environment ({spec.env})", spec.env)
        return _Raw((spec.default,), DEFAULT, f"default of --{spec.name}")

    def validate(self) -> None:
        """Turn every option's winning text into its typed value, or raise ConfigError.

        This is the whole of the checking, kept apart from ``postOptions`` so
        tests can read the message without going through ``SystemExit``.  The
        first bad value wins; one line is what the operator will act on.
        """
        commandLine = self._commandLineTexts()
        typed: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for spec in OPTIONS:
            raw = self._raw(spec, commandLine)
            try:
                if spec.kind.repeatable:
                    typed[spec.name] = [
                        item for text in raw.texts for item in spec.kind.parse(text)
                    ]
                else:
                    typed[spec.name] = spec.kind.parse(raw.texts[-1])
            except ValueError as e:
                problem = "invalid value (not shown)" if spec.secret else str(e)
                raise ConfigError(raw.where, problem) from None
            sources[spec.name] = raw.source
        if not typed["ssh-host-key-dir"]:
            typed["ssh-host-key-dir"] = os.path.join(typed["script-data-dir"], _HOST_KEY_SUBDIR)
        if not typed["boundary-log-spool-dir"]:
            typed["boundary-log-spool-dir"] = os.path.join(typed["script-data-dir"], _SPOOL_SUBDIR)
        self._commandLine = commandLine
        self._sources = sources
        self.update(typed)

    def postOptions(self) -> None:
        """Validate, and leave with one line and status 1 on a bad value.

        twistd prints the entire help before the message of a ``UsageError``;
        a ``SystemExit`` with a string prints just that string on stderr.
        """
        try:
            self.validate()
        except ConfigError as e:
            raise SystemExit(f"coder-agent: {e}") from None

    # --- questions the service asks ----------------------------------------------

    def sourceOf(self, name: str) -> str:
        """Where ``name``'s value came from, for start-up logs and error reports.

        One of ``"command line"``, ``"environment (CODER_AGENT_X)"`` or
        ``"default"``.
        """
        spec = _SPECS.get(name)
        if spec is None:
            raise KeyError(f"no such option: {name}")
        if name in self._sources:
            return self._sources[name]
        return self._raw(spec, self._commandLineTexts()).source

    def ignoredOptionsInUse(self) -> list[str]:
        """The ignored options someone set, so the agent can say once that they do nothing.

        An option counts when it was given at all (command line or
        environment), even to its default value: whoever set it expected an
        effect.
        """
        inUse = []
        for name in IGNORED_OPTIONS:
            spec = _SPECS[name]
            if self.sourceOf(name) != DEFAULT:
                inUse.append(name)
            elif self._sources and self[name] != spec.kind.parse(spec.default):
                # Only meaningful once validated: before that, self[name]
                # holds Twisted's raw placeholder, not a typed value.
                inUse.append(name)
        return inUse

    # --- presentation -------------------------------------------------------

    def getUsage(self, width: int | None = None) -> str:
        """List the options in table order, each with its env variable and default.

        Twisted's two-column layout leaves under 30 columns for the text next
        to ``--devcontainers-discovery-autostart-enable`` and breaks the long
        variable names in pieces; here the text goes under the flag, and words
        are never broken, so every name can be found (and copied) whole.  The
        same words are in ``self.docs``, which Twisted's shell completion reads.
        """
        if not width:
            width = int(os.environ.get("COLUMNS", "80"))
        width = max(width, 40)
        wrap = textwrap.TextWrapper(
            width=width,
            initial_indent=" " * 6,
            subsequent_indent=" " * 6,
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines = ["Options:"]
        described: set[str] = set()
        for spec in OPTIONS:
            if spec.kind.flag:
                head = f"--{spec.name}[=true|false]"
            else:
                head = f"--{spec.name}={spec.kind.metavar}"
            lines.append("  " + head)
            lines.extend(wrap.wrap(spec.help))
            # The notes go on a line of their own so that "[env:" and the
            # variable name are never separated by a line break.
            notes = " ".join(_helpNotes(spec))
            if len(wrap.initial_indent + notes) <= width:
                lines.append(wrap.initial_indent + notes)
            else:
                lines.extend(wrap.initial_indent + note for note in _helpNotes(spec))
            described.add(spec.name)
        for option in self.longOpt:
            name = option.rstrip("=")
            if name in described:
                continue
            described.add(name)
            lines.append(f"  --{option}")
            lines.extend(wrap.wrap(" ".join((self.docs.get(name) or "").split())))
        usage_ = "\n".join(lines) + "\n"
        longdesc = "\n".join(textwrap.wrap(self.longdesc, width))
        return f"{usage_}\n{longdesc}\n"

    def __repr__(self) -> str:
        """Like a dict's, with secrets hidden, in case options end up in a log."""
        shown = {
            key: "<hidden>" if key in _SPECS and _SPECS[key].secret and value else value
            for key, value in self.items()
        }
        return f"{type(self).__name__}({shown!r})"


def _collector(spec: OptionSpec) -> Callable[[Options, str], None]:
    """Build the ``opt_`` method Twisted dispatches a repeatable option to."""

    def collect(self: Options, value: str) -> None:
        self._collect(spec.name, value)

    collect.__doc__ = _helpText(spec)
    collect.__name__ = "opt_" + spec.name.replace("-", "_")
    return collect


for _spec in OPTIONS:
    if _spec.kind.repeatable:
        setattr(Options, "opt_" + _spec.name.replace("-", "_"), _collector(_spec))
del _spec
