"""The policy object: the only reader of the block flags."""

from __future__ import annotations

import pytest

from coderagent.policy import Decision, Policy

BLOCKING = Policy(blockFileTransfer=True)


@pytest.mark.parametrize(
    "command",
    [
        "scp -t /x",
        "/usr/bin/scp -f y",
        "sftp",
        "rsync --server -e.Lsfx . x",
        "nc -l 1",
        "'rsync' a",
        "  scp   -t x",
    ],
)
def test_transfer_commands_are_refused(command: str) -> None:
    assert BLOCKING.allowCommand(command) == Decision(
        False, "file transfer blocked", "--block-file-transfer"
    )


@pytest.mark.parametrize(
    "command", [None, "", "bash -c scp", "scp.exe", "echo scp", "rsyncd", "ncat", "sh -c 'nc -l 1'"]
)
def test_other_commands_are_allowed(command: str | None) -> None:
    assert BLOCKING.allowCommand(command) == Decision(True)


def test_unbalanced_quotes_still_match_the_first_word() -> None:
    assert not BLOCKING.allowCommand("scp 'unterminated").allowed


def test_sftp_subsystem() -> None:
    assert BLOCKING.allowSubsystem("sftp") == Decision(
        False, "file transfer blocked", "--block-file-transfer"
    )
    assert Policy().allowSubsystem("sftp").allowed
    assert Policy().allowCommand("scp -t x").allowed


def test_forwarding_directions_are_independent() -> None:
    local = Policy(blockLocalPortForwarding=True)
    reverse = Policy(blockReversePortForwarding=True)
    assert local.allowLocalForward("tcp", "h:1") == Decision(
        False, "port forwarding is disabled", "--block-local-port-forwarding"
    )
    assert local.allowLocalForward("unix", "/s") == Decision(
        False, "local port forwarding is disabled", "--block-local-port-forwarding"
    )
    assert local.allowReverseForward("tcp", "h:1").allowed
    assert local.allowReverseForward("unix", "/s").allowed
    assert not reverse.allowReverseForward("tcp", "h:1").allowed
    assert not reverse.allowReverseForward("unix", "/s").allowed
    assert reverse.allowLocalForward("tcp", "h:1").allowed
    assert reverse.allowLocalForward("unix", "/s").allowed
    assert Policy().allowLocalForward("tcp", "h:1").allowed
