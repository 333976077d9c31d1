"""What the agent reports to coderd, end to end: real ``ssh``, the twistd agent, coderd-dev.

One coderd-dev (``--report-interval 1s``, a state file) and one agent connected
to it serve the whole module; each test reads what reached "coderd" off
coderd-dev's log lines (``agent stats: …``, ``agent connection …``) or its
state file.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agentproc import (
    REPO,
    TIMEOUT,
    Agent,
    ClientKeys,
    Coderd,
    agentEnvironment,
    runningAgent,
    runningCoderd,
    ssh,
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
from tests.integration.test_operability import get, listening
from tests.integration.test_sftp_scp import _clientOptions

MiB = 1024 * 1024
TOKEN = "reporting-token"
STATS = re.compile(
    r"agent stats: connection_count=(?P<connections>\d+) session_count_ssh=(?P<ssh>\d+) "
    r"session_count_vscode=\d+ session_count_jetbrains=\d+ rx_bytes=(?P<rx>\d+) "
    r"tx_bytes=(?P<tx>\d+) rx_packets=(?P<rxp>\d+) tx_packets=(?P<txp>\d+) metrics=(?P<m>\d+)"
)


BIG = 2 * MiB
MANIFEST = {
    "metadata": [
        {"key": "clock", "display_name": "Clock", "script": "date +%s%N", "interval": "1s"},
        {
            "key": "hang",
            "display_name": "Hangs",
            "script": "echo before; sleep 30",
            "interval": "1s",
            "timeout": "1s",
        },
        {
            "key": "big",
            "display_name": "Big",
            "script": f"head -c {BIG} /dev/zero | tr '\\0' x",
            "interval": "60s",
        },
    ],
}


class HealthCheck(http.server.BaseHTTPRequestHandler):
    """Answers with the server's current ``status``, counting the answers of each status."""

    server: HealthServer

    def do_GET(self) -> None:
        status = self.server.status
        with self.server.lock:
            self.server.answered[status] = self.server.answered.get(status, 0) + 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class HealthServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HealthCheck)
        self.status = 200
        self.answered: dict[int, int] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/healthz"


THRESHOLD = 2


@dataclass
class Reporting:
    coderd: Coderd
    agent: Agent
    work: Path
    app: HealthServer

    @property
    def state(self) -> Path:
        return self.work / "state.json"


@pytest.fixture(scope="module")
def reporting(
    clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reporting]:
    work = tmp_path_factory.mktemp("reporting")
    app = HealthServer()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    manifest = work / "manifest.json"
    healthcheck = {"url": app.url, "interval": "1s", "threshold": THRESHOLD}
    apps = [{"slug": "web", "healthcheck": healthcheck}]
    manifest.write_text(json.dumps({**MANIFEST, "apps": apps}))
    extra = [
        "--report-interval=1s",
        f"--state-file={work / 'state.json'}",
        f"--manifest={manifest}",
        "--monitor-memory",
        f"--monitor-volume={work}",
        "--monitor-interval=1",
        "--monitor-datapoints=2",
    ]
    with runningCoderd(work / "coderd", token=TOKEN, extra=extra) as coderd:
        args = [
            f"--agent-url={coderd.url}",
            f"--agent-token={TOKEN}",
            "--block-reverse-port-forwarding",
            "--block-file-transfer",
            "--debug-address=127.0.0.1:0",
            "--socket-server-enabled",
            f"--socket-path={work / 'control.sock'}",
        ]
        with runningAgent(clientKeys, work / "agent", args) as agent:
            coderd.waitForLog("agent lifecycle: READY")
            try:
                yield Reporting(coderd, agent, work, app)
            finally:
                app.shutdown()
                app.server_close()


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


# -- the connection log -----------------------------------------------------------------

CONNECTION = re.compile(
    r"agent connection (?P<action>CONNECT|DISCONNECT): (?P<type>\w+) from (?P<ip>\S+) "
    r"id=(?P<id>[0-9a-f-]{36})(?: status=(?P<status>-?\d+) reason=(?P<reason>\".*\"))?$"
)


def _mark(coderd: Coderd) -> int:
    """Where coderd-dev's log is once everything reported so far is in it: at the next
    stats report (its lines come in the order coderd-dev handled the calls)."""
    index, _ = coderd.waitForLine(STATS, since=coderd.mark())
    return index + 1


def _connections(coderd: Coderd, since: int) -> list[re.Match[str]]:
    return [m for m in (CONNECTION.search(line.rstrip("\n")) for line in coderd.lines[since:]) if m]


