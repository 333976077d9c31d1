"""Boundary audit logs end to end: writer process, agent, coderd-dev, all real processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from coderagent.boundary.codec import TAG_V1, TAG_V2, encodeFrame
from coderagent.pb import agent_pb2
from tests.agentproc import REPO, Agent, ClientKeys, Coderd, runningAgent, spawnCoderd, ssh
from tests.boundaryframes import exactFrame

SESSION = "0b6f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1c"
IDS = {
    "workspace_id": "22222222-2222-2222-2222-222222222222",
    "template_id": "33333333-3333-3333-3333-333333333333",
    "template_version_id": "44444444-4444-4444-4444-444444444444",
}
LINE = re.compile(
    r"\[info\]  coderd\.agentrpc: boundary_request  .*session_id=(\S+)  sequence_number=(\d+)  "
)
METRICS = re.compile(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+)")
COMMIT = 0.1  # --boundary-log-commit-interval used below


def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(
        json.dumps({**IDS, "owner_username": "alice", "workspace_name": "ws", "agent_name": "main"})
    )
    return path


def coderd(tmp_path: Path, port: int = 0) -> Coderd:
    return spawnCoderd(
        tmp_path / f"coderd-{port}", "tok", port=port, extra=[f"--manifest={manifest(tmp_path)}"]
    )


def agentArgs(coderd: Coderd, *extra: str) -> list[str]:
    return [
        f"--agent-url=http://127.0.0.1:{coderd.port}",
        "--agent-token=tok",
        f"--boundary-log-commit-interval={int(COMMIT * 1000)}ms",
        *extra,
    ]


def socketOf(agent: Agent) -> str:
    return agent.waitForLog(r"boundary log proxy listening on (\S+)").group(1)


def write(agent: Agent, logs: int, *args: str, session: str = SESSION) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.boundarywriter",
            "--socket",
            socketOf(agent),
            "--session",
            session,
            "--logs",
            str(logs),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def sequences(server: Coderd, session: str = SESSION) -> list[int]:
    return [
        int(m.group(2))
        for line in server.log().splitlines()
        if (m := LINE.search(line)) and m.group(1) == session
    ]


def metric(agent: Agent, name: str) -> float:
    port = agent.waitForLog(METRICS).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def eventually(condition: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` (a /metrics scrape) until it holds; the agent has no event for it."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_a_writer_process_v1_and_v2_reach_coderd_with_every_field(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    server = coderd(tmp_path)
    try:
        with runningAgent(clientKeys, tmp_path / "agent", agentArgs(server)) as agent:
            write(agent, 30, "--tag", "1", "--per-frame", "7")
            write(agent, 30, "--tag", "2", "--first", "30", "--session", "second-session")
            server.waitForCount(LINE, 60)
            lines = [line for line in server.log().splitlines() if "boundary_request" in line]
            allowed = next(
                line for line in lines if f"session_id={SESSION}  sequence_number=1  " in line
            )
            assert allowed.endswith(
                "coderd.agentrpc: boundary_request  owner=alice  workspace_name=ws  "
                f"agent_name=main  decision=allow  session_id={SESSION}  sequence_number=1  "
                f"workspace_id={IDS['workspace_id']}  template_id={IDS['template_id']}  "
                f"template_version_id={IDS['template_version_id']}  http_method=GET  "
                f"http_url=https://example.com/{SESSION}/1  event_time=2026-01-02T15:04:05.001Z  "
                "matched_rule=*.example.com"
            )
            denied = next(
                line for line in lines if "session_id=second-session  sequence_number=33  " in line
            )
            assert "decision=deny" in denied and "matched_rule" not in denied
            assert sequences(server) == list(range(30))
            assert sequences(server, "second-session") == list(range(30, 60))
            # Sessions are told where the socket is and which workspace they are in.
            env = ssh(agent, clientKeys.key, "echo $CODER_BOUNDARY_LOG_SOCKET $CODER_WORKSPACE_ID")
            assert env.stdout.decode().split() == [socketOf(agent), IDS["workspace_id"]]
            assert metric(agent, "agent_boundary_log_proxy_batches_forwarded_total") >= 2
    finally:
        server.stop()


def test_coderd_down_for_30s_while_10000_logs_are_written(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    server = coderd(tmp_path)
    port = server.port
    try:
        with runningAgent(clientKeys, tmp_path / "agent", agentArgs(server)) as agent:
            agent.waitForLog("connected to coderd")
            server.stop()
            outage = time.monotonic()
            for burst in range(10):  # written while coderd is away
                write(agent, 1000, "--first", str(burst * 1000), "--per-frame", "10")
            eventually(
                lambda: metric(agent, "agent_boundary_log_proxy_spooled_logs") == 10000,
                "the agent accepted the 10000 logs",
            )
            time.sleep(max(0.0, 30 - (time.monotonic() - outage)))  # the rest of the outage
            server = coderd(tmp_path, port=port)
            server.waitForCount(LINE, 10000, timeout=120)
            assert sequences(server) == list(range(10000))  # all of them, in order
            assert metric(agent, "agent_boundary_log_proxy_logs_dropped_total") == 0
    finally:
        server.stop()


def test_a_kill_loses_nothing_written_a_commit_interval_before(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    server = coderd(tmp_path)
    port = server.port
    server.stop()  # coderd is down the whole time the first agent runs
    args = agentArgs(server)
    with runningAgent(clientKeys, tmp_path / "agent", args) as first:
        write(first, 5000, "--per-frame", "25")
        # Accepted...
        eventually(
            lambda: metric(first, "agent_boundary_log_proxy_spooled_logs") == 5000,
            "the agent accepted the 5000 logs",
        )
        # ...and more than one group-commit interval ago: that is the guarantee.
        time.sleep(2 * COMMIT)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
    server = coderd(tmp_path, port=port)
    try:
        with runningAgent(clientKeys, tmp_path / "agent", args) as second:
            second.waitForLog("5000 logs\\) from before the restart are waiting for coderd")
            server.waitForCount(LINE, 5000, timeout=60)
            assert sequences(server) == list(range(5000))
    finally:
        server.stop()


def test_a_spool_smaller_than_the_backlog_drops_the_oldest_and_counts_them(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    server = coderd(tmp_path)
    port = server.port
    server.stop()
    args = agentArgs(server, "--boundary-log-spool-max-bytes=64KiB")
    try:
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            write(agent, 20000, "--per-frame", "20")
            eventually(
                lambda: (
                    metric(agent, "agent_boundary_log_proxy_spooled_logs")
                    + metric(agent, "agent_boundary_log_proxy_logs_dropped_total")
                    == 20000
                ),
                "every log spooled or dropped",
            )
            dropped = metric(agent, "agent_boundary_log_proxy_logs_dropped_total")
            spooled = metric(agent, "agent_boundary_log_proxy_spooled_logs")
            assert 0 < dropped < 20000 and dropped + spooled == 20000
            assert agent.waitForLog(r"boundary spool is full \(65536 bytes\): dropped the oldest")
            server = coderd(tmp_path, port=port)
            server.waitForCount(LINE, int(spooled), timeout=60)
            got = sequences(server)
            # The newest, in order; before them, at most the one batch that was
            # already on its way to coderd when the spool filled (never counted
            # as dropped, since it is delivered).
            assert len(got) + dropped == 20000
            onItsWay = next(i for i, seq in enumerate(got) if seq != i)
            assert onItsWay <= 1000
            assert got == list(range(onItsWay)) + list(range(onItsWay + int(dropped), 20000))
            assert metric(agent, "agent_boundary_log_proxy_batches_dropped_total") == dropped / 20
    finally:
        server.stop()


def longFrames() -> list[tuple[agent_pb2.ReportBoundaryLogsRequest, bytes]]:
    """A full 32768-byte frame (V1 and V2) whose process name takes most of it, and frames
    whose session id or process name is over 20 000 bytes."""
    out = [exactFrame(f"0b6f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1{tag}", tag) for tag in (TAG_V1, TAG_V2)]
    for session, process in (("s" * 20_500, "claude"), ("long-process", "p" * 21_000)):
        request = agent_pb2.ReportBoundaryLogsRequest(
            session_id=session, confined_process_name=process
        )
        entry = request.logs.add(allowed=False, sequence_number=7)
        entry.http_request.method = "GET"
        entry.http_request.url = "https://example.com/denied"
        out.append((request, encodeFrame(TAG_V1, request.SerializeToString())))
    return out


def sendFrames(agent: Agent, frames: list[bytes]) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(socketOf(agent))
        for frame in frames:
            s.sendall(frame)


def sessionLine(request: agent_pb2.ReportBoundaryLogsRequest) -> str:
    return (
        f"coderd-dev: boundary_session  session_id={request.session_id}  "
        f"confined_process_name={request.confined_process_name}\n"
    )


def test_full_size_frames_and_20k_names_reach_coderd_whole_even_after_a_restart(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    frames = longFrames()
    assert len(frames[0][1]) == 4 + 32768
    server = coderd(tmp_path)
    port = server.port
    try:
        with runningAgent(clientKeys, tmp_path / "agent", agentArgs(server)) as agent:
            sendFrames(agent, [data for _, data in frames[:2]])
            server.waitForCount("boundary_request  ", 2)
        log = server.log()
        for request, _ in frames[:2]:
            assert sessionLine(request) in log  # the whole process name, every byte
            assert len(request.confined_process_name) > 32_000
        server.stop()
        # coderd is down: the agent keeps the frames on disk across a restart.
        args = agentArgs(server)
        with runningAgent(clientKeys, tmp_path / "agent", args) as first:
            sendFrames(first, [data for _, data in frames[2:]])
            eventually(
                lambda: metric(first, "agent_boundary_log_proxy_spooled_logs") == 2,
                "the agent accepted both frames",
            )
        server = coderd(tmp_path, port=port)
        with runningAgent(clientKeys, tmp_path / "agent", args) as second:
            second.waitForLog(r"2 batches \(2 logs\) from before the restart")
            server.waitForCount("boundary_request  ", 2)
        log = server.log()
        for request, _ in frames[2:]:
            assert sessionLine(request) in log
        assert f"session_id={'s' * 20_500}  sequence_number=7  " in log
    finally:
        server.stop()
