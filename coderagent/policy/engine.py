"""The one Policy object: every forward, file transfer, PTY and command the agent serves.

Three layers decide, and each can only narrow what the one above allows:

1. the ``--block-*`` flags (upstream's): the hard switch, checked before anything is parsed;
2. the policy file (``--forwarding-policy-file``): rules per kind of request, first match
   wins, reloadable while the agent runs;
3. the options of the key the client logged in with (``restrict``, ``permitopen=``, ...).

Handlers ask and act on the :class:`Decision`; they never look at flags, rules or key
options themselves.  Every refusal names what decided it (``rule``), which the log line, the
metric and, where the protocol carries text, the client's error show.  In ``audit`` mode the
policy file refuses nothing: what it would refuse is allowed, marked ``wouldRefuse``, logged and
counted, so a team can try a policy before enforcing it (the flags and key options still apply).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from coderagent.netaddr import joinHostPort
from coderagent.policy.keyoptions import KeyOptions
from coderagent.policy.policyfile import PolicyFile
from coderagent.policy.rules import Verdict, firstBind, firstKind, firstPath, firstTCP

#: Base names of commands that move files, as upstream blocks them.
BLOCKED_FILE_TRANSFER_COMMANDS: frozenset[str] = frozenset({"nc", "rsync", "scp", "sftp"})

#: What an exec of a blocked command receives on stdout.  The leading 0x02 is
#: scp's "fatal error" status byte, so an scp client prints the text and stops.
FILE_TRANSFER_BLOCKED_MESSAGE = b"\x02File transfer has been disabled.\n"

#: Exit status of a refused transfer (upstream's BlockedFileTransferErrorCode).
FILE_TRANSFER_BLOCKED_EXIT_STATUS = 65

#: The ``rule`` of refusals by a flag or by the key's options.
FLAG_LOCAL = "--block-local-port-forwarding"
FLAG_REVERSE = "--block-reverse-port-forwarding"
FLAG_FILE_TRANSFER = "--block-file-transfer"
KEY_OPTIONS = "authorized_keys options"


@dataclass(frozen=True)
class Decision:
    """The answer to one question put to the policy."""

    allowed: bool
    reason: str = ""
    #: What decided a refusal (a flag, a rule's name, a section's default, the key's options).
    rule: str = ""
    #: Allowed only because the policy file is in audit mode.
    wouldRefuse: bool = False


ALLOW = Decision(True)


@dataclass(frozen=True)
class TCPDecision:
    """A local TCP forward: the addresses that may be connected to, in the resolver's order."""

    decision: Decision
    addresses: tuple[str, ...]


