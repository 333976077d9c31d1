"""``authorized_keys`` options, with OpenSSH's semantics (``auth-options.c``).

A key line may start with options (``restrict,port-forwarding,permitopen="db:5432" ssh-ed25519
AAAA…``) that narrow what that key may do.  They are honoured here as sshd honours them: flags
are read left to right (``restrict`` turns everything off, a later ``port-forwarding`` or ``pty``
turns that back on), ``permitopen`` and ``permitlisten`` may repeat, ``from`` takes sshd's
pattern lists.  What they allow is narrowed further by the policy file and the ``--block-*``
flags, never widened.

An option this agent does not support (``tunnel=``, ``cert-authority``, ``environment=``,
``principals=``, the FIDO ``touch-required``/``verify-required`` flags) makes the whole line
refused, with its name, rather than silently granting more than its owner wrote.  Agent and X11
forwarding are never offered by this agent, so the flags about them are accepted and change
nothing.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field, replace

from coderagent.policy.patterns import (
    PatternError,
    matchAddressList,
    matchHostAndAddress,
    matchPattern,
)

#: sshd's SSH_AUTHOPT_PERMIT_MAX: more permitopen/permitlisten than this is an error.
MAX_PERMITS = 4096

#: Options that narrow (or restore what ``restrict`` took) and that this agent honours.
_FLAGS = ("port-forwarding", "agent-forwarding", "x11-forwarding", "pty", "user-rc")
#: Recognised, but this agent cannot honour them: the key line is refused.
_UNSUPPORTED_FLAGS = ("cert-authority", "touch-required", "verify-required")
_UNSUPPORTED_VALUES = ("principals", "environment", "tunnel")


class KeyOptionError(ValueError):
    """The options cannot be honoured; the message names the option and why."""


@dataclass(frozen=True)
class Permit:
    """One ``permitopen`` (host, port) or ``permitlisten`` (host pattern, port); port ``None``
    is ``*``."""

    host: str
    port: int | None


@dataclass(frozen=True)
class KeyOptions:
    """What one key is allowed, from its options (no options: everything)."""

    portForwarding: bool = True
    agentForwarding: bool = True
    x11Forwarding: bool = True
    pty: bool = True
    userRc: bool = True
    command: str | None = None
    fromPatterns: str | None = None
    permitOpen: tuple[Permit, ...] = ()
    permitListen: tuple[Permit, ...] = ()
    #: Seconds since the epoch after which the key no longer works.
    validBefore: float | None = None
    #: The options as written (for log lines and ``policy explain``).
    text: str = field(default="", compare=False)

    @property
    def restricted(self) -> bool:
        return self != KeyOptions(text=self.text)

    def usableFrom(self, address: str, now: float | None = None) -> str | None:
        """``None`` if a client at ``address`` may log in with this key now, else why not."""
        now = time.time() if now is None else now
        if self.validBefore is not None and now > self.validBefore:
            return "the key's expiry-time has passed"
        if self.fromPatterns is not None:
            try:
                ok = matchHostAndAddress(address, address, self.fromPatterns)
            except PatternError as e:
                return f"invalid from criteria ({e})"
            if not ok:
                return f"not from a permitted host (from={self.fromPatterns!r})"
        return None

    def allowsOpen(self, host: str, port: int) -> bool:
        """``permitopen``: the host exactly as the client wrote it (or ``*``), the port or ``*``."""
        if not self.permitOpen:
            return True
        return any(
            (p.host == "*" or p.host == host) and (p.port is None or p.port == port)
            for p in self.permitOpen
        )

    def allowsListen(self, host: str, port: int) -> bool:
        """``permitlisten``: the listen address against the pattern, the port or ``*``."""
        if not self.permitListen:
            return True
        lowered = host.lower()
        return any(
            (p.port is None or p.port == port) and matchPattern(lowered, p.host)
            for p in self.permitListen
        )


def parseKeyOptions(text: str) -> KeyOptions:
    """Parse the options field of a key line (without the key), as sshd does."""
    options = KeyOptions(text=text)
    opens: list[Permit] = []
    listens: list[Permit] = []
    rest = text
    while rest:
        name, value, rest = _nextOption(rest)
        lowered = name.lower()
        negated = lowered.startswith("no-")
        flag = lowered[3:] if negated else lowered
        if value is None and lowered == "restrict":
            options = replace(
                options,
                portForwarding=False,
                agentForwarding=False,
                x11Forwarding=False,
                pty=False,
                userRc=False,
            )
        elif value is None and flag in _FLAGS:
            options = _setFlag(options, flag, not negated)
        elif (value is None and flag in _UNSUPPORTED_FLAGS) or (
            value is not None and lowered in _UNSUPPORTED_VALUES
        ):
            raise KeyOptionError(f"option {name!r} is not supported by this agent")
        elif value is not None and lowered == "command":
            if options.command is not None:
                raise KeyOptionError('multiple "command" clauses')
            options = replace(options, command=value)
        elif value is not None and lowered == "from":
            if options.fromPatterns is not None:
                raise KeyOptionError('multiple "from" clauses')
            try:
                matchAddressList("127.0.0.1", value)  # validates every entry
            except PatternError as e:
                raise KeyOptionError(f"invalid from criteria {value!r}: {e}") from None
            options = replace(options, fromPatterns=value)
        elif value is not None and lowered == "expiry-time":
            before = _absoluteTime(value)
            if options.validBefore is None or before < options.validBefore:
                options = replace(options, validBefore=before)
        elif value is not None and lowered in ("permitopen", "permitlisten"):
            permits = opens if lowered == "permitopen" else listens
            if len(permits) >= MAX_PERMITS:
                raise KeyOptionError("too many permission directives")
            permits.append(_permit(value, bareListen=lowered == "permitlisten"))
        else:
            raise KeyOptionError(f"unknown key option {name!r}")
    return replace(options, permitOpen=tuple(opens), permitListen=tuple(listens))


def _setFlag(options: KeyOptions, flag: str, value: bool) -> KeyOptions:
    if flag == "port-forwarding":
        return replace(options, portForwarding=value)
    if flag == "agent-forwarding":
        return replace(options, agentForwarding=value)
    if flag == "x11-forwarding":
        return replace(options, x11Forwarding=value)
    if flag == "pty":
        return replace(options, pty=value)
    return replace(options, userRc=value)


_NAME = re.compile(r"[A-Za-z0-9-]+")


def _nextOption(text: str) -> tuple[str, str | None, str]:
    """The first option (name, value if ``name="…"``) and what follows its comma."""
    m = _NAME.match(text)
    if m is None:
        raise KeyOptionError(f"unknown key option at {text[:20]!r}")
    name = m.group()
    rest = text[m.end() :]
    value: str | None = None
    if rest.startswith("="):
        value, rest = _dequote(rest[1:], name)
    if rest == "":
        return name, value, ""
    if not rest.startswith(","):
        raise KeyOptionError(f"unknown key option {name + rest.split(',')[0]!r}")
    rest = rest[1:]
    if rest == "":
        raise KeyOptionError("unexpected end-of-options")
    return name, value, rest


def _dequote(text: str, name: str) -> tuple[str, str]:
    """``opt_dequote``: a double-quoted value in which ``\\"`` stands for a quote."""
    if not text.startswith('"'):
        raise KeyOptionError(f"{name}: missing start quote")
    out = []
    i = 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] == '"':
            i += 1
        out.append(text[i])
        i += 1
    if i >= len(text):
        raise KeyOptionError(f"{name}: missing end quote")
    return "".join(out), text[i + 1 :]


def _permit(value: str, bareListen: bool) -> Permit:
    if bareListen and ":" not in value:
        value = "*:" + value  # a bare port: any listen address
    if value.startswith("["):
        host, closing, rest = value[1:].partition("]")
        if not closing or not rest.startswith(":"):
            raise KeyOptionError(f"invalid permission hostname in {value!r}")
        port = rest[1:]
    else:
        host, colon, port = value.rpartition(":")
        if not colon or not host:
            raise KeyOptionError(f"invalid permission hostname in {value!r}")
    if port == "*":
        return Permit(host, None)
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise KeyOptionError(f"invalid permission port in {value!r}")
    return Permit(host, int(port))


def _absoluteTime(text: str) -> float:
    """``parse_absolute_time``: YYYYMMDD[HHMM[SS]], local time unless it ends in Z."""
    utc = text.endswith(("Z", "z"))
    digits = text[:-1] if utc else text
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not digits.isdigit() or len(digits) not in formats:
        raise KeyOptionError(f"invalid expires time {text!r}")
    try:
        parsed = time.strptime(digits, formats[len(digits)])
    except ValueError:
        raise KeyOptionError(f"invalid expires time {text!r}") from None
    return float(calendar.timegm(parsed) if utc else time.mktime(parsed))
