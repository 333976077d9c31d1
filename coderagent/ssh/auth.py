"""Public-key authentication against one authorized-keys file.

Upstream's agent accepts any client (its tailnet is the access control); we
listen on a normal socket, so we authenticate with public keys only.  Any
username is accepted once the key is: sessions run as the agent's own user.

Lines with OpenSSH options (``restrict,command="…" ssh-ed25519 …``) are
*refused*, not silently dropped and not half-honoured: such a line asks for a
restriction we do not enforce, so granting the key would grant more than its
owner wrote.  Each refused line is logged with its line number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.ssh import keys, userauth
from twisted.cred.portal import IRealm, Portal
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


def _isKeyType(word: str) -> bool:
    return word.startswith(("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-"))


def _splitOptions(line: str) -> tuple[str, str]:
    """Split ``options keytype base64…`` at the first blank outside quotes."""
    inQuote = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and inQuote:
            i += 2
            continue
        if c == '"':
            inQuote = not inQuote
        elif c in " \t" and not inQuote:
            return line[:i], line[i:].strip()
        i += 1
    return line, ""


@dataclass(frozen=True)
class ParsedKeys:
    """The usable keys of a file and a description of every refused line."""

    keys: tuple[keys.Key, ...]
    refused: tuple[str, ...]


def parseAuthorizedKeys(text: str) -> ParsedKeys:
    """Parse authorized-keys text; pure, so it is tested without files."""
    good: list[keys.Key] = []
    refused: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            refused.append(f"line {number}: marker {line.split()[0]} is not supported; key refused")
            continue
        first = line.split(None, 1)[0]
        if not _isKeyType(first):
            options, rest = _splitOptions(line)
            refused.append(
                f"line {number}: key options {options!r} are not supported; key refused"
                if rest
                else f"line {number}: not a public key"
            )
            continue
        if first.endswith("-cert-v01@openssh.com"):
            refused.append(f"line {number}: certificates are not supported; key refused")
            continue
        try:
            good.append(keys.Key.fromString(line.encode()))
        except (keys.BadKeyError, ValueError, IndexError) as e:
            refused.append(f"line {number}: unreadable key ({e})")
    return ParsedKeys(tuple(good), tuple(refused))


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """An ``IAuthorizedKeysDB`` over one file, re-read on every attempt.

    Re-reading means a key added or revoked takes effect on the next login,
    as with sshd.  Warnings about refused lines are logged once per change of
    the file's content, not once per login.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._warnedDigest: bytes | None = None

    def getAuthorizedKeys(self, username: bytes) -> Iterator[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as e:
            if self._warnedDigest != b"missing":
                log.warn(
                    "cannot read authorized keys {path}: {error}; no key can log in",
                    path=self.path,
                    error=e.strerror,
                )
                self._warnedDigest = b"missing"
            return iter(())
        parsed = parseAuthorizedKeys(data.decode("utf-8", "replace"))
        digest = hashlib.sha256(data).digest()
        if digest != self._warnedDigest:
            self._warnedDigest = digest
            for problem in parsed.refused:
                log.warn("{path} {problem}", path=self.path, problem=problem)
        return iter(parsed.keys)


def makePortal(realm: IRealm, authorizedKeysPath: str) -> Portal:
    """A portal whose only credential kind is an SSH public key."""
    return Portal(realm, [SSHPublicKeyChecker(AuthorizedKeysFile(authorizedKeysPath))])


class AgentUserAuthServer(userauth.SSHUserAuthServer):
    """``ssh-userauth`` with sshd-like bounds taken from the factory.

    ``attemptsBeforeDisconnect`` mirrors sshd's MaxAuthTries; the login grace
    timer itself lives in the transport so it also covers clients that never
    finish key exchange.
    """

    def serviceStarted(self) -> None:
        assert self.transport is not None
        factory = self.transport.factory
        # Conch disconnects when failures *exceed* this; sshd when they
        # *reach* MaxAuthTries.  Match sshd.
        self.attemptsBeforeDisconnect = factory.config.maxAuthTries - 1
        self.loginTimeout = factory.config.loginGraceTime
        super().serviceStarted()
