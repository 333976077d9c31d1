"""Go's host:port, as every option, log line and error of the agent writes and reads it."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from coderagent.netaddr import (
    bracketHost,
    describeAddress,
    describePeer,
    isLoopbackHost,
    joinHostPort,
    splitHostPort,
)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("127.0.0.1:2112", ("127.0.0.1", 2112)),
        (":6060", ("", 6060)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:22", ("::1", 22)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),  # a zone, as Go accepts
        ("example.com:65535", ("example.com", 65535)),
    ],
)
def test_split(text: str, parts: tuple[str, int]) -> None:
    assert splitHostPort(text) == parts
    assert splitHostPort(joinHostPort(*parts)) == parts


@pytest.mark.parametrize(
    "text", ["", "2112", "::1:22", "[::1]", "[::1]22", "host:65536", "host:-1", "[x]:1", "a:b"]
)
def test_split_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        splitHostPort(text)


def test_join_and_bracket() -> None:
    assert joinHostPort("::1", 22) == "[::1]:22"
    assert joinHostPort("10.0.0.1", "80") == "10.0.0.1:80"
    assert bracketHost("::1") == "[::1]" and bracketHost("coder.example") == "coder.example"


def test_loopback() -> None:
    assert isLoopbackHost("127.0.0.2") and isLoopbackHost("::1") and isLoopbackHost("localhost")
    assert not isLoopbackHost("0.0.0.0") and not isLoopbackHost("") and not isLoopbackHost("x")


def test_describe() -> None:
    assert describeAddress(IPv4Address("TCP", "10.1.2.3", 5)) == "10.1.2.3:5"
    assert describeAddress(IPv6Address("TCP", "::1", 22)) == "[::1]:22"
    assert describeAddress(UNIXAddress(b"/run/a.sock")) == "/run/a.sock"
    assert describeAddress(None) == "?"

    class Gone:
        pass

    assert describePeer(None) == "?"
    assert describeAddress(Gone()) == "?"
