"""Exec sessions driven by the real OpenSSH client: output, status, stdin, env."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.agentproc import Agent, ClientKeys, runningAgent, ssh, sshOptions


def test_exec_output_and_status(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, "echo hello; echo oops >&2")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello\n", b"oops\n")


def test_exit_status_is_passed_through(agent: Agent, clientKeys: ClientKeys) -> None:
    assert ssh(agent, clientKeys.key, "exit 7").returncode == 7


def test_signal_death_is_255(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, "kill -TERM $$")
    assert result.returncode == 255
    assert result.stdout == b""


def test_stdin_50_mb_round_trip_byte_exact(agent: Agent, clientKeys: ClientKeys) -> None:
    data = os.urandom(50 * 1024 * 1024)
    result = ssh(agent, clientKeys.key, "cat", input=data, timeout=120)
    assert result.returncode == 0
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_stdin_eof_reaches_the_process(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, "wc -c", input=b"x" * 12345)
    assert (result.returncode, result.stdout.strip()) == (0, b"12345")


def test_environment(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(
        agent,
        clientKeys.key,
        "env",
        options=["-o", "SetEnv=FROM_CLIENT=sent CODER_SSH_SESSION_TYPE=vscode"],
    )
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert env["FROM_CLIENT"] == "sent"
    assert "CODER_SSH_SESSION_TYPE" not in env  # interpreted, not exported
    assert env["CODER"] == "true"
    assert (env["USER"], env["LOGNAME"]) == (user, user)
    assert env["HOME"] == str(agent.home)
    assert os.path.isabs(env["SHELL"])
    client = env["SSH_CLIENT"].split()
    connection = env["SSH_CONNECTION"].split()
    assert client[0] == "127.0.0.1" and client[2] == str(agent.port)
    assert connection == [client[0], client[1], "127.0.0.1", str(agent.port)]
    assert "CODER_AGENT_TOKEN" not in env
    assert "SSH_TTY" not in env


def test_send_env(agent: Agent, clientKeys: ClientKeys) -> None:
    env = dict(os.environ, LC_COLOUR="teal")
    result = ssh(
        agent, clientKeys.key, "echo $LC_COLOUR", options=["-o", "SendEnv=LC_COLOUR"], env=env
    )
    assert (result.returncode, result.stdout) == (0, b"teal\n")


def test_working_directory_is_home(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, "pwd")
    assert result.stdout.decode().strip() == str(agent.home)


def test_login_shell_without_pty_reads_stdin(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.key, input=b"echo shell-ok\nexit 3\n", options=["-T"])
    assert result.returncode == 3
    assert b"shell-ok\n" in result.stdout


def test_wrong_key_is_refused(agent: Agent, clientKeys: ClientKeys) -> None:
    result = ssh(agent, clientKeys.otherKey, "true")
    assert result.returncode == 255
    assert b"Permission denied (publickey)" in result.stderr


def test_only_publickey_is_offered(agent: Agent, clientKeys: ClientKeys) -> None:
    # With public keys switched off the client has nothing it may try; the
    # server's list of methods in the refusal is exactly "publickey".
    result = ssh(
        agent,
        clientKeys.key,
        "true",
        options=[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive,publickey",
        ],
    )
    assert result.returncode == 255
    assert b"Permission denied (publickey)." in result.stderr


def test_controlmaster_300_execs_keep_every_exit_status(
    agent: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    control = tmp_path / "ctl"
    base = ["ssh", *sshOptions(agent, clientKeys.key), "-S", str(control)]
    target = f"coder@{agent.host}"
    # -f returns once the master is authenticated and its socket is ready.
    subprocess.run(
        [*base, "-M", "-f", "-N", "-o", "ControlPersist=yes", target], check=True, timeout=60
    )
    try:
        failures = []
        for i in range(300):
            want = i % 7
            result = subprocess.run(
                [*base, target, f"echo {i}; exit {want}"], capture_output=True, timeout=60
            )
            if (result.returncode, result.stdout) != (want, f"{i}\n".encode()):
                failures.append((i, result.returncode, result.stdout, result.stderr))
        assert failures == []
    finally:
        subprocess.run([*base, "-O", "exit", target], capture_output=True, timeout=30)


def test_rekeying_mid_transfer_loses_nothing(agent: Agent, clientKeys: ClientKeys) -> None:
    # The client re-keys every 256 KiB: during each key exchange the agent
    # must hold back channel data and send it, in order, after NEWKEYS.
    data = os.urandom(8 * 1024 * 1024)
    result = ssh(
        agent, clientKeys.key, "cat", input=data, options=["-v", "-o", "RekeyLimit=256K"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert result.stderr.count(b"SSH2_MSG_NEWKEYS received") > 10


def test_a_home_removed_after_start_is_a_clear_session_error(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    # The session's process is started by the agent itself (posix_spawn),
    # so a directory that is gone is the agent's error to report, not a
    # traceback from a forked child.
    home = tmp_path / "gone"
    home.mkdir()
    with runningAgent(clientKeys, tmp_path / "agent", extraEnv={"HOME": str(home)}) as agent:
        home.rmdir()
        result = ssh(agent, clientKeys.key, "echo never")
        assert result.returncode == 229
        assert result.stdout == b""
        assert result.stderr.startswith(b"coder-agent: cannot start ")
        assert b"No such file or directory" in result.stderr
        assert b"Traceback" not in result.stderr
