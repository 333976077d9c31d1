"""Authorized-keys parsing: options honoured as sshd does, or the line refused, never half."""

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


def test_options_are_read_and_what_cannot_be_honoured_is_refused_with_its_line() -> None:
    a = _public()
    text = (
        f'{_public()}\nrestrict,command="echo a b, c" {a}\nno-pty {a}\n'
        f"@cert-authority * {a}\n"
        f'tunnel="0" {a}\n'
    )
    parsed = parseAuthorizedKeys(text)
    assert [e.line for e in parsed.entries] == [1, 2, 3]
    restricted = parsed.entries[1].options
    assert restricted.command == "echo a b, c" and not restricted.portForwarding
    assert not parsed.entries[2].options.pty and parsed.entries[2].options.portForwarding
    assert not parsed.entries[0].options.restricted
    assert parsed.refused == (
        "line 4: marker @cert-authority is not supported; key refused",
        "line 5: option 'tunnel' is not supported by this agent; key refused",
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
    assert len(db.entries()) == 1
    path.write_text("")
    assert db.entries() == ()
    path.unlink()
    assert db.entries() == ()


def _credentials(private: keys.Key, signed: bool, address: str) -> object:
    from twisted.cred.credentials import SSHPrivateKey

    blob = private.public().blob()
    sigData = b"session-and-request"
    signature = private.sign(sigData) if signed else None
    credentials = SSHPrivateKey(b"alice", b"ssh-ed25519", blob, sigData, signature)
    credentials.peerAddress = address  # what PeerPortal sets
    return credentials


def _check(text: str, private: keys.Key, signed: bool, address: str) -> object:
    from twisted.internet.defer import Deferred

    from coderagent.ssh.auth import AuthorizedKeysChecker

    class Text(AuthorizedKeysFile):
        def entries(self):  # type: ignore[no-untyped-def]
            return parseAuthorizedKeys(text).entries

    d: Deferred[object] = AuthorizedKeysChecker(Text("authorized_keys")).requestAvatarId(
        _credentials(private, signed, address)
    )
    results: list[object] = []
    d.addBoth(results.append)
    return results[0]


def test_from_and_the_first_usable_line_decide_the_options() -> None:
    from twisted.conch.error import ValidPublicKey
    from twisted.cred.error import UnauthorizedLogin
    from twisted.python.failure import Failure

    from coderagent.ssh.auth import KeyIdentity

    private = keys.Key(ed25519.Ed25519PrivateKey.generate())
    public = private.public().toString("OPENSSH").decode()
    text = f'from="127.0.0.2",no-pty {public}\nfrom="127.0.0.0/8",permitopen="db:1" {public}\n'
    near = _check(text, private, True, "127.0.0.2")
    assert isinstance(near, KeyIdentity) and near == b"alice" and not near.options.pty
    far = _check(text, private, True, "127.0.0.9")
    assert isinstance(far, KeyIdentity) and far.options.pty and far.options.permitOpen
    outside = _check(text, private, True, "192.0.2.1")
    assert isinstance(outside, Failure) and outside.check(UnauthorizedLogin)
    query = _check(text, private, False, "127.0.0.2")  # no signature: is this key acceptable?
    assert isinstance(query, Failure) and query.check(ValidPublicKey)
    stranger = keys.Key(ed25519.Ed25519PrivateKey.generate())
    unknown = _check(text, stranger, False, "127.0.0.2")  # not even PK_OK for an unknown key
    assert isinstance(unknown, Failure) and unknown.check(UnauthorizedLogin)
    expired = _check(f'expiry-time="20000101" {public}\n', private, True, "127.0.0.2")
    assert isinstance(expired, Failure) and expired.check(UnauthorizedLogin)
