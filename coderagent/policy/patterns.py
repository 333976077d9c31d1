"""OpenSSH's pattern matching, as ``match.c`` and ``addrmatch.c`` define it.

Used for ``from="…"`` in authorized_keys and the host globs of the policy
file, so that a pattern means here exactly what it means to sshd: ``*`` and
``?`` wildcards, comma-separated lists, ``!`` negation, and address/masklen
(CIDR) entries that must not have host bits set.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PatternError(ValueError):
    """A pattern that cannot be used (sshd refuses the key line too)."""


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    # Only * and ? are special to OpenSSH; fnmatch's [...] must stay literal.
    escaped = pattern.replace("[", "\0").replace("]", "\1")
    regex = fnmatch.translate(escaped).replace("\0", "\\[").replace("\1", "\\]")
    return re.compile(regex, re.DOTALL)


def matchPattern(text: str, pattern: str) -> bool:
    """``match_pattern``: the whole of ``text`` against ``*``/``?`` wildcards."""
    return _compiled(pattern).match(text) is not None


def parseNetwork(text: str) -> Network | None:
    """An address or address/masklen; ``None`` if ``text`` is not one.

    Raises :class:`PatternError` for a network with host bits set (``10.0.0.1/8``),
    which sshd calls an inconsistent mask length."""
    if "/" not in text:
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            return None
        raise PatternError(f"inconsistent mask length in {text!r}") from e


def matchAddressList(address: str, patterns: str) -> int:
    """``addr_match_list``: 1 a positive match, -1 a negated one, 0 none.

    Each comma-separated entry is CIDR-matched if it parses as an address or
    network, else wildcard-matched against the address text.  Raises
    :class:`PatternError` for an empty entry or an inconsistent mask.
    """
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(address)
    except ValueError:
        return 0
    result = 0
    for entry in patterns.split(","):
        negated = entry.startswith("!")
        if negated:
            entry = entry[1:]
        if not entry:
            raise PatternError("empty entry in address list")
        network = parseNetwork(entry)
        if network is not None:
            found = addr is not None and addr.version == network.version and addr in network
        else:
            found = matchPattern(address, entry)
        if found:
            if negated:
                return -1
            result = 1
    return result


def matchPatternList(text: str, patterns: str) -> int:
    """``match_pattern_list`` (lowercased): 1 positive, -1 negated, 0 none."""
    text = text.lower()
    positive = 0
    for entry in patterns.split(","):
        negated = entry.startswith("!")
        if negated:
            entry = entry[1:]
        if matchPattern(text, entry.lower()):
            if negated:
                return -1
            positive = 1
    return positive


def matchHostAndAddress(host: str, address: str, patterns: str) -> bool:
    """``match_host_and_ip``: may a client at ``address`` (named ``host``) use this key?

    With sshd's default ``UseDNS no`` the host name is the address itself.
    """
    ip = matchAddressList(address, patterns)
    if ip == -1:
        return False
    named = matchPatternList(host, patterns)
    if named == -1:
        return False
    return ip == 1 or named == 1
