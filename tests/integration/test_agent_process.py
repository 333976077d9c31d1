"""The agent as an operator meets it: start-up, options, host keys, timeouts."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from tests.agentproc import (
    Agent,
    ClientKeys,
    agentArgs,
    agentEnvironment,
    runningAgent,
    ssh,
    sshOptions,
    twistdCommand,
)

UPSTREAM_FLAGS = [
    "log-dir",
    "script-data-dir",
    "pprof-address",
    "agent-header-command",
    "agent-header",
    "no-reap",
    "ssh-max-timeout",
    "tailnet-listen-port",
    "prometheus-address",
    "debug-address",
    "log-human",
    "log-json",
    "log-stackdriver",
    "block-file-transfer",
    "block-reverse-port-forwarding",
    "block-local-port-forwarding",
    "devcontainers-enable",
    "devcontainers-project-discovery-enable",
    "devcontainers-discovery-autostart-enable",
    "socket-server-enabled",
    "socket-path",
    "boundary-log-proxy-socket-path",
    "auth",
    "agent-token",
    "agent-token-file",
    "agent-url",
    "ssh-endpoint",
    "ssh-authorized-keys",
]


def runToExit(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*twistdCommand(), "-n", "--pidfile=", "coder-agent", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_option(tmp_path: Path) -> None:
    result = runToExit(["--help"], agentEnvironment(tmp_path))
    assert result.returncode == 0, result.stderr
    for flag in UPSTREAM_FLAGS:
        assert f"--{flag}" in result.stdout, flag
    for env in [
        "CODER_AGENT_LOGGING_HUMAN",
        "CODER_AGENT_BLOCK_FILE_TRANSFER",
        "CODER_AGENT_TOKEN",
        "CODER_AGENT_URL",
        "CODER_AGENT_SSH_ENDPOINT",
        "CODER_AGENT_SSH_MAX_TIMEOUT",
    ]:
        assert env in result.stdout, env
    assert "72h" in result.stdout


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"CODER_AGENT_BLOCK_FILE_TRANSFER": "maybe"}, [], "CODER_AGENT_BLOCK_FILE_TRANSFER"),
        ({"CODER_AGENT_SSH_MAX_TIMEOUT": "10"}, [], "CODER_AGENT_SSH_MAX_TIMEOUT"),
        ({}, ["--ssh-max-timeout=soon"], "--ssh-max-timeout"),
        ({"CODER_AGENT_PROMETHEUS_ADDRESS": "nohost"}, [], "CODER_AGENT_PROMETHEUS_ADDRESS"),
        ({"CODER_AGENT_URL": "ftp://x"}, [], "CODER_AGENT_URL"),
    ],
)
def test_bad_option_values_stop_with_one_line(
    clientKeys: ClientKeys, tmp_path: Path, env: dict[str, str], args: list[str], named: str
) -> None:
    # The variables under test must not be shadowed by agentArgs' flags.
    shadowing = ("--agent-url", "--prometheus-address")
    base = [a for a in agentArgs(clientKeys, tmp_path) if not a.startswith(shadowing)]
    if "CODER_AGENT_URL" not in env:
        base.append("--agent-url=http://127.0.0.1:9")
    result = runToExit([*base, *args], agentEnvironment(tmp_path, env))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("coder-agent: ") and named in lines[0]


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("--agent-url", "CODER_AGENT_URL must be set"),
        ("--agent-token", "Either CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set"),
    ],
)
def test_missing_auth_options(
    clientKeys: ClientKeys, tmp_path: Path, drop: str, message: str
) -> None:
    args = [a for a in agentArgs(clientKeys, tmp_path) if not a.startswith(drop)]
    result = runToExit(args, agentEnvironment(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == f"coder-agent: {message}"


def test_token_file_and_unsupported_auth(clientKeys: ClientKeys, tmp_path: Path) -> None:
    base = [a for a in agentArgs(clientKeys, tmp_path) if not a.startswith("--agent-token")]
    empty = tmp_path / "empty-token"
    empty.write_text("  \n")
    result = runToExit([*base, f"--agent-token-file={empty}"], agentEnvironment(tmp_path))
    # The token file is read when the agent starts, before it listens on anything.
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(
        "  stderr: coder-agent: CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE must be set for "
        "token auth"
    )
    assert "listening on" not in result.stderr and "host key" not in result.stderr
    result = runToExit(
        [*base, "--agent-token=t", "--auth=aws-instance-identity"], agentEnvironment(tmp_path)
    )
    assert result.returncode != 0 and "not supported" in result.stderr


def test_bind_failure_stops_the_agent(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [*agentArgs(clientKeys, tmp_path), f"--ssh-endpoint=tcp:{port}:interface=127.0.0.1"]
        result = runToExit(args, agentEnvironment(tmp_path))
    assert result.returncode != 0
    assert (
        f"coder-agent: SSH server: cannot listen on tcp:{port}:interface=127.0.0.1" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_env_endpoint_and_ignored_options_are_logged(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    env = {"CODER_AGENT_DEVCONTAINERS_ENABLE": "false", "CODER_AGENT_TAILNET_LISTEN_PORT": "41641"}
    with runningAgent(clientKeys, tmp_path, extraEnv=env) as running:
        line = running.waitForLog(r"ignored by coderagent: (.*)").group(1)
        assert "--devcontainers-enable" in line and "--tailnet-listen-port" in line
        # Nobody listens on port 9: the agent says so and keeps serving SSH.
        running.waitForLog(r"cannot connect to coderd at http://127\.0\.0\.1:9: .*refused")


def _hostKey(agent: Agent) -> bytes:
    result = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(agent.port), agent.host],
        capture_output=True,
        timeout=30,
    )
    return result.stdout.split(None, 1)[1]


def test_host_key_is_kept_across_restarts(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with runningAgent(clientKeys, tmp_path) as first:
        key = _hostKey(first)
    directory = tmp_path / "data" / "coder-agent-ssh-host-keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    for name in files:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    with runningAgent(clientKeys, tmp_path) as second:
        assert _hostKey(second) == key
        # ... and the pinned key is accepted by a strict client.
        known = tmp_path / "known_hosts"
        known.write_bytes(f"[{second.host}]:{second.port} ".encode() + key)
        options = sshOptions(second, clientKeys.key)
        for name in ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"):
            del options[options.index(name) - 1 : options.index(name) + 1]
        result = subprocess.run(
            [
                "ssh",
                *options,
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={known}",
                f"coder@{second.host}",
                "echo pinned",
            ],
            capture_output=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout) == (0, b"pinned\n")


def test_keys_with_options_we_cannot_honour_are_refused_and_logged(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    keys = ClientKeys.create(tmp_path / "keys")
    other = Path(f"{keys.otherKey}.pub").read_text().strip()
    keys.authorizedKeys.write_text(
        keys.authorizedKeys.read_text() + f'restrict,tunnel="1" {other}\n'
    )
    with runningAgent(keys, tmp_path / "agent") as running:
        assert ssh(running, keys.key, "true").returncode == 0
        refused = ssh(running, keys.otherKey, "true")
        assert refused.returncode == 255 and b"Permission denied" in refused.stderr
        running.waitForLog(r"line 2: option 'tunnel' is not supported by this agent; key refused")


def test_unauthenticated_connections_time_out(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with runningAgent(clientKeys, tmp_path, ["--ssh-login-grace-time=1s"]) as running:
        with socket.create_connection((running.host, running.port), timeout=30) as conn:
            assert conn.recv(256).startswith(b"SSH-2.0-")
            started = time.monotonic()
            while conn.recv(4096):  # the server's KEXINIT, then EOF
                pass
            assert time.monotonic() - started < 20
        running.waitForLog(r"closing unauthenticated connection from 127\.0\.0\.1:\d+ after 1\.0s")


def test_failed_attempts_are_bounded(clientKeys: ClientKeys, tmp_path: Path) -> None:
    wrongKey = paramiko.RSAKey.generate(2048)
    with runningAgent(clientKeys, tmp_path, ["--ssh-max-auth-tries=3"]) as running:
        transport = paramiko.Transport((running.host, running.port))
        try:
            transport.start_client(timeout=30)
            failures = 0
            disconnected = False
            for _ in range(10):
                try:
                    transport.auth_publickey("coder", wrongKey)
                except paramiko.BadAuthenticationType:
                    raise
                except paramiko.AuthenticationException:
                    failures += 1
                except (paramiko.SSHException, EOFError, OSError):
                    disconnected = True
                    break
            assert disconnected
            assert failures == 3
        finally:
            transport.close()


def test_max_timeout_below_three_seconds_is_a_deadline(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningAgent(clientKeys, tmp_path, ["--ssh-max-timeout=1s"]) as running:
        started = time.monotonic()
        result = ssh(running, clientKeys.key, "sleep 30; echo finished", timeout=30)
        assert result.returncode == 255
        assert result.stdout == b""
        assert time.monotonic() - started < 25


def test_keepalive_closes_an_unresponsive_client(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with runningAgent(clientKeys, tmp_path, ["--ssh-max-timeout=3s"]) as running:
        # A live client survives several keep-alive intervals...
        alive = ssh(running, clientKeys.key, "sleep 4; echo alive", timeout=30)
        assert (alive.returncode, alive.stdout) == (0, b"alive\n")
        # ... a frozen one is dropped after three unanswered keep-alives.
        proc = subprocess.Popen(
            [
                "ssh",
                *sshOptions(running, clientKeys.key),
                f"coder@{running.host}",
                "echo up; exec sleep 60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
            proc.send_signal(signal.SIGSTOP)
            running.waitForLog(r"keep-alive timeout", timeout=30)
        finally:
            proc.send_signal(signal.SIGCONT)
            assert proc.wait(timeout=30) == 255