def _pair(coderd: Coderd, since: int, reason: str) -> tuple[re.Match[str], re.Match[str]]:
    """The CONNECT and the DISCONNECT, logged from line ``since`` on, of the entry ending
    with ``reason``."""
    quoted = re.escape(json.dumps(reason))
    coderd.waitForLog(rf"agent connection DISCONNECT: .* reason={quoted}$", since=since)
    events = _connections(coderd, since)
    [end] = [m for m in events if m["reason"] and json.loads(m["reason"]) == reason]
    [start] = [m for m in events if m["id"] == end["id"] and m["action"] == "CONNECT"]
    assert events.index(start) < events.index(end)
    return start, end


def test_each_session_is_a_pair_with_its_exit_status(
    reporting: Reporting, clientKeys: ClientKeys
) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    since = _mark(coderd)
    assert ssh(agent, clientKeys.key, "true").returncode == 0
    start, end = _pair(coderd, since, "graceful")
    assert (start["type"], start["ip"], end["status"]) == ("SSH", "127.0.0.1", "0")
    since = _mark(coderd)
    assert ssh(agent, clientKeys.key, "exit 3").returncode == 3
    start, end = _pair(coderd, since, "process exited with error status: 3")
    assert end["status"] == "3"
    since = _mark(coderd)
    assert ssh(agent, clientKeys.key, "kill -9 $$").returncode == 255
    _, end = _pair(coderd, since, "signal: killed")
    assert end["status"] == "255"
    since = _mark(coderd)
    vscode = ["-o", "SetEnv=CODER_SSH_SESSION_TYPE=vscode"]
    result = ssh(agent, clientKeys.key, "true", options=vscode)
    assert result.returncode == 0
    start, end = _pair(coderd, since, "graceful")
    assert start["type"] == end["type"] == "VSCODE"


