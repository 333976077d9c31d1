"""What the agent allows: every forward and every file transfer.

This is the only module that reads the ``--block-*`` options.  Handlers ask a
:class:`Policy` and act on the :class:`Decision`; they never look at flags, so a
future rule (allow-lists, hot reload) changes this file and nothing else.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

#: Base names of commands that move files, as upstream blocks them.
BLOCKED_FILE_TRANSFER_COMMANDS: frozenset[str] = frozenset({"nc", "rsync", "scp", "sftp"})

#: What an exec of a blocked command receives on stdout.  The leading 0x02 is
#: scp's "fatal error" status byte, so an scp client prints the text and stops.
FILE_TRANSFER_BLOCKED_MESSAGE = b"\x02File transfer has been disabled.\n"

#: Exit status of a refused transfer (upstream's BlockedFileTransferErrorCode).
FILE_TRANSFER_BLOCKED_EXIT_STATUS = 65


@dataclass(frozen=True)
class Decision:
    """The answer to one question put to the policy."""

    allowed: bool
    reason: str = ""


ALLOW = Decision(True)


@dataclass(frozen=True)
class Policy:
    """Decides every forward and every file transfer the agent serves.

    ``transport`` is ``"tcp"`` or ``"unix"``; ``target`` is what the client
    asked for (``host:port`` or a socket path), kept for future rules such as
    allow-lists.  The refusal reasons are upstream's texts, which a local
    refusal puts on the wire.
    """

    blockFileTransfer: bool = False
    blockLocalPortForwarding: bool = False
    blockReversePortForwarding: bool = False

    def allowLocalForward(self, transport: str, target: str) -> Decision:
        """May a client open a connection from here (``ssh -L``/``-W``)?"""
        if self.blockLocalPortForwarding:
            if transport == "unix":
                return Decision(False, "local port forwarding is disabled")
            return Decision(False, "port forwarding is disabled")
        return ALLOW

    def allowReverseForward(self, transport: str, target: str) -> Decision:
        """May a client make us listen and tunnel back to it (``ssh -R``)?"""
        if self.blockReversePortForwarding:
            return Decision(False, "port forwarding is disabled")
        return ALLOW

    def allowSubsystem(self, name: str) -> Decision:
        """May a session start subsystem ``name``?  Only sftp is a transfer."""
        if self.blockFileTransfer and name == "sftp":
            return Decision(False, "file transfer blocked")
        return ALLOW

    def allowCommand(self, command: str | None) -> Decision:
        """May a session run ``command`` (``None`` or empty: the login shell)?

        Matches upstream: split the command shell-style and refuse it when the
        base name of the first word is a known transfer tool.  ``bash -c scp``
        is deliberately *not* refused: this is a "do not trespass" sign, not a
        sandbox, and the docs say so.
        """
        if not self.blockFileTransfer or not command:
            return ALLOW
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        if words and os.path.basename(words[0]) in BLOCKED_FILE_TRANSFER_COMMANDS:
            return Decision(False, "file transfer blocked")
        return ALLOW
