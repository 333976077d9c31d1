"""What the agent allows: every forward, file transfer, terminal and command.

The one :class:`Policy` object (:mod:`.engine`) is the only reader of the ``--block-*``
flags, the policy file (:mod:`.policyfile`, :mod:`.rules`) and the options of the key a client
logged in with (:mod:`.keyoptions`).  Handlers ask it and act on its :class:`Decision`.
"""

from coderagent.policy.engine import (
    ALLOW,
    BLOCKED_FILE_TRANSFER_COMMANDS,
    FILE_TRANSFER_BLOCKED_EXIT_STATUS,
    FILE_TRANSFER_BLOCKED_MESSAGE,
    Decision,
    Policy,
    TCPDecision,
    normalisePath,
)
from coderagent.policy.keyoptions import KeyOptionError, KeyOptions, parseKeyOptions
from coderagent.policy.policyfile import PolicyFile, PolicyFileError, loadPolicy

__all__ = [
    "ALLOW",
    "BLOCKED_FILE_TRANSFER_COMMANDS",
    "FILE_TRANSFER_BLOCKED_EXIT_STATUS",
    "FILE_TRANSFER_BLOCKED_MESSAGE",
    "Decision",
    "KeyOptionError",
    "KeyOptions",
    "Policy",
    "PolicyFile",
    "PolicyFileError",
    "TCPDecision",
    "loadPolicy",
    "normalisePath",
    "parseKeyOptions",
]
