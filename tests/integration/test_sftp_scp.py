"""SFTP and scp (OpenSSH 9's scp speaks SFTP) through the real clients."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.agentproc import Agent, ClientKeys, sshOptions

TIMEOUT = 120


def _clientOptions(agent: Agent, clientKeys: ClientKeys) -> list[str]:
    # sftp and scp take the port as -P, not -p.
    options = sshOptions(agent, clientKeys.key)
    i = options.index("-p")
    return [*options[:i], "-P", *options[i + 1 :]]


def sftp(
    agent: Agent, clientKeys: ClientKeys, batch: str, cwd: Path, extra: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "sftp",
            *_clientOptions(agent, clientKeys),
            *(extra or []),
            "-b",
            "-",
            f"coder@{agent.host}",
        ],
        input=batch.encode(),
        capture_output=True,
        cwd=cwd,
        timeout=TIMEOUT,
    )


def scp(agent: Agent, clientKeys: ClientKeys, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["scp", *_clientOptions(agent, clientKeys), *args],
        capture_output=True,
        timeout=TIMEOUT,
    )


def test_sftp_operations(agent: Agent, clientKeys: ClientKeys, tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    payload = os.urandom(20 * 1024 * 1024 + 123)
    local.write_bytes(payload)
    remote = agent.home / "sftp-ops"
    batch = f"""
mkdir sftp-ops
cd sftp-ops
put {local} up.bin
get up.bin {tmp_path / "down.bin"}
rename up.bin moved.bin
ln -s moved.bin link.bin
mkdir sub
rmdir sub
mkdir keep
ls -l
"""
    result = sftp(agent, clientKeys, batch, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "down.bin").read_bytes() == payload
    assert (remote / "moved.bin").read_bytes() == payload
    assert not (remote / "up.bin").exists()
    assert os.readlink(remote / "link.bin") == "moved.bin"
    assert not (remote / "sub").exists() and (remote / "keep").is_dir()
    listing = result.stdout.decode()
    assert "moved.bin" in listing and "link.bin" in listing

    result = sftp(agent, clientKeys, "rm sftp-ops/moved.bin\nrm sftp-ops/link.bin\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in remote.iterdir()) == ["keep"]


def test_sftp_missing_file_is_an_error(
    agent: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    result = sftp(agent, clientKeys, "get does-not-exist\n", tmp_path)
    assert result.returncode == 1
    assert b"not found" in result.stderr.lower() or b"no such file" in result.stderr.lower()


def test_sftp_exits_with_debian_sendenv(
    agent: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    # Debian's ssh_config sends LANG/LC_* before the subsystem request; the
    # session must still close when sftp is done instead of hanging.
    env = dict(os.environ, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    result = subprocess.run(
        [
            "sftp",
            *_clientOptions(agent, clientKeys),
            "-o",
            "SendEnv=LANG LC_*",
            "-b",
            "-",
            f"coder@{agent.host}",
        ],
        input=b"pwd\n",
        capture_output=True,
        timeout=TIMEOUT,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert str(agent.home).encode() in result.stdout


def test_scp_round_trip_large_file(agent: Agent, clientKeys: ClientKeys, tmp_path: Path) -> None:
    # scp truncates its upload to the last in-order acknowledged write, so this
    # also proves replies to pipelined writes leave in request order.
    payload = os.urandom(24 * 1024 * 1024 + 7)
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    up = scp(agent, clientKeys, str(source), f"coder@{agent.host}:scp-up.bin")
    assert up.returncode == 0, up.stderr
    assert (agent.home / "scp-up.bin").read_bytes() == payload
    down = scp(agent, clientKeys, f"coder@{agent.host}:scp-up.bin", str(tmp_path / "back.bin"))
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back.bin").read_bytes() == payload
