"""Resolve how the agent authenticates to coderd, with upstream's error texts.

Resolution happens once at start-up so that a misconfigured agent stops with
one clear line instead of retrying a doomed connection forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coderagent.gotext import goQuote


class CredentialsError(Exception):
    """The auth options cannot work; the message is shown to the operator as is."""


@dataclass(frozen=True)
class Credentials:
    """What the coderd client needs to authenticate."""

    url: str
    token: str

    def __repr__(self) -> str:  # never let a token reach a log line
        return f"Credentials(url={self.url!r}, token=<redacted>)"


def resolveCredentials(*, auth: str, url: str, token: str, tokenFile: str) -> Credentials:
    """Apply upstream's rules: token auth only here, URL required, token or token file."""
    if auth != "token":
        raise CredentialsError(
            f"agent auth type {auth!r} is not supported by coderagent yet (only 'token')"
        )
    if not url:
        raise CredentialsError("CODER_AGENT_URL must be set")
    if not token and not tokenFile:
        raise CredentialsError("Either CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set")
    if not token:
        try:
            with open(tokenFile, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CredentialsError(
                f"read token file {goQuote(tokenFile)}: {_goPathError(e, tokenFile)}"
            ) from e
        if not token:
            raise CredentialsError(
                "CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set for token auth"
            )
    return Credentials(url=url, token=token)


def _goPathError(error: OSError, path: str) -> str:
    """``os.ReadFile``'s error as Go prints it: ``open <path>: <errno text>``.

    Go opens a directory without complaint and fails on the read instead.
    """
    op = "read" if isinstance(error, IsADirectoryError) else "open"
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return f"{op} {path}: {reason}"
