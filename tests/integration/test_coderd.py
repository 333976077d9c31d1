# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The agent and ``twistd coderd-dev`` as two real processes, as the README runs them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from coderagent.coderd.client import CoderdClient
from coderagent.coderd.drpc import DRPCError
from coderagent.pb import agent_pb2
from tests.agentproc import (
    ClientKeys,
    runningAgent,
    runningCoderd,
    spawnCoderd,
    ssh,
    sshOptions,
)

CONNECTED = re.compile(r"\[info\]  coderagent\.coderd\.client: connected to coderd at ")
DISCONNECTED = re.compile(r"coderagent\.coderd\.client: disconnected from coderd")


def test_the_agent_connects_reports_and_sends_its_headers(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningCoderd(tmp_path / "coderd", token="s3cret") as coderd:
        args = [
            f"--agent-url={coderd.url}",
            "--agent-token=s3cret",
            "--agent-header=X-Static=one",
            "--agent-header-command=echo X-From-Command=$CODER_URL",
        ]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            agent.waitForLog(CONNECTED)
            agent.waitForLog("manifest received: agent main of workspace developer/dev")
            coderd.waitForLog(
                f"agent connected from 127.0.0.1:\\d+ with headers x-static=one, "
                f"x-from-command={re.escape(coderd.url)}"
            )
            coderd.waitForLog(r"agent startup: version 0\.1\.0, directory ")
            coderd.waitForLog("agent lifecycle: STARTING")
            coderd.waitForLog("agent lifecycle: READY")
            assert "s3cret" not in agent.log() + coderd.log()
        # A graceful stop tells coderd.
        coderd.waitForLog("agent lifecycle: SHUTTING_DOWN")
        coderd.waitForLog("agent lifecycle: OFF")


def test_a_wrong_token_is_refused_and_ssh_is_served_regardless(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningCoderd(tmp_path / "coderd", token="right") as coderd:
        args = [f"--agent-url={coderd.url}", "--agent-token=wrong"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            agent.waitForLog(
                "cannot connect to coderd at .*: websocket upgrade refused: HTTP 401: "
                r'\{"message": "Workspace agent not authorized\."\}; retrying in '
            )
            coderd.waitForLog("refused agent connection from 127.0.0.1:\\d+: bad or missing token")
            result = ssh(agent, clientKeys.key, "echo still here")
            assert (result.returncode, result.stdout) == (0, b"still here\n")


def test_coderd_killed_and_restarted_ten_times_leaves_ssh_alone(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    coderd = spawnCoderd(tmp_path / "coderd", "tok")
    port = coderd.port
    args = [f"--agent-url={coderd.url}", "--agent-token=tok"]
    try:
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            agent.waitForLog(CONNECTED)
            session = subprocess.Popen(
                ["ssh", *sshOptions(agent, clientKeys.key), f"coder@{agent.host}", "cat"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert session.stdin is not None and session.stdout is not None
            try:
                for round in range(10):
                    coderd.process.send_signal(signal.SIGKILL)
                    coderd.process.wait(30)
                    agent.waitForCount(DISCONNECTED, round + 1)
                    line = f"round {round}\n".encode()
                    session.stdin.write(line)
                    session.stdin.flush()
                    assert session.stdout.readline() == line  # SSH unaffected
                    coderd = spawnCoderd(tmp_path / f"coderd{round}", "tok", port=port)
                    agent.waitForCount(CONNECTED, round + 2)
                session.stdin.close()
                assert session.wait(30) == 0
            finally:
                session.kill()
            # Each outage was bridged with upstream's backoff, from the bottom:
            # 161.8 ms after the loss, then growing by phi while refused.
            log = agent.log()
            assert re.findall(r"reconnecting to coderd in ([0-9.]+)s", log) == ["0.162"] * 10
            retries = [float(r) for r in re.findall(r"refused\.; retrying in ([0-9.]+)s", log)]
            assert set(retries) <= {0.262, 0.424, 0.685, 1.11, 1.79}
    finally:
        coderd.stop()


@pytest_twisted.ensureDeferred
async def test_coderd_dev_writes_boundary_logs_as_coderd_does(tmp_path: Path) -> None:
    from twisted.internet import reactor

    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "owner_username": "alice",
                "workspace_name": "ws",
                "agent_name": "main",
                "workspace_id": "22222222-2222-2222-2222-222222222222",
                "template_id": "33333333-3333-3333-3333-333333333333",
                "template_version_id": "44444444-4444-4444-4444-444444444444",
            }
        )
    )
    coderd = spawnCoderd(tmp_path / "coderd", "tok", extra=[f"--manifest={manifest}"])
    client = CoderdClient(url=coderd.url, token="tok", reactor=reactor)
    client.startService()
    try:
        allowed = agent_pb2.BoundaryLog(
            allowed=True,
            sequence_number=7,
            http_request=agent_pb2.BoundaryLog.HttpRequest(
                method="GET", url="https://example.com/x y", matched_rule="*.example.com"
            ),
        )
        allowed.time.FromNanoseconds(1767366245_120000000)
        denied = agent_pb2.BoundaryLog(
            allowed=False,
            sequence_number=8,
            http_request=agent_pb2.BoundaryLog.HttpRequest(method="POST", url="https://evil.test/"),
        )
        request = agent_pb2.ReportBoundaryLogsRequest(
            session_id="s-1", confined_process_name="claude", logs=[allowed, denied]
        )
        await client.call("ReportBoundaryLogs", request, timeout=30)
        with pytest.raises(DRPCError, match="batch size 1001 exceeds maximum of 1000"):
            await client.call(
                "ReportBoundaryLogs",
                agent_pb2.ReportBoundaryLogsRequest(logs=[denied] * 1001),
                timeout=30,
            )
    finally:
        await client.stopService()
        coderd.stop()
    ids = (
        "workspace_id=22222222-2222-2222-2222-222222222222  "
        "template_id=33333333-3333-3333-3333-333333333333  "
        "template_version_id=44444444-4444-4444-4444-444444444444"
    )
    prefix = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[info\]  coderd\.agentrpc: boundary_request  "
    owner = "owner=alice  workspace_name=ws  agent_name=main"
    lines = coderd.log().splitlines()
    assert any(
        re.fullmatch(
            prefix
            + re.escape(
                f"{owner}  decision=allow  session_id=s-1  sequence_number=7  {ids}  "
                'http_method=GET  http_url="https://example.com/x y"  '
                "event_time=2026-01-02T15:04:05.12Z  matched_rule=*.example.com"
            ),
            line,
        )
        for line in lines
    ), lines
    assert any(
        re.fullmatch(
            prefix
            + re.escape(f"{owner}  decision=deny  session_id=s-1  sequence_number=8  {ids}  ")
            + r"http_method=POST  http_url=https://evil\.test/  event_time=\S+Z",
            line,
        )
        for line in lines
    ), lines
    assert sum("boundary_request" in line for line in lines) == 2  # the 1001 were refused
