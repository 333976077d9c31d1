"""The forwarding policy's rules: what each section matches, first match wins.

Five sections, one per kind of request: ``local_tcp`` (``ssh -L``/``-W`` to a host and port),
``reverse_tcp`` (``ssh -R``: a bind address and port), ``local_unix`` and ``reverse_unix``
(socket paths), and ``file_transfer``.  Each is a list of rules and a default; the first rule
that matches decides, else the default.  Matching:

* a host entry that is an address or a network (``10.0.0.0/8``, ``::1``) matches the
  *addresses* a request would connect to; any other entry is a glob (``*``, ``?``;
  case-insensitive) on the *name* the client asked for.  The agent resolves a name first,
  decides for each address, and connects only to an address whose first matching rule
  allows it, so a deny-by-network rule placed before a name rule holds whatever the name
  resolves to;
* a bind entry is ``loopback``, ``any`` (all interfaces), an address or network, or a glob;
* ports are a number, a range ``"8000-8099"`` or ``"*"``, or a list of them;
* a path entry is a glob on the normalised path (``..`` removed, symlinks in its directory
  resolved), where ``*`` also matches ``/``;
* a file-transfer rule matches a ``kind``: ``sftp`` (the subsystem) or the name of a transfer
  command (``scp``, ``rsync``, ``nc``, ``sftp``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from coderagent.policy.patterns import Network, matchPattern

Action = Literal["allow", "deny"]
SECTIONS = ("local_tcp", "reverse_tcp", "local_unix", "reverse_unix", "file_transfer")

_LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
#: Bind addresses that mean "every interface", as OpenSSH reads them.
ANY_ADDRESSES = frozenset({"", "*", "0.0.0.0", "::"})  # noqa: S104 - names, not binds


@dataclass(frozen=True)
class Ports:
    """A set of ports: ranges, inclusive."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.ranges)

    @property
    def everything(self) -> bool:
        return self.ranges == ((0, 65535),)

    @classmethod
    def any(cls) -> Ports:
        return cls(((0, 65535),))


@dataclass(frozen=True)
class Address:
    """A request's address, parsed once per decision (version 0: not an address)."""

    version: int
    value: int

    @classmethod
    def of(cls, text: str) -> Address:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return cls(0, 0)
        return cls(addr.version, int(addr))


def _asMask(network: Network) -> tuple[int, int, int]:
    return network.version, int(network.network_address), int(network.netmask)


_LOOPBACK_MASKS = tuple(_asMask(n) for n in _LOOPBACK)


@dataclass(frozen=True)
class HostEntry:
    """One entry of a ``host`` or ``bind`` list."""

    text: str
    network: Network | None = None
    #: ``loopback`` / ``any`` (bind entries only).
    special: str = ""

    def __post_init__(self) -> None:
        # Matching is on every forward: keep it to integer and string operations.
        masks = _LOOPBACK_MASKS if self.special == "loopback" else ()
        if self.network is not None:
            masks = (_asMask(self.network),)
        object.__setattr__(self, "_masks", masks)
        lowered = self.text.lower()
        plain = self.network is None and not self.special
        wild = any(c in lowered for c in "*?")
        object.__setattr__(self, "_exact", lowered if plain and not wild else None)
        object.__setattr__(self, "_glob", lowered if plain and wild else None)

    def matchesName(self, name: str) -> bool:
        """``name`` lowercased."""
        exact: str | None = self._exact  # type: ignore[attr-defined]
        if exact is not None:
            return name == exact
        glob: str | None = self._glob  # type: ignore[attr-defined]
        return glob is not None and matchPattern(name, glob)

    def matchesAddress(self, address: Address) -> bool:
        masks: tuple[tuple[int, int, int], ...] = self._masks  # type: ignore[attr-defined]
        for version, network, mask in masks:
            if address.version == version and address.value & mask == network:
                return True
        return False


@dataclass(frozen=True)
class Rule:
    """One rule of one section."""

    section: str
    index: int
    action: Action
    name: str = ""
    hosts: tuple[HostEntry, ...] = ()
    ports: Ports = field(default_factory=Ports.any)
    paths: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    #: The line of the policy file where the rule starts (0: not from a file).
    line: int = 0

    @property
    def label(self) -> str:
        """How refusals name the rule (log lines, the metric's ``rule`` label)."""
        return self.name or f"{self.section}[{self.index}]"

    def matchesTCP(self, name: str, address: Address) -> bool:
        """The port is already known to match (see :meth:`Section.candidates`)."""
        return any(h.matchesName(name) or h.matchesAddress(address) for h in self.hosts)

    def matchesBind(self, bind: str, address: Address) -> bool:
        for h in self.hosts:
            if h.special == "any":
                if bind in ANY_ADDRESSES:
                    return True
            elif h.special == "loopback":
                if bind == "localhost" or h.matchesAddress(address):
                    return True
            elif h.matchesName(bind) or h.matchesAddress(address):
                return True
        return False

    def matchesPath(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.paths)

    def matchesKind(self, kind: str) -> bool:
        return "*" in self.kinds or kind in self.kinds


@dataclass(frozen=True)
class Section:
    """The rules of one kind of request, and what applies when none matches."""

    name: str
    default: Action = "allow"
    rules: tuple[Rule, ...] = ()

    @property
    def defaultLabel(self) -> str:
        return f"{self.name} default"

    def candidates(self, port: int) -> tuple[Rule, ...]:
        """The rules whose ports include ``port``, in order (cached per port)."""
        cache: dict[int, tuple[Rule, ...]] = self.__dict__.setdefault("_byPort", {})
        found = cache.get(port)
        if found is None:
            found = tuple(r for r in self.rules if port in r.ports)
            if len(cache) >= 4096:
                cache.clear()
            cache[port] = found
        return found


@dataclass(frozen=True)
class Verdict:
    """What a section says about one request: allowed or not, and which rule decided."""

    allowed: bool
    rule: str
    #: The rule's line in the policy file (0 for a default or no file).
    line: int = 0


def decide(section: Section, rule: Rule | None) -> Verdict:
    """The rule that matched first, else the section's default."""
    if rule is not None:
        return Verdict(rule.action == "allow", rule.label, rule.line)
    return Verdict(section.default == "allow", section.defaultLabel)


def firstTCP(section: Section, name: str, address: str, port: int) -> Verdict:
    """``name`` as the client wrote it, ``address`` one it resolves to."""
    lowered, parsed = name.lower(), Address.of(address)
    rules = section.candidates(port)
    return decide(section, next((r for r in rules if r.matchesTCP(lowered, parsed)), None))


def firstBind(section: Section, bind: str, port: int) -> Verdict:
    lowered, parsed = bind.lower(), Address.of(bind)
    rules = section.candidates(port)
    return decide(section, next((r for r in rules if r.matchesBind(lowered, parsed)), None))


def firstPath(section: Section, path: str) -> Verdict:
    return decide(section, next((r for r in section.rules if r.matchesPath(path)), None))


def firstKind(section: Section, kind: str) -> Verdict:
    return decide(section, next((r for r in section.rules if r.matchesKind(kind)), None))