class Policy:
    """Decides every forward and every file transfer the agent serves.

    ``transport`` is ``"tcp"`` or ``"unix"``.  The flag refusals' reasons are
    upstream's texts, which a refusal puts on the wire.
    """

    def __init__(
        self,
        *,
        blockFileTransfer: bool = False,
        blockLocalPortForwarding: bool = False,
        blockReversePortForwarding: bool = False,
        rules: PolicyFile | None = None,
    ) -> None:
        self.blockFileTransfer = blockFileTransfer
        self.blockLocalPortForwarding = blockLocalPortForwarding
        self.blockReversePortForwarding = blockReversePortForwarding
        #: The policy file in force (replaced as a whole on reload).
        self.rules = rules or PolicyFile()

    # -- the hard switch, before anything is parsed -------------------------------

    def allowLocalForward(self, transport: str, target: str) -> Decision:
        """May a client open a connection from here (``ssh -L``/``-W``) at all?"""
        if self.blockLocalPortForwarding:
            reason = "port forwarding is disabled"
            if transport == "unix":
                reason = "local port forwarding is disabled"
            return Decision(False, reason, FLAG_LOCAL)
        return ALLOW

    def allowReverseForward(self, transport: str, target: str) -> Decision:
        """May a client make us listen and tunnel back to it (``ssh -R``) at all?"""
        if self.blockReversePortForwarding:
            return Decision(False, "port forwarding is disabled", FLAG_REVERSE)
        return ALLOW

    # -- each request, once it is parsed --------------------------------------------

    def localTCP(
        self, host: str, port: int, addresses: Sequence[str], key: KeyOptions | None = None
    ) -> TCPDecision:
        """``ssh -L`` to ``host:port``, which resolves to ``addresses``.

        Each address is decided on its own (the name the client asked for and
        the address); the forward may only connect to those allowed.
        """
        flag = self.allowLocalForward("tcp", host)
        if not flag.allowed:
            return TCPDecision(flag, ())
        refused = self._key(key, lambda k: k.portForwarding and k.allowsOpen(host, port))
        if refused is not None:
            return TCPDecision(refused, ())
        section = self.rules.section("local_tcp")
        allowed: list[str] = []
        first: Verdict | None = None
        for address in addresses:
            verdict = firstTCP(section, host, address, port)
            if verdict.allowed:
                allowed.append(address)
            elif first is None:
                first = verdict
        if allowed or first is None:
            return TCPDecision(ALLOW, tuple(allowed))
        decision = self._file(first, f"forwarding to {joinHostPort(host, port)}")
        return TCPDecision(decision, tuple(addresses) if decision.allowed else ())

    def reverseTCP(self, bind: str, port: int, key: KeyOptions | None = None) -> Decision:
        """``ssh -R`` asking us to listen on ``bind:port``."""
        flag = self.allowReverseForward("tcp", bind)
        if not flag.allowed:
            return flag
        refused = self._key(key, lambda k: k.portForwarding and k.allowsListen(bind, port))
        if refused is not None:
            return refused
        verdict = firstBind(self.rules.section("reverse_tcp"), bind, port)
        return self._file(verdict, f"listening on {joinHostPort(bind, port)}")

    def localUnix(self, path: str, key: KeyOptions | None = None) -> Decision:
        """``ssh -L`` to the Unix socket ``path`` (normalised: see :func:`normalisePath`)."""
        flag = self.allowLocalForward("unix", path)
        if not flag.allowed:
            return flag
        refused = self._key(key, lambda k: k.portForwarding)
        if refused is not None:
            return refused
        verdict = firstPath(self.rules.section("local_unix"), path)
        return self._file(verdict, f"forwarding to {path}")

    def reverseUnix(self, path: str, key: KeyOptions | None = None) -> Decision:
        """``ssh -R`` asking us to listen on the Unix socket ``path`` (normalised)."""
        flag = self.allowReverseForward("unix", path)
        if not flag.allowed:
            return flag
        refused = self._key(key, lambda k: k.portForwarding)
        if refused is not None:
            return refused
        verdict = firstPath(self.rules.section("reverse_unix"), path)
        return self._file(verdict, f"listening on {path}")

    def allowSubsystem(self, name: str) -> Decision:
        """May a session start subsystem ``name``?  Only sftp is a transfer."""
        if name != "sftp":
            return ALLOW
        return self._transfer("sftp")

    def allowCommand(self, command: str | None) -> Decision:
        """May a session run ``command`` (``None`` or empty: the login shell)?

        Matches upstream: split the command shell-style and refuse it when the
        base name of the first word is a known transfer tool.  ``bash -c scp``
        is deliberately *not* refused: this is a "do not trespass" sign, not a
        sandbox, and the docs say so.
        """
        if not command:
            return ALLOW
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        tool = os.path.basename(words[0]) if words else ""
        if tool not in BLOCKED_FILE_TRANSFER_COMMANDS:
            return ALLOW
        return self._transfer(tool)

    def allowPty(self, key: KeyOptions | None) -> Decision:
        """May this session have a terminal (``no-pty`` / ``restrict`` say not)?"""
        return self._key(key, lambda k: k.pty) or ALLOW

    def sessionCommand(
        self, requested: str | None, key: KeyOptions | None
    ) -> tuple[str | None, str | None]:
        """What a session runs, and ``SSH_ORIGINAL_COMMAND`` when ``command=`` forces it."""
        if key is None or key.command is None:
            return requested, None
        return key.command, requested

    # -- the layers ---------------------------------------------------------------------

    def _transfer(self, kind: str) -> Decision:
        if self.blockFileTransfer:
            return Decision(False, "file transfer blocked", FLAG_FILE_TRANSFER)
        verdict = firstKind(self.rules.section("file_transfer"), kind)
        decision = self._file(verdict, f"{kind} file transfer")
        if decision.allowed:
            return decision
        return Decision(False, "file transfer blocked", decision.rule)

    @staticmethod
    def _key(key: KeyOptions | None, allows: Callable[[KeyOptions], bool]) -> Decision | None:
        if key is None or not key.restricted:
            return None
        if allows(key):
            return None
        return Decision(False, f"refused by the key's options ({key.text})", KEY_OPTIONS)

    def _file(self, verdict: Verdict, what: str) -> Decision:
        if verdict.allowed:
            return ALLOW
        reason = f"{what} refused by policy rule {verdict.rule!r}"
        if self.rules.mode == "audit":
            return Decision(True, reason, verdict.rule, wouldRefuse=True)
        return Decision(False, reason, verdict.rule)


def normalisePath(path: str, cwd: str = "/") -> str:
    """A socket path as decided and as used: absolute, ``..`` removed, symlinks in its
    directory resolved (the socket itself may not exist yet)."""
    absolute = os.path.normpath(os.path.join(cwd, path))
    directory, name = os.path.split(absolute)
    return os.path.join(os.path.realpath(directory), name)
