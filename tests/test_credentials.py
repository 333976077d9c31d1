"""How the agent authenticates to coderd: token or token file, with upstream's error texts.

The messages are the ones upstream's ``coder agent`` prints when it builds its
client; a missing or unreadable token stops the agent at start-up with
exactly that line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coderagent.coderd.credentials import Credentials, CredentialsError, resolveCredentials

URL = "https://coder.example.com"


def resolve(**kw: str) -> Credentials:
    args = {"auth": "token", "url": URL, "token": "", "tokenFile": "", **kw}
    return resolveCredentials(**args)


def refusal(**kw: str) -> str:
    with pytest.raises(CredentialsError) as caught:
        resolve(**kw)
    return str(caught.value)


def test_a_token_given_directly_is_used_as_is() -> None:
    # Only a token read from a file is trimmed (upstream's strings.TrimSpace).
    assert resolve(token=" tok \n") == Credentials(url=URL, token=" tok \n")


def test_a_given_token_wins_and_the_token_file_is_not_read(tmp_path: Path) -> None:
    missing = tmp_path / "never-read"
    assert resolve(token="direct", tokenFile=str(missing)) == Credentials(URL, "direct")


def test_the_token_file_is_read_and_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\t s3cret-token \r\n\n")
    assert resolve(tokenFile=str(path)) == Credentials(url=URL, token="s3cret-token")


def test_a_token_file_of_whitespace_counts_as_no_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(" \n\t\n")
    assert refusal(tokenFile=str(path)) == (
        "CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set for token auth"
    )


def test_neither_token_nor_token_file() -> None:
    assert refusal() == "Either CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set"


def test_no_url() -> None:
    assert refusal(url="", token="tok") == "CODER_AGENT_URL must be set"


def test_a_missing_token_file_reads_as_gos_error(tmp_path: Path) -> None:
    path = tmp_path / "no such token"
    # Go: xerrors.Errorf("read token file %q: %w", path, err) around os.ReadFile's PathError.
    assert refusal(tokenFile=str(path)) == (
        f'read token file "{path}": open {path}: no such file or directory'
    )


def test_a_directory_as_token_file_fails_on_read_as_in_go(tmp_path: Path) -> None:
    # Go opens a directory fine; it is the read that fails.
    assert refusal(tokenFile=str(tmp_path)) == (
        f'read token file "{tmp_path}": read {tmp_path}: is a directory'
    )


def test_a_token_file_under_a_file_is_not_a_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("tok")
    path = plain / "token"
    assert refusal(tokenFile=str(path)) == (
        f'read token file "{path}": open {path}: not a directory'
    )


def test_a_path_with_a_quote_is_quoted_as_go_does(tmp_path: Path) -> None:
    path = tmp_path / 'a"b\tc'
    assert refusal(tokenFile=str(path)) == (
        f'read token file "{tmp_path}/a\\"b\\tc": open {path}: no such file or directory'
    )


@pytest.mark.parametrize(
    "auth", ["google-instance-identity", "aws-instance-identity", "azure-instance-identity"]
)
def test_instance_identity_auth_is_refused(auth: str) -> None:
    assert refusal(auth=auth, token="tok") == (
        f"agent auth type {auth!r} is not supported by coderagent yet (only 'token')"
    )


def test_the_token_never_shows_in_repr_or_str() -> None:
    credentials = resolve(token="s3cret")
    assert repr(credentials) == f"Credentials(url={URL!r}, token=<redacted>)"
    assert str(credentials) == repr(credentials)
    assert "s3cret" not in f"{credentials} {[credentials]}"