def test_a_blocked_reverse_forward_is_in_the_connection_log(
    reporting: Reporting, clientKeys: ClientKeys
) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    since = _mark(coderd)
    port = freePort()
    refused = subprocess.run(
        [
            "ssh",
            *sshOptions(agent, clientKeys.key),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"0.0.0.0:{port}:127.0.0.1:9",
            f"coder@{agent.host}",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert refused.returncode == 255
    assert b"remote port forwarding failed" in refused.stderr
    reason = f"reverse port forwarding blocked: tcpip-forward 0.0.0.0:{port}"
    start, end = _pair(coderd, since, reason)
    assert (start["type"], start["ip"], end["status"]) == ("SSH", "127.0.0.1", "1")


def test_blocked_file_transfers_are_in_the_connection_log(
    reporting: Reporting, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    since = _mark(coderd)
    result = ssh(agent, clientKeys.key, "scp -t /tmp/x")
    assert result.returncode == 65
    _, end = _pair(coderd, since, 'file transfer blocked: exec "scp -t /tmp/x"')
    assert end["status"] == "65"
    since = _mark(coderd)
    sftp = subprocess.run(
        ["sftp", *_clientOptions(agent, clientKeys), "-b", "-", f"coder@{agent.host}"],
        input=b"ls\n",
        capture_output=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert sftp.returncode != 0 and b"Connection closed" in sftp.stderr
    _, end = _pair(coderd, since, "file transfer blocked: subsystem sftp")
    assert end["status"] == "65"


def test_an_unsupported_subsystem_is_refused_and_in_the_connection_log(
    reporting: Reporting, clientKeys: ClientKeys
) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    since = _mark(coderd)
    result = subprocess.run(
        ["ssh", *sshOptions(agent, clientKeys.key), "-s", f"coder@{agent.host}", "x11-portal"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
    )
    # As with sshd: the request is refused and the client says so.
    assert result.returncode == 255
    assert b"subsystem request failed" in result.stderr
    start, end = _pair(coderd, since, "unsupported subsystem: x11-portal")
    assert (start["type"], start["ip"], end["status"]) == ("SSH", "127.0.0.1", "1")
    agent.waitForLog(r"unsupported subsystem x11-portal refused for 127\.0\.0\.1")


def test_sessions_ended_by_a_shutdown_reach_coderd_before_the_agent_exits(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningCoderd(tmp_path / "coderd", token=TOKEN) as coderd:
        args = [f"--agent-url={coderd.url}", f"--agent-token={TOKEN}"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            coderd.waitForLog("agent lifecycle: READY")
            session = subprocess.Popen(
                ["ssh", *sshOptions(agent, clientKeys.key), f"coder@{agent.host}", "cat"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            start = coderd.waitForLog(CONNECTION)
            assert start["action"] == "CONNECT"
        # runningAgent sent SIGTERM and waited for the agent to exit.
        session.wait(TIMEOUT)
        coderd.waitForLog("agent lifecycle: OFF")
        ends = [m for m in _connections(coderd, 0) if m["action"] == "DISCONNECT"]
        assert [(m["id"], m["status"], m["reason"]) for m in ends] == [
            (start["id"], "1", '"connection lost"')
        ]
        lines = coderd.log()
        assert lines.index("agent connection DISCONNECT") < lines.index("agent lifecycle: OFF")


# -- metadata ---------------------------------------------------------------------------

METADATA = re.compile(
    r"agent metadata (?P<key>\S+): (?P<size>\d+) bytes (?P<value>\".*\") error=(?P<error>\".*\")$"
)


def _metadata(coderd: Coderd, key: str, since: int = 0) -> tuple[int, re.Match[str]]:
    index, _ = coderd.waitForLine(rf"agent metadata {key}: ", since=since)
    m = METADATA.search(coderd.lines[index].rstrip("\n"))
    assert m is not None, coderd.lines[index]
    return index, m


def test_metadata_with_a_1s_interval_keeps_changing(reporting: Reporting) -> None:
    coderd = reporting.coderd
    index, first = _metadata(coderd, "clock")
    _, second = _metadata(coderd, "clock", since=index + 1)
    assert json.loads(first["error"]) == json.loads(second["error"]) == ""
    assert int(json.loads(first["value"])) < int(json.loads(second["value"]))


def test_a_metadata_script_that_hangs_is_cut_at_its_timeout(reporting: Reporting) -> None:
    _, hang = _metadata(reporting.coderd, "hang")
    assert json.loads(hang["value"]) == "before\n"
    assert json.loads(hang["error"]) == "run cmd: signal: killed\ncontext deadline exceeded"


def test_2_mib_of_metadata_output_is_cut_to_10_kib(reporting: Reporting) -> None:
    _, big = _metadata(reporting.coderd, "big")
    assert big["size"] == "10240"
    assert json.loads(big["error"]) == f"run cmd: output truncated from {BIG} to 10240 bytes"
    assert json.loads(big["value"]) == "x" * 80  # what the line shows of it


# -- resources monitoring ---------------------------------------------------------------


def test_memory_and_volume_datapoints_arrive_with_plausible_numbers(
    reporting: Reporting,
) -> None:
    line = reporting.coderd.waitForLog(
        r"agent resources: datapoints=2 memory_used=(?P<mu>\d+) memory_total=(?P<mt>\d+) "
        r"volume=(?P<path>\S+) used=(?P<vu>\d+) total=(?P<vt>\d+)$"
    )
    used, total = int(line["mu"]), int(line["mt"])
    assert 16 * MiB < used < total
    with open("/proc/meminfo") as f:
        host = int(f.readline().split()[1]) * 1024
    assert total <= host
    assert line["path"] == str(reporting.work)
    st = os.statvfs(reporting.work)
    assert int(line["vt"]) == st.f_blocks * st.f_frsize
    assert 0 < int(line["vu"]) <= int(line["vt"])


# -- app health -------------------------------------------------------------------------


def test_an_app_that_stops_answering_well_turns_unhealthy_after_its_threshold(
    reporting: Reporting,
) -> None:
    coderd, app = reporting.coderd, reporting.app
    index, _ = coderd.waitForLine(r"agent app health: web HEALTHY$")
    with app.lock:
        app.status = 503
    index, _ = coderd.waitForLine(r"agent app health: web UNHEALTHY$", since=index + 1)
    with app.lock:
        failures = app.answered.get(503, 0)
    # Upstream's rule: THRESHOLD failures are counted, the next one turns it (exactly
    # so in the unit tests); the report goes within a second, while probes go on.
    assert THRESHOLD + 1 <= failures <= THRESHOLD + 3
    with app.lock:
        app.status = 200
    coderd.waitForLog(r"agent app health: web HEALTHY$", since=index + 1)


# -- what the agent says about itself -----------------------------------------------------


def test_health_and_status_say_what_coderd_hears(reporting: Reporting) -> None:
    coderd, agent = reporting.coderd, reporting.agent
    debug = listening(agent, "debug server")
    _mark(coderd)  # a stats report has been accepted
    code, _, text = get(debug + "/health")
    assert code == 200
    health = json.loads(text)
    assert health["status"] == "ok" and "problems" not in health
    assert health["coderd"]["connected"] is True and health["coderd"]["lifecycle"] == "READY"
    assert 0 <= health["coderd"]["last_stats_report_seconds_ago"] < 5
    assert health["ssh"]["serving"] is True
    reports = health["reporting"]
    assert reports["stats"]["interval_seconds"] == 1.0 and reports["stats"]["reports"] >= 1
    assert reports["connection_log"]["dropped"] == 0
    assert reports["resources"]["memory"] is True
    assert reports["apps"]["web"] in ("HEALTHY", "UNHEALTHY")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coderagent.control.cli",
            "status",
            "--socket",
            str(reporting.work / "control.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        env=agentEnvironment(reporting.work),
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["status"] == "ok" and status["coderd"]["lifecycle"] == "READY"
    assert status["coderd"]["last_stats_report_seconds_ago"] is not None
