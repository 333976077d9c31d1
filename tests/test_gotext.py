"""gotext.goQuote against what Go's strconv.Quote prints for the same input."""

from __future__ import annotations

import pytest

from coderagent.gotext import goExpand, goQuote

# (input, Go's strconv.Quote of it)
CASES = [
    ("hello", '"hello"'),
    ("", '""'),
    ("a b", '"a b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("a\x00b", '"a\\x00b"'),
    ("\x1b[0m", '"\\x1b[0m"'),
    ("\x7f", '"\\x7f"'),
    ("tab\there\nnew\r", '"tab\\there\\nnew\\r"'),
    ("\a\b\f\v", '"\\a\\b\\f\\v"'),
    ("\u00a0", '"\\u00a0"'),  # a non-ASCII space is not printable for Go
    ("\u200b\ufeff", '"\\u200b\\ufeff"'),
    ("\u2028", '"\\u2028"'),
    ("é中文", '"é中文"'),
    ("\U0001f600", '"\U0001f600"'),
    ("\U0010ffff", '"\\U0010ffff"'),
    (b"\xff", '"\\xff"'),
    (b"ok\xc3", '"ok\\xc3"'),  # a truncated sequence
    (b"\xed\xa0\x80", '"\\xed\\xa0\\x80"'),  # an encoded surrogate is invalid UTF-8
    ("/tmp/\udcff", '"/tmp/\\xff"'),  # an undecodable file name byte
]


@pytest.mark.parametrize(("text", "quoted"), CASES)
def test_go_quote(text: str | bytes, quoted: str) -> None:
    assert goQuote(text) == quoted


def test_long_text_with_escapes_is_quoted_whole() -> None:
    text = "a\x00" * 20_000
    assert goQuote(text) == '"' + "a\\x00" * 20_000 + '"'


def test_the_escape_table_stays_bounded() -> None:
    from coderagent import gotext

    goQuote("".join(chr(cp) for cp in range(0x4E00, 0x4E00 + 10_000)) + "\x00")
    assert len(gotext._ESCAPES) <= 4096


EXPANSIONS = [
    ("$A", "x"),
    ("${A}b", "xb"),
    ("$A-$B", "x-"),  # unset is empty
    ("$A_B", ""),  # the longest name: A_B
    ("a$", "a$"),  # a trailing $ stays
    ("$ x", "$ x"),  # so does one followed by no name
    ("$$", ""),  # $ is a one-character special name
    ("$1x", "x"),
    ("${!}", ""),
    ("${}x", "x"),  # bad syntax is eaten
    ("${A", "A"),  # an unterminated ${ is eaten, the rest stays
    ("\\$A", "\\x"),  # no escaping
    ("no dollars", "no dollars"),
    ("é$A中", "éx中"),
]


@pytest.mark.parametrize(("text", "expanded"), EXPANSIONS)
def test_go_expand(text: str, expanded: str) -> None:
    env = {"A": "x"}
    assert goExpand(text, lambda name: env.get(name, "")) == expanded
