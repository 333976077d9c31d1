"""What an operator sees: metrics, debug and profiling servers, log sinks, reaper, shutdown."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from coderagent.reaper import INTERVAL
from tests.agentproc import (
    REPO,
    Agent,
    ClientKeys,
    agentArgs,
    agentEnvironment,
    runningAgent,
    runningCoderd,
    spawnAgent,
    ssh,
    sshOptions,
)
from tests.integration.test_forwarding import clientOptions


def listening(agent: Agent, what: str) -> str:
    port = agent.waitForLog(rf"{what} listening on 127\.0\.0\.1:(\d+)").group(1)
    return f"http://127.0.0.1:{port}"


def get(url: str, timeout: float = 30) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_sessions_refusals_and_blocks(clientKeys: ClientKeys, tmp_path: Path) -> None:
    flags = ["--block-file-transfer", "--block-local-port-forwarding"]
    with runningAgent(clientKeys, tmp_path, flags) as agent:
        metrics = listening(agent, "Prometheus metrics") + "/metrics"
        assert ssh(agent, clientKeys.key, "true").returncode == 0
        assert ssh(agent, clientKeys.key, "tty", options=["-tt"]).returncode == 0
        typed = ssh(
            agent,
            clientKeys.key,
            "true",
            options=["-o", "SendEnv=CODER_SSH_SESSION_TYPE"],
            env={**os.environ, "CODER_SSH_SESSION_TYPE": "vscode"},
        )
        assert typed.returncode == 0
        assert ssh(agent, clientKeys.key, "rsync --version").returncode == 65
        blocked = subprocess.run(
            [
                "sftp",
                "-b",
                "-",
                *sshOptions(agent, clientKeys.key)[:-2],
                "-P",
                str(agent.port),
                f"coder@{agent.host}",
            ],
            input=b"ls\n",
            capture_output=True,
            timeout=60,
        )
        assert blocked.returncode != 0
        refused = subprocess.run(
            [
                "ssh",
                *clientOptions(agent, clientKeys.key),
                "-W",
                "127.0.0.1:9",
                f"coder@{agent.host}",
            ],
            capture_output=True,
            timeout=60,
        )
        assert b"administratively prohibited" in refused.stderr
        wrong = ssh(agent, clientKeys.otherKey, "true")
        assert wrong.returncode == 255
        status, contentType, text = get(metrics)
    assert status == 200 and contentType.startswith("text/plain")
    m = samples(text)
    assert m['agent_sessions_total{magic_type="ssh",pty="no"}'] >= 2  # true, rsync
    assert m['agent_sessions_total{magic_type="ssh",pty="yes"}'] == 1
    assert m['agent_sessions_total{magic_type="vscode",pty="no"}'] == 1
    assert m['agent_ssh_file_transfers_blocked_total{kind="exec"}'] == 1
    assert m['agent_ssh_file_transfers_blocked_total{kind="sftp"}'] == 1
    assert m['agent_ssh_forwarding_refused_total{direction="local",transport="tcp"}'] == 1
    assert m['agent_ssh_forwarding_refused_total{direction="reverse",transport="tcp"}'] == 0
    assert m["agent_ssh_server_failed_connections_total"] >= 1  # the wrong key
    assert m["agent_ssh_server_sftp_connections_total"] == 0  # refused before it started
    assert m["agent_boundary_log_proxy_spooled_batches"] == 0
    assert m["process_cpu_seconds_total"] > 0


def test_the_three_log_formats_and_the_log_file_carry_the_same_event(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    js, sd = tmp_path / "agent.json", tmp_path / "agent.sd"
    flags = [f"--log-json={js}", f"--log-stackdriver={sd}"]  # and --log-human=/dev/stderr
    with runningAgent(clientKeys, tmp_path / "agent", flags) as agent:
        assert ssh(agent, clientKeys.key, "true").returncode == 0
    logDir = tmp_path / "agent" / "data"
    humanLines = agent.log().splitlines()
    jsonLines = [json.loads(line) for line in js.read_text().splitlines()]
    sdLines = [json.loads(line) for line in sd.read_text().splitlines()]
    fileLines = (logDir / "coder-agent.log").read_text().splitlines()
    event = next(j for j in jsonLines if j["msg"].startswith("SSH server listening on "))
    assert event["level"] == "INFO" and event["logger"] == "coderagent.listening"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["ts"])
    assert event["fields"]["what"] == "SSH server"
    same = next(s for s in sdLines if s["message"] == event["msg"])
    assert same["severity"] == "INFO" and same["timestamp"] == event["ts"]
    assert same["logging.googleapis.com/operation"] == {"producer": "coderagent.listening"}
    assert same["what"] == "SSH server"
    line = f"[info]  coderagent.listening: {event['msg']}"
    assert any(h.endswith(line) for h in humanLines)
    assert any(f.endswith(line) for f in fileLines)
    # Every JSON line is an event of the stream the human lines show.
    assert len(jsonLines) == len(sdLines) and len(jsonLines) >= 5
    # Conch's per-channel chatter reaches no sink.
    for lines in (humanLines, fileLines, [j["msg"] for j in jsonLines]):
        assert not any("starting service" in x or "channel open" in x.lower() for x in lines)
    assert oct((logDir / "coder-agent.log").stat().st_mode & 0o777) == "0o600"


def test_debug_server_health_manifest_ssh_and_logs(clientKeys: ClientKeys, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    variables = {"API_TOKEN": "s3cret", "EDITOR": "vi"}
    manifest.write_text(json.dumps({"agent_name": "main", "environment_variables": variables}))
    with runningCoderd(
        tmp_path / "coderd", token="tok", extra=[f"--manifest={manifest}"]
    ) as coderd:
        flags = [f"--agent-url={coderd.url}", "--agent-token=tok", "--debug-address=127.0.0.1:0"]
        with runningAgent(clientKeys, tmp_path / "agent", flags) as agent:
            debug = listening(agent, "debug server")
            agent.waitForLog("manifest received")
            session = subprocess.Popen(
                ["ssh", *sshOptions(agent, clientKeys.key), f"coder@{agent.host}", "cat"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                assert session.stdin is not None and session.stdout is not None
                session.stdin.write(b"hi\n")
                session.stdin.flush()
                assert session.stdout.readline() == b"hi\n"  # the session is up
                status, _, health = get(debug + "/health")
                assert status == 200
                h = json.loads(health)
                assert h["status"] == "ok" and h["coderd"]["connected"] is True
                assert h["coderd"]["lifecycle"] == "READY"
                assert h["ssh"]["connections"] == 1 and h["boundary"]["serving"] is True
                _, _, text = get(debug + "/manifest")
                m = json.loads(text)
                assert m["environment_variables"] == {"API_TOKEN": "<redacted>", "EDITOR": "vi"}
                assert "s3cret" not in text
                _, _, text = get(debug + "/ssh")
                [conn] = json.loads(text)["connections"]
                assert conn["authenticated"] and conn["user"] == "coder"
                assert conn["client"].startswith("SSH-2.0-OpenSSH")
                assert [c["command"] for c in conn["channels"]] == ["cat"]
                _, contentType, logs = get(debug + "/logs")
                assert contentType.startswith("text/plain") and "SSH server listening on" in logs
            finally:
                session.kill()
                session.wait()


def test_the_profiler_dumps_threads_and_profiles_the_reactor(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningAgent(clientKeys, tmp_path, ["--pprof-address=127.0.0.1:0"]) as agent:
        pprof = listening(agent, "profiling server")
        status, _, threads = get(pprof + "/debug/pprof/threads")
        assert status == 200 and "thread MainThread" in threads and "mainLoop" in threads
        status, _, profile = get(pprof + "/debug/pprof/profile?seconds=0.5")
        assert status == 200 and "cProfile of the reactor thread for 0.5s" in profile
        assert "cumulative" in profile
        status, _, _ = get(pprof + "/debug/pprof/profile?seconds=600")
        assert status == 400
    with runningAgent(clientKeys, tmp_path / "exposed", ["--pprof-address=0.0.0.0:0"]) as agent:
        agent.waitForLog(r"not serving profiling data on 0\.0\.0\.0:0: loopback only")


def test_the_control_socket_answers_status(clientKeys: ClientKeys, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    flags = ["--socket-server-enabled", f"--socket-path={path}"]
    with runningAgent(clientKeys, tmp_path / "agent", flags) as agent:
        agent.waitForLog("control socket listening on")
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        done = subprocess.run(
            [sys.executable, "-m", "coderagent.control.cli", "status", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env=agentEnvironment(tmp_path),
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["version"] == "0.1.0" and report["pid"] == agent.process.pid
        assert report["coderd"]["url"] == "http://127.0.0.1:9" and not report["coderd"]["connected"]
        assert report["ssh"] == {"serving": True, "connections": 0}
        assert report["status"] == "ok"
    assert not path.exists()
    nobody = subprocess.run(
        [sys.executable, "-m", "coderagent.control.cli", "ping", "--socket", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=agentEnvironment(tmp_path),
    )
    assert nobody.returncode == 1 and "no agent answered" in nobody.stderr


def test_sigterm_with_an_open_session_exits_0_and_the_client_is_told(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    with runningAgent(clientKeys, tmp_path) as agent:
        session = subprocess.Popen(
            [
                "ssh",
                *sshOptions(agent, clientKeys.key),
                "-o",
                "LogLevel=INFO",
                f"coder@{agent.host}",
                "cat",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert session.stdin is not None and session.stdout is not None
        session.stdin.write(b"up\n")
        session.stdin.flush()
        assert session.stdout.readline() == b"up\n"
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0
        _, stderr = session.communicate(timeout=30)
        assert session.returncode == 255
        assert b"the agent is shutting down" in stderr


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent, command) of ``pid``, or None once it is gone (reaped)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    head, tail = raw.rsplit(b")", 1)
    fields = tail.split()
    return fields[0].decode(), int(fields[1]), head.split(b"(", 1)[1].decode()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[1] == pid:
            out.append(int(entry))
    return out


def _waitFor(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Poll /proc; the kernel announces no event for a process becoming a zombie."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _unshare() -> list[str]:
    """unshare(1)'s command line for a fresh PID namespace, where the agent is PID 1.

    The only skips in the suite, and only for what the machine lacks: a
    kernel with PID namespaces (Linux), util-linux's unshare(1), or the
    privilege to create the namespace (containers often withhold it).
    """
    if not sys.platform.startswith("linux"):
        pytest.skip(f"PID namespaces are Linux only (this is {sys.platform})")
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) from util-linux is not on PATH")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(
            "this machine does not let us create a PID namespace "
            f"(unshare --pid --fork --mount-proc: {probe.stderr.decode().strip()})"
        )
    return ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


@pytest.mark.parametrize("reap", [True, False], ids=["reap", "no-reap"])
def test_as_pid_1_orphans_are_reaped_unless_no_reap(
    clientKeys: ClientKeys, tmp_path: Path, reap: bool
) -> None:
    wrapper = _unshare()
    args = agentArgs(clientKeys, tmp_path / "data", [] if reap else ["--no-reap"])
    proc = spawnAgent(args, agentEnvironment(tmp_path), prefix=wrapper)
    agent = Agent(proc, home=tmp_path)
    agent.startReading()
    try:
        m = agent.waitForLog(r"SSH server listening on (\S+):(\d+)")
        agent.host, agent.port = m.group(1), int(m.group(2))
        agent.waitForLog("running as PID 1: reaping" if reap else "running as PID 1 with --no-reap")
        [pid1] = _children(proc.pid)  # unshare's child is PID 1 inside the namespace
        # The session's shell leaves a sleep behind and exits: the sleep is
        # re-parented to PID 1, the agent.
        assert ssh(agent, clientKeys.key, "sh -c 'sleep 2 & exit 0'").returncode == 0

        def sleeps() -> list[int]:
            return [p for p in _children(pid1) if (_stat(p) or ("", 0, ""))[2] == "sleep"]

        _waitFor(lambda: len(sleeps()) == 1, "the orphaned sleep belongs to PID 1")
        [orphan] = sleeps()
        if reap:
            _waitFor(lambda: _stat(orphan) is None, "the orphan is reaped once it exits")
        else:
            _waitFor(lambda: (_stat(orphan) or ("",))[0] == "Z", "the orphan exits")
            time.sleep(3 * INTERVAL)  # several reaping rounds, were there any
            assert (_stat(orphan) or ("",))[0] == "Z"  # still a zombie: nobody waits for it
        # SIGTERM to PID 1 is a graceful shutdown too.
        os.kill(pid1, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        agent.stop()
