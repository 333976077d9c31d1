"""Each cipher and MAC the agent adds to Conch's, forced on the real OpenSSH client.

For every one: an exec, a PTY session, an SFTP transfer both ways, and a
transfer that re-keys every 256 KiB, all byte-exact, with the client saying
(``-vvv``) that it negotiated exactly that and strict key exchange.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.agentproc import Agent, ClientKeys, ssh, sshOptions
from tests.integration.test_pty_signals import Terminal
from tests.integration.test_sftp_scp import sftp

# (cipher, MAC): the MAC is OpenSSH's "<implicit>" for the AEAD ciphers.
ALGORITHMS = [
    ("chacha20-poly1305@openssh.com", "<implicit>"),
    ("aes128-gcm@openssh.com", "<implicit>"),
    ("aes256-gcm@openssh.com", "<implicit>"),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
]
IDS = [f"{c}+{m}" for c, m in ALGORITHMS]


def _forcing(cipher: str, mac: str) -> list[str]:
    # A MAC list is given for the AEAD ciphers too: one the agent does not
    # have, which must not matter when no MAC is negotiated.
    return ["-o", f"Ciphers={cipher}", "-o", f"MACs={'hmac-sha1' if mac == '<implicit>' else mac}"]


@pytest.mark.parametrize(("cipher", "mac"), ALGORITHMS, ids=IDS)
def test_exec_negotiates_it_with_strict_kex(
    agent: Agent, clientKeys: ClientKeys, cipher: str, mac: str
) -> None:
    result = ssh(
        agent,
        clientKeys.key,
        "echo negotiated; echo to-stderr >&2; exit 4",
        options=[*_forcing(cipher, mac), "-vvv", "-o", "LogLevel=DEBUG3"],
    )
    assert (result.returncode, result.stdout) == (4, b"negotiated\n"), result.stderr[-3000:]
    stderr = result.stderr.decode()
    assert "to-stderr\n" in stderr
    for direction in ("server->client", "client->server"):
        assert f"kex: {direction} cipher: {cipher} MAC: {mac} compression: none" in stderr
    assert "will use strict KEX ordering" in stderr
    # Both counters start again at 0 after NEWKEYS, on both sides.
    assert "resetting send seqnr" in stderr and "resetting read seqnr" in stderr


@pytest.mark.parametrize(("cipher", "mac"), ALGORITHMS, ids=IDS)
def test_pty_session(agent: Agent, clientKeys: ClientKeys, cipher: str, mac: str) -> None:
    term = Terminal(
        [
            "ssh",
            *sshOptions(agent, clientKeys.key),
            *_forcing(cipher, mac),
            "-tt",
            f"coder@{agent.host}",
            "tty; stty size; read line; echo got=$line; exit 6",
        ],
        rows=30,
        cols=100,
    )
    try:
        term.expect(rb"/dev/pts/\d+\r\n30 100\r\n")
        term.send(b"typed over " + cipher.encode() + b"\r")
        term.expect(b"got=typed over " + cipher.encode() + b"\r\n")
    finally:
        assert term.close() == 6


@pytest.mark.parametrize(("cipher", "mac"), ALGORITHMS, ids=IDS)
def test_sftp_transfer_both_ways(
    agent: Agent, clientKeys: ClientKeys, tmp_path: Path, cipher: str, mac: str
) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 17)
    (tmp_path / "up.bin").write_bytes(payload)
    name = f"sftp-{cipher}-{mac}.bin".replace("<", "").replace(">", "")
    result = sftp(
        agent,
        clientKeys,
        f"put up.bin {name}\nget {name} down.bin\n",
        tmp_path,
        extra=_forcing(cipher, mac),
    )
    assert result.returncode == 0, result.stderr
    assert (agent.home / name).read_bytes() == payload
    assert (tmp_path / "down.bin").read_bytes() == payload


@pytest.mark.parametrize(("cipher", "mac"), ALGORITHMS, ids=IDS)
def test_re_keying_every_256_kib(
    agent: Agent, clientKeys: ClientKeys, cipher: str, mac: str
) -> None:
    # Data both ways across more than a dozen key exchanges, each done with
    # the cipher in use (and the sequence numbers reset at each).
    data = os.urandom(6 * 1024 * 1024)
    result = subprocess.run(
        [
            "ssh",
            *sshOptions(agent, clientKeys.key),
            *_forcing(cipher, mac),
            "-v",
            "-o",
            "RekeyLimit=256K",
            f"coder@{agent.host}",
            "cat",
        ],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert result.stderr.count(b"SSH2_MSG_NEWKEYS received") > 12
    assert "Traceback" not in agent.log()
