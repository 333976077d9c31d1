"""What the agent reports to coderd, end to end: real ``ssh``, the twistd agent, coderd-dev.

One coderd-dev (``--report-interval 1s``, a state file) and one agent connected
to it serve the whole module; each test reads what reached "coderd" off
coderd-dev's log lines (``agent stats: …``, ``agent connection …``) or its
state file.
"""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agentproc import (
    TIMEOUT,
    Agent,
    ClientKeys,
    Coderd,
    runningAgent,
    runningCoderd,
    sshOptions,
)
from tests.integration.test_forwarding import (
    TCPServer,
    _Echo,
    echoThrough,
    freePort,
    sameBytes,
    serving,
    sshMaster,
)

MiB = 1024 * 1024
TOKEN = "reporting-token"
STATS = re.compile(
    r"agent stats: connection_count=(?P<connections>\d+) session_count_ssh=(?P<ssh>\d+) "
    r"session_count_vscode=\d+ session_count_jetbrains=\d+ rx_bytes=(?P<rx>\d+) "
    r"tx_bytes=(?P<tx>\d+) rx_packets=(?P<rxp>\d+) tx_packets=(?P<txp>\d+) metrics=(?P<m>\d+)"
)


@dataclass
class Reporting:
    coderd: Coderd
    agent: Agent
    work: Path

    @property
    def state(self) -> Path:
        return self.work / "state.json"


@pytest.fixture(scope="module")
def reporting(
    clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reporting]:
    work = tmp_path_factory.mktemp("reporting")
    extra = ["--report-interval=1s", f"--state-file={work / 'state.json'}"]
    with runningCoderd(work / "coderd", token=TOKEN, extra=extra) as coderd:
        args = [f"--agent-url={coderd.url}", f"--agent-token={TOKEN}"]
        with runningAgent(clientKeys, work / "agent", args) as agent:
            coderd.waitForLog("agent lifecycle: READY")
            yield Reporting(coderd, agent, work)


def _sshPopen(agent: Agent, key: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ssh", *sshOptions(agent, key), f"coder@{agent.host}", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_connected_user_is_counted_until_they_leave(
    reporting: Reporting, clientKeys: ClientKeys
) -> None:
    coderd = reporting.coderd
    session = _sshPopen(reporting.agent, clientKeys.key, "sleep 5")
    try:
        active = STATS.pattern.replace(
            r"connection_count=(?P<connections>\d+) session_count_ssh=(?P<ssh>\d+)",
            r"connection_count=(?P<connections>[1-9]\d*) session_count_ssh=(?P<ssh>[1-9]\d*)",
        )
        index, _ = coderd.waitForLine(active)
        assert session.wait(TIMEOUT) == 0
    finally:
        session.kill()
    idle = r"agent stats: connection_count=0 session_count_ssh=0 "
    coderd.waitForLog(idle, since=index + 1)
    stats = [m for m in map(STATS.search, coderd.lines) if m]
    assert stats and all(int(m["m"]) > 20 for m in stats)  # the registry goes along


def test_every_byte_of_a_forward_is_in_the_stats(
    reporting: Reporting, clientKeys: ClientKeys
) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    index, _ = coderd.waitForLine(STATS)
    since = index + 1
    data = bytes(range(256)) * (20 * MiB // 256)
    with (
        tempfile.TemporaryDirectory(prefix="rp", dir="/tmp") as short,
        serving(TCPServer(_Echo)) as echo,
        sshMaster(agent, clientKeys.key, Path(short)) as master,
    ):
        local = freePort()
        master.forward("-L", f"127.0.0.1:{local}:127.0.0.1:{echo.port}")
        with socket.create_connection(("127.0.0.1", local), timeout=TIMEOUT) as sock:
            assert sameBytes(echoThrough(sock, data), data)
    # The bytes were pushed both ways (the echo): each direction has at least 20 MiB.
    deadline = time.monotonic() + TIMEOUT
    while True:
        reports = [m for m in map(STATS.search, coderd.lines[since:]) if m]
        rx, tx = sum(int(m["rx"]) for m in reports), sum(int(m["tx"]) for m in reports)
        if rx >= len(data) and tx >= len(data):
            break
        assert time.monotonic() < deadline, f"rx {rx}, tx {tx}; log:\n{coderd.log()}"
        coderd.waitForLog(STATS, since=len(coderd.lines))
    assert all(int(m["rxp"]) >= 0 and int(m["txp"]) >= 0 for m in reports)
    assert sum(int(m["rxp"]) for m in reports) >= len(data) // (256 * 1024)
