"""Network addresses as upstream writes and reads them: Go's ``host:port``.

Upstream's options (``--prometheus-address 127.0.0.1:2112``), log lines and
errors use Go's ``net.JoinHostPort``/``net.SplitHostPort`` forms: an IPv6
literal is bracketed (``[::1]:22``), anything else is not.  Every place that
shows an address or reads one uses these functions, so they agree.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

#: What a log line shows for an address that is not known (disconnected, or not IP).
UNKNOWN = "?"


def joinHostPort(host: str, port: int | str) -> str:
    """Go's ``net.JoinHostPort``: ``host:port``, an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bracketHost(host: str) -> str:
    """The host part of a URL authority: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def _isPort(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None and int(text) <= 65535


def splitHostPort(text: str) -> tuple[str, int]:
    """Go's ``net.SplitHostPort`` with a port from 0 to 65535.

    The host may be empty (all interfaces) or an IPv6 literal in brackets;
    an unbracketed host may not contain a colon.  :class:`ValueError` says
    what is wrong.
    """
    if text.startswith("["):
        literal, closing, rest = text[1:].partition("]")
        if closing and rest.startswith(":") and _isPort(rest[1:]):
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                pass
            else:
                return literal, int(rest[1:])
    else:
        host, colon, port = text.rpartition(":")
        if colon and not any(c in host for c in ":[]") and _isPort(port):
            return host, int(port)
    raise ValueError(f"{text!r} is not host:port with a port from 0 to 65535")


def isLoopbackHost(host: str) -> bool:
    """Whether ``host`` (a name or an address literal) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describeAddress(address: Any) -> str:
    """An ``IAddress`` for log lines: ``host:port`` (IPv6 bracketed), a Unix
    socket's path, or ``?`` when there is none."""
    if address is None:
        return UNKNOWN
    host = getattr(address, "host", None)
    if host is not None:
        return joinHostPort(str(host), getattr(address, "port", UNKNOWN))
    name = getattr(address, "name", None)
    if name is None:
        return UNKNOWN
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def describePeer(transport: Any) -> str:
    """The remote end of ``transport`` (``?`` once it is gone)."""
    return describeAddress(transport.getPeer() if transport is not None else None)


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for a stream connection, in the system
    resolver's order and without repeats (blocking: call it in a thread).

    The forwarding policy decides on exactly these, and a forward connects only to
    the ones it allowed, so the policy explainer uses the same lookup.
    """
    found: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host or "localhost", port, 0, socket.SOCK_STREAM):
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found
