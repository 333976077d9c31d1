# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""--agent-header-command: a real ``sh -c`` process, upstream's error texts."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import reactor

from coderagent.coderd.headers import (
    HeaderCommandError,
    dialHeaders,
    parseHeaderLines,
    runHeaderCommand,
    validHeaderName,
    validHeaderValue,
)

URL = "https://coder.example.com"


def run(command: str) -> object:
    return runHeaderCommand(reactor, command, URL, {"PATH": os.environ["PATH"], "KEEP": "k"})


@pytest_twisted.ensureDeferred
async def test_each_line_is_a_header_and_coder_url_is_set() -> None:
    headers = await run(
        'echo "X-Url=$CODER_URL"; echo "X-Keep=$KEEP"; echo "X-Eq=a=b"; echo oops >&2'
    )
    assert headers == [("X-Url", URL), ("X-Keep", "k"), ("X-Eq", "a=b")]


@pytest_twisted.ensureDeferred
async def test_a_line_without_equals_is_upstreams_error() -> None:
    with pytest.raises(HeaderCommandError) as e:
        await run("echo X-Good=1; echo 'Bad: colon'")
    assert str(e.value) == 'split header "Bad: colon" had less than two parts'


@pytest_twisted.ensureDeferred
async def test_a_failing_command_names_the_command_and_status() -> None:
    with pytest.raises(HeaderCommandError) as e:
        await run("echo X-A=1; exit 3")
    assert str(e.value) == "failed to run [sh -c echo X-A=1; exit 3]: exit status 3"
    with pytest.raises(HeaderCommandError) as e:
        await run("kill -TERM $$")
    assert str(e.value) == "failed to run [sh -c kill -TERM $$]: signal: terminated"


def test_header_lines_that_could_not_be_sent_are_refused() -> None:
    assert parseHeaderLines("A=1\nB=\n") == [("A", "1"), ("B", "")]
    with pytest.raises(HeaderCommandError, match="split header"):
        parseHeaderLines("A=1\n\n")
    with pytest.raises(HeaderCommandError, match="not a valid HTTP header"):
        parseHeaderLines("Bad Name=1\n")


#: Every ASCII character httpguts.ValidHeaderFieldName accepts (RFC 7230 tchar).
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def test_header_names_are_what_gos_net_http_sends() -> None:
    assert validHeaderName(TCHAR)
    assert [chr(c) for c in range(128) if validHeaderName(chr(c))] == sorted(TCHAR)
    assert not validHeaderName("")
    for name in ("X Y", "X:Y", "X(Y)", "X/Y", "X=Y", 'X"Y', "Ünicode", "X\nY", "X\0"):
        assert not validHeaderName(name), name


def test_header_values_are_what_gos_net_http_sends() -> None:
    assert validHeaderValue("")
    assert validHeaderValue("a b\tc \"quoted\" (x) = y; é ✓")
    refused = [c for c in range(256) if not validHeaderValue(chr(c))]
    assert refused == [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]


def test_header_lines_end_at_newline_only_as_go_reads_them() -> None:
    assert parseHeaderLines("A=1\r\nB=2") == [("A", "1"), ("B", "2")]
    assert parseHeaderLines("") == []
    with pytest.raises(HeaderCommandError) as e:
        parseHeaderLines("A=1\x0cB=2\n")  # one line to Go: a form feed in the value
    assert str(e.value) == 'header "A=1\\fB=2" is not a valid HTTP header'
    with pytest.raises(HeaderCommandError) as e:
        parseHeaderLines("X(Y)=1\n")
    assert str(e.value) == 'header "X(Y)=1" is not a valid HTTP header'


def test_the_token_goes_in_the_cookie_and_the_header() -> None:
    assert dialHeaders("t0k", [("X-A", "1")]) == [
        (b"X-A", b"1"),
        (b"Coder-Session-Token", b"t0k"),
        (b"Cookie", b"coder_session_token=t0k"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_command_that_hangs_is_killed_after_the_timeout() -> None:
    env = {"PATH": os.environ["PATH"]}
    with pytest.raises(HeaderCommandError) as e:
        await runHeaderCommand(reactor, "sleep 30", URL, env, timeout=0.2)
    assert str(e.value) == "failed to run [sh -c sleep 30]: timed out after 0.2s"
