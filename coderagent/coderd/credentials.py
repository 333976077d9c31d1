"""Resolve how the agent authenticates to coderd, with upstream's error texts.

The options are checked when the agent is built and the token file is read
when it starts, each once, so that a misconfigured agent stops with one
clear line instead of retrying a doomed connection forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coderagent.gotext import goQuote


class CredentialsError(Exception):
    """The auth options cannot work; the message is shown to the operator as is."""


@dataclass(frozen=True)
class Credentials:
    """What the coderd client needs to authenticate: the URL and a token, given or in a file."""

    url: str
    token: str
    tokenFile: str = ""

    def __repr__(self) -> str:  # never let a token reach a log line
        shownFile = f", tokenFile={self.tokenFile!r}" if self.tokenFile else ""
        return f"Credentials(url={self.url!r}, token=<redacted>{shownFile})"

    def readToken(self) -> str:
        """The token: the one given, or the token file's content, trimmed (upstream's rule)."""
        if self.token:
            return self.token
        try:
            with open(self.tokenFile, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CredentialsError(
                f"read token file {goQuote(self.tokenFile)}: {_goPathError(e, self.tokenFile)}"
            ) from e
        if not token:
            raise CredentialsError(
                "CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set for token auth"
            )
        return token


def checkCredentials(*, auth: str, url: str, token: str, tokenFile: str) -> Credentials:
    """Upstream's rules, without reading anything: token auth only here, a URL,
    a token or a token file (read later, by :meth:`Credentials.readToken`)."""
    if auth != "token":
        raise CredentialsError(
            f"agent auth type {auth!r} is not supported by coderagent yet (only 'token')"
        )
    if not url:
        raise CredentialsError("CODER_AGENT_URL must be set")
    if not token and not tokenFile:
        raise CredentialsError("Either CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set")
    return Credentials(url=url, token=token, tokenFile=tokenFile)


def resolveCredentials(*, auth: str, url: str, token: str, tokenFile: str) -> Credentials:
    """:func:`checkCredentials`, and the token read now."""
    checked = checkCredentials(auth=auth, url=url, token=token, tokenFile=tokenFile)
    return Credentials(url=checked.url, token=checked.readToken())


def _goPathError(error: OSError, path: str) -> str:
    """``os.ReadFile``'s error as Go prints it: ``open <path>: <errno text>``.

    Go opens a directory without complaint and fails on the read instead.
    """
    op = "read" if isinstance(error, IsADirectoryError) else "open"
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return f"{op} {path}: {reason}"
