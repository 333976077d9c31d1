"""Under ``umask 000``, every file the agent creates is still private.

Secrets (host keys), audit data (the boundary spool) and logs name peers,
paths and commands; sockets let whoever can connect talk to the agent.  A
umask only removes permission bits, so each of these must get its mode set
explicitly: here the agent runs with a umask that removes nothing, and every
file, directory and socket it made is checked.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.agentproc import TIMEOUT, ClientKeys, runningAgent, ssh
from tests.integration.test_forwarding import clientOptions

#: What each kind of file the agent creates must be.
MODES = {"directory": 0o700, "regular file": 0o600, "socket": 0o600}


def kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "regular file"
    return "other"


def notPrivate(top: Path) -> list[str]:
    """Everything under ``top`` (and ``top``) whose mode is not what its kind must have."""
    found = []
    for path in [top, *sorted(top.rglob("*"))]:
        st = os.lstat(path)
        what = kind(st.st_mode)
        if stat.S_IMODE(st.st_mode) != MODES.get(what):
            found.append(f"{path} ({what}, {stat.S_IMODE(st.st_mode):o})")
    return found


def test_under_umask_000_every_file_the_agent_creates_is_private(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()  # the test's: only what the agent puts in it is checked
    data = tmp_path / "a" / "data"
    flags = [
        f"--log-json={logs / 'agent.json'}",
        f"--log-stackdriver={logs / 'agent.sd'}",
        "--socket-server-enabled",
        f"--socket-path={data / 'control.sock'}",
    ]
    remote = data / "forwards" / "deep" / "er" / "r.sock"
    with runningAgent(clientKeys, tmp_path / "a", flags, umask=0) as agent:
        agent.waitForLog(r"boundary log proxy listening on")
        agent.waitForLog(r"control socket listening on")
        assert Path(f"/proc/{agent.process.pid}/status").read_text().count("Umask:\t0000") == 1
        assert ssh(agent, clientKeys.key, "echo hello").stdout == b"hello\n"
        # A reverse Unix forward: its socket and every directory made for it.
        forward = subprocess.Popen(
            [
                "ssh",
                *clientOptions(agent, clientKeys.key),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                f"{remote}:127.0.0.1:9",
                f"coder@{agent.host}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            agent.waitForLog(rf"forwarding {remote} to ")
            made = [
                data / "coder-agent-ssh-host-keys" / "ssh_host_ed25519_key",
                data / "coder-agent-boundary-spool" / "spool.db",
                data / "coder-agent.log",
                data / "boundary-audit.sock",
                data / "control.sock",
                remote,
            ]
            assert [p for p in made if not os.path.lexists(p)] == []
            assert notPrivate(data) == []
        finally:
            forward.terminate()
            forward.wait(TIMEOUT)
    assert sorted(p.name for p in logs.iterdir()) == ["agent.json", "agent.sd"]
    assert notPrivate(logs)[1:] == []  # [0] is the directory the test made
    assert notPrivate(data) == []  # and nothing made on the way out is different
