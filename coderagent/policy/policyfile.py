"""``--forwarding-policy-file``: TOML in, a :class:`PolicyFile` out, or every error with its line.

The format (documented with examples in the README)::

    mode = "enforce"            # or "audit": allow everything, log and count what would be refused

    [local_tcp]                 # ssh -L / -W
    default = "deny"
    [[local_tcp.rules]]
    name = "dev-server"         # optional; refusals name the rule
    action = "allow"
    host = "localhost"          # or a list; names and globs match the name asked for,
    ports = "3000-3999"         # addresses and networks the addresses connected to

    [reverse_tcp]               # ssh -R: bind = "loopback" | "any" | address | network | glob
    [local_unix]                # path = glob(s) on the normalised socket path
    [reverse_unix]
    [file_transfer]             # kind = "sftp" | "scp" | "rsync" | "nc" | "*"

A section left out allows everything (the ``--block-*`` flags still apply); a section given
must say its ``default``.  Unknown keys are errors, never ignored: a misspelt ``host`` must not
quietly mean "every host".
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from coderagent.policy.patterns import PatternError, parseNetwork
from coderagent.policy.rules import SECTIONS, Action, HostEntry, Ports, Rule, Section

Mode = Literal["enforce", "audit"]

#: What a rule of each section may say (besides ``name`` and ``action``).
_RULE_KEYS = {
    "local_tcp": {"host", "ports"},
    "reverse_tcp": {"bind", "ports"},
    "local_unix": {"path"},
    "reverse_unix": {"path"},
    "file_transfer": {"kind"},
}
_KINDS = frozenset({"sftp", "scp", "rsync", "nc", "*"})


class PolicyFileError(ValueError):
    """The file cannot be used; ``errors`` has one line per problem, with its line number."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class PolicyFile:
    """A loaded policy: a section per kind of request (the absent ones allow everything)."""

    mode: Mode = "enforce"
    sections: dict[str, Section] = field(default_factory=dict)
    #: sha256 of the file's bytes (for the info metric and reload detection).
    digest: str = ""

    def section(self, name: str) -> Section:
        return self.sections.get(name) or Section(name)


