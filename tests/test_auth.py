"""Authorized-keys parsing: keys with options are refused, never half-honoured."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from coderagent.ssh.auth import AuthorizedKeysFile, parseAuthorizedKeys


def _public() -> str:
    return keys.Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH").decode()


def test_plain_keys_comments_and_blank_lines() -> None:
    a, b = _public(), _public()
    parsed = parseAuthorizedKeys(f"# comment\n\n{a} alice@host\n  {b}\n")
    assert [k.toString("OPENSSH").decode() for k in parsed.keys] == [a, b]
    assert parsed.refused == ()


def test_lines_with_options_are_refused_with_their_line_number() -> None:
    a = _public()
    text = f'{_public()}\nrestrict,command="echo a b, c" {a}\nno-pty {a}\n@cert-authority * {a}\n'
    parsed = parseAuthorizedKeys(text)
    assert len(parsed.keys) == 1
    assert parsed.refused == (
        "line 2: key options 'restrict,command=\"echo a b, c\"' are not supported; key refused",
        "line 3: key options 'no-pty' are not supported; key refused",
        "line 4: marker @cert-authority is not supported; key refused",
    )


def test_garbage_is_reported_not_raised() -> None:
    parsed = parseAuthorizedKeys("ssh-ed25519 AAAA!!notbase64\nhello\n")
    assert parsed.keys == ()
    assert parsed.refused[0].startswith("line 1: unreadable key")
    assert parsed.refused[1] == "line 2: not a public key"


def test_file_is_reread_so_revocation_takes_effect(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    a = _public()
    path.write_text(a + "\n")
    db = AuthorizedKeysFile(str(path))
    assert len(list(db.getAuthorizedKeys(b"anyone"))) == 1
    path.write_text("")
    assert list(db.getAuthorizedKeys(b"anyone")) == []
    path.unlink()
    assert list(db.getAuthorizedKeys(b"anyone")) == []
