"""``--block-file-transfer``: scp/sftp/rsync/nc refused exactly as upstream."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentproc import Agent, ClientKeys, runningAgent, ssh
from tests.integration.test_sftp_scp import _clientOptions

BLOCKED = b"\x02File transfer has been disabled.\n"


@pytest.mark.parametrize(
    "command",
    ["rsync --version", "/usr/bin/scp -t /tmp/x", "sftp", "nc -l 1234", "'rsync' --server ."],
)
def test_blocked_exec(blockingAgent: Agent, clientKeys: ClientKeys, command: str) -> None:
    result = ssh(blockingAgent, clientKeys.key, command)
    assert (result.returncode, result.stdout) == (65, BLOCKED)


def test_blocked_exec_is_logged_with_the_command(
    blockingAgent: Agent, clientKeys: ClientKeys
) -> None:
    ssh(blockingAgent, clientKeys.key, "rsync --version")
    blockingAgent.waitForLog(r"file transfer blocked: command 'rsync --version' refused")


@pytest.mark.parametrize("command", ["echo ok", "bash -c 'echo scp'", "echo rsync"])
def test_other_exec_still_works(blockingAgent: Agent, clientKeys: ClientKeys, command: str) -> None:
    result = ssh(blockingAgent, clientKeys.key, command)
    assert result.returncode == 0
    assert result.stdout.strip() in (b"ok", b"scp", b"rsync")


def test_login_shell_is_not_affected(blockingAgent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(blockingAgent, clientKeys.key, input=b"echo shell-ok\n", options=["-T"])
    assert result.returncode == 0
    assert b"shell-ok" in result.stdout


def test_sftp_subsystem_is_refused(
    blockingAgent: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            "sftp",
            *_clientOptions(blockingAgent, clientKeys),
            "-b",
            "-",
            f"coder@{blockingAgent.host}",
        ],
        input=b"ls\n",
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert b"Connection closed" in result.stderr
    blockingAgent.waitForLog(r"file transfer blocked: subsystem sftp refused")


def test_subsystem_exit_status_is_65(blockingAgent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(blockingAgent, clientKeys.key, "sftp", options=["-s"])
    assert (result.returncode, result.stdout) == (65, b"")


def test_scp_is_refused(blockingAgent: Agent, clientKeys: ClientKeys, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"data")
    for legacy in ([], ["-O"]):  # SFTP mode and the old scp protocol
        result = subprocess.run(
            [
                "scp",
                *legacy,
                *_clientOptions(blockingAgent, clientKeys),
                str(source),
                f"coder@{blockingAgent.host}:copied",
            ],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode != 0, legacy
    assert not (blockingAgent.home / "copied").exists()


@pytest.fixture(scope="module")
def envBlockingAgent(
    clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    with runningAgent(
        clientKeys,
        tmp_path_factory.mktemp("agent-env-block"),
        extraEnv={"CODER_AGENT_BLOCK_FILE_TRANSFER": "TRUE"},
    ) as running:
        yield running


def test_env_var_form_blocks(envBlockingAgent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(envBlockingAgent, clientKeys.key, "rsync --version")
    assert (result.returncode, result.stdout) == (65, BLOCKED)


def test_flag_false_overrides_env(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with runningAgent(
        clientKeys,
        tmp_path,
        ["--block-file-transfer=false"],
        extraEnv={"CODER_AGENT_BLOCK_FILE_TRANSFER": "1"},
    ) as running:
        result = ssh(running, clientKeys.key, "scp 2>/dev/null; echo ran")
        assert result.returncode == 0
        assert result.stdout.endswith(b"ran\n")


def test_default_agent_does_not_block(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, "nc -h >/dev/null 2>&1; echo $?")
    assert result.returncode == 0
    assert result.stdout.strip().isdigit()