def loadPolicy(data: bytes) -> PolicyFile:
    """Parse a policy file's bytes; raises :class:`PolicyFileError` listing every problem."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise PolicyFileError([f"not UTF-8 text ({e})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyFileError([str(e)]) from None
    lines = _RuleLines(text)
    errors: list[str] = []
    mode = document.pop("mode", "enforce")
    if mode not in ("enforce", "audit"):
        errors.append(f'line {lines.key("mode")}: mode must be "enforce" or "audit", not {mode!r}')
        mode = "enforce"
    sections: dict[str, Section] = {}
    for name, body in document.items():
        if name not in SECTIONS:
            errors.append(
                f"line {lines.table(name)}: unknown section [{name}] "
                f"(sections: {', '.join(SECTIONS)})"
            )
            continue
        if not isinstance(body, dict):
            errors.append(f"line {lines.key(name)}: {name} must be a table")
            continue
        sections[name] = _section(name, body, lines, errors)
    if errors:
        raise PolicyFileError(errors)
    return PolicyFile(mode=mode, sections=sections, digest=digest)


def _section(name: str, body: dict[str, Any], lines: _RuleLines, errors: list[str]) -> Section:
    where = lines.table(name)
    unknown = set(body) - {"default", "rules"}
    for key in sorted(unknown):
        errors.append(f"line {where}: [{name}]: unknown key {key!r} (keys: default, rules)")
    default: Action = "deny"
    given = body.get("default")
    if given == "allow":
        default = "allow"
    elif given != "deny":
        errors.append(f'line {where}: [{name}]: default must be "allow" or "deny"')
    rules: list[Rule] = []
    raw = body.get("rules", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        errors.append(f"line {where}: [{name}]: rules must be [[{name}.rules]] tables")
        raw = []
    for index, item in enumerate(raw):
        line = lines.rule(name, index)
        before = len(errors)
        rule = _rule(name, index, item, line, errors)
        if len(errors) == before and rule is not None:
            rules.append(rule)
    return Section(name, default, tuple(rules))


def _rule(
    section: str, index: int, item: dict[str, Any], line: int, errors: list[str]
) -> Rule | None:
    here = f"line {line}: {section} rule {index + 1}"
    allowed = _RULE_KEYS[section] | {"name", "action"}
    for key in sorted(set(item) - allowed):
        errors.append(f"{here}: unknown key {key!r} (keys: {', '.join(sorted(allowed))})")
    action = item.get("action")
    if action not in ("allow", "deny"):
        errors.append(f'{here}: action must be "allow" or "deny"')
        return None
    name = item.get("name", "")
    if not isinstance(name, str):
        errors.append(f"{here}: name must be a string")
        return None
    try:
        if section in ("local_tcp", "reverse_tcp"):
            key = "host" if section == "local_tcp" else "bind"
            hosts = tuple(_host(h, bind=key == "bind") for h in _strings(item, key, "*"))
            ports = _ports(item.get("ports", "*"))
            return Rule(section, index, action, name, hosts=hosts, ports=ports, line=line)
        if section in ("local_unix", "reverse_unix"):
            paths = tuple(_strings(item, "path", None))
            return Rule(section, index, action, name, paths=paths, line=line)
        kinds = tuple(_strings(item, "kind", "*"))
        for kind in kinds:
            if kind not in _KINDS:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(sorted(_KINDS))}")
        return Rule(section, index, action, name, kinds=kinds, line=line)
    except ValueError as e:
        errors.append(f"{here}: {e}")
        return None


def _strings(item: dict[str, Any], key: str, default: str | None) -> list[str]:
    value = item.get(key, default)
    if value is None:
        raise ValueError(f"{key} is required")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{key} must be a non-empty string or a list of them")
    return values


def _host(text: str, bind: bool) -> HostEntry:
    if bind and text in ("loopback", "any"):
        return HostEntry(text, special=text)
    try:
        network = parseNetwork(text)
    except PatternError as e:
        raise ValueError(str(e)) from None
    if network is None and "/" in text:
        raise ValueError(f"{text!r} is not an address, a network or a host name")
    return HostEntry(text, network)


_PORT_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _ports(value: Any) -> Ports:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("ports must not be empty")
    ranges = []
    for v in values:
        if v == "*":
            return Ports.any()
        if isinstance(v, int) and not isinstance(v, bool):
            low = high = v
        elif isinstance(v, str) and (m := _PORT_RANGE.fullmatch(v)):
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        else:
            raise ValueError(f'ports: {v!r} is not a port, a range like "8000-8099" or "*"')
        if not 0 <= low <= high <= 65535:
            raise ValueError(f"ports: {v!r} is out of 0-65535 or backwards")
        ranges.append((low, high))
    return Ports(tuple(ranges))


class _RuleLines:
    """Where tables and keys start in the file, for error messages (tomllib keeps no
    positions): found in one pass over the lines."""

    _TABLE = re.compile(r"\[\s*([A-Za-z0-9_.-]+)\s*\]$")
    _ARRAY = re.compile(r"\[\[\s*([A-Za-z0-9_]+)\s*\.\s*rules\s*\]\]$")
    _KEY = re.compile(r"([A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self._tables: dict[str, int] = {}
        self._rules: dict[str, list[int]] = {}
        self._keys: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if m := self._ARRAY.match(line):
                self._rules.setdefault(m.group(1), []).append(number)
            elif m := self._TABLE.match(line):
                self._tables.setdefault(m.group(1), number)
            elif m := self._KEY.match(line):
                self._keys.setdefault(m.group(1), number)

    def table(self, name: str) -> int:
        return self._tables.get(name) or self.key(name)

    def rule(self, section: str, index: int) -> int:
        found = self._rules.get(section, [])
        return found[index] if index < len(found) else self.table(section)

    def key(self, name: str) -> int:
        return self._keys.get(name, 1)
