"""Public-key authentication against one authorized-keys file, key options honoured.

Upstream's agent accepts any client (its tailnet is the access control); we
listen on a normal socket, so we authenticate with public keys only.  Any
username is accepted once the key is: sessions run as the agent's own user.

Key lines may carry OpenSSH's options (``restrict,permitopen="db:5432" ssh-ed25519 …``):
they are parsed with sshd's semantics (:mod:`coderagent.policy.keyoptions`); ``from=`` and
``expiry-time=`` are checked here, at login, and the rest travel with the login to the
:class:`~coderagent.policy.Policy`, which narrows what the key may do.  A line whose options
this agent cannot honour is refused with the option named, never granted more than its
owner wrote.  As in sshd, a key may appear on several lines: the first line whose key
matches and whose ``from=``/``expiry-time=`` allow this login is the one that applies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys, userauth
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from coderagent.policy.keyoptions import KeyOptionError, KeyOptions, parseKeyOptions

log = Logger()


def _isKeyType(word: str) -> bool:
    return word.startswith(("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-"))


def splitKeyLine(line: str) -> tuple[str, str]:
    """``(options, "keytype base64 comment")`` of a key line (options empty if none)."""
    if _isKeyType(line.split(None, 1)[0] if line.split() else ""):
        return "", line
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
class AuthorizedKey:
    """One usable line: the key, what its options allow, and where it is."""

    key: keys.Key
    options: KeyOptions
    line: int


@dataclass(frozen=True)
class ParsedKeys:
    """The usable lines of a file and a description of every refused line."""

    entries: tuple[AuthorizedKey, ...]
    refused: tuple[str, ...]

    @property
    def keys(self) -> tuple[keys.Key, ...]:
        return tuple(entry.key for entry in self.entries)


def parseAuthorizedKeys(text: str) -> ParsedKeys:
    """Parse authorized-keys text; pure, so it is tested without files."""
    good: list[AuthorizedKey] = []
    refused: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            refused.append(f"line {number}: marker {line.split()[0]} is not supported; key refused")
            continue
        optionsText, rest = splitKeyLine(line)
        if not rest:
            refused.append(f"line {number}: not a public key")
            continue
        try:
            options = parseKeyOptions(optionsText) if optionsText else KeyOptions()
        except KeyOptionError as e:
            refused.append(f"line {number}: {e}; key refused")
            continue
        if rest.split(None, 1)[0].endswith("-cert-v01@openssh.com"):
            refused.append(f"line {number}: certificates are not supported; key refused")
            continue
        try:
            key = keys.Key.fromString(rest.encode())
        except (keys.BadKeyError, ValueError, IndexError) as e:
            refused.append(f"line {number}: unreadable key ({e})")
            continue
        good.append(AuthorizedKey(key, options, number))
    return ParsedKeys(tuple(good), tuple(refused))


class KeyIdentity(bytes):
    """Who logged in: the name they gave (the avatar id cred expects, bytes), with the
    options of the line that let them in."""

    options: KeyOptions
    fingerprint: str

    def __new__(cls, username: bytes, options: KeyOptions, fingerprint: str) -> KeyIdentity:
        identity = super().__new__(cls, username)
        identity.options = options
        identity.fingerprint = fingerprint
        return identity


class AuthorizedKeysFile:
    """One authorized-keys file, re-read on every attempt.

    Re-reading means a key added or revoked takes effect on the next login,
    as with sshd.  Warnings about refused lines are logged once per change of
    the file's content, not once per login.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._warnedDigest: bytes | None = None

    def entries(self) -> tuple[AuthorizedKey, ...]:
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
            return ()
        parsed = parseAuthorizedKeys(data.decode("utf-8", "replace"))
        digest = hashlib.sha256(data).digest()
        if digest != self._warnedDigest:
            self._warnedDigest = digest
            for problem in parsed.refused:
                log.warn("{path} {problem}", path=self.path, problem=problem)
        return parsed.entries


@implementer(ICredentialsChecker)
class AuthorizedKeysChecker:
    """Public keys in an :class:`AuthorizedKeysFile`, with ``from=`` and ``expiry-time=``.

    Unlike Conch's checker, a key is only reported acceptable (PK_OK) if it is
    authorized for this login, as sshd answers.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, keyFile: AuthorizedKeysFile) -> None:
        self.keyFile = keyFile

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        return defer.execute(self._check, credentials)

    def _check(self, credentials: Any) -> bytes | tuple[()]:
        offered = keys.Key.fromString(credentials.blob)
        address = getattr(credentials, "peerAddress", None) or ""
        why = "key not authorized"
        for entry in self.keyFile.entries():
            if entry.key != offered:
                continue
            refusal = entry.options.usableFrom(address)
            if refusal is not None:
                why = f"{self.keyFile.path} line {entry.line}: {refusal}"
                log.warn(
                    "login with an authorized key refused for {address}: {why}",
                    address=address or "?",
                    why=why,
                )
                continue
            if not credentials.signature:
                raise ValidPublicKey()
            if not offered.verify(credentials.signature, credentials.sigData):
                raise UnauthorizedLogin("key signature invalid")
            return KeyIdentity(credentials.username, entry.options, offered.fingerprint())
        raise UnauthorizedLogin(why)


class PeerPortal:
    """A portal that tells the checker where the client is (for ``from=``)."""

    def __init__(self, portal: Portal, address: str) -> None:
        self.portal = portal
        self.address = address

    def login(self, credentials: Any, mind: object, *interfaces: Any) -> Deferred[Any]:
        credentials.peerAddress = self.address
        return self.portal.login(credentials, mind, *interfaces)

    def listCredentialsInterfaces(self) -> list[Any]:
        return list(self.portal.listCredentialsInterfaces())


def makePortal(realm: IRealm, authorizedKeysPath: str) -> Portal:
    """A portal whose only credential kind is an SSH public key."""
    return Portal(realm, [AuthorizedKeysChecker(AuthorizedKeysFile(authorizedKeysPath))])


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
        peer = self.transport.transport.getPeer() if self.transport.transport else None
        self.portal = PeerPortal(self.portal, str(getattr(peer, "host", "")))
