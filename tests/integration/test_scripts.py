"""``coder_script`` end to end: real agent, real scripts, coderd-dev as coderd, real ``ssh``."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.agentproc import ClientKeys, runningAgent, runningCoderd, ssh
from tests.integration.test_operability import get, listening, samples

SOURCES = {
    "slow": "10000000-0000-4000-8000-000000000001",
    "fast": "10000000-0000-4000-8000-000000000002",
    "fails": "10000000-0000-4000-8000-000000000003",
    "times out": "10000000-0000-4000-8000-000000000004",
    "stop": "10000000-0000-4000-8000-000000000005",
    "tick": "10000000-0000-4000-8000-000000000006",
}
IDS = {name: f"20000000-0000-4000-8000-00000000000{i}" for i, name in enumerate(SOURCES, 1)}


def script(name: str, body: str, **fields: Any) -> dict[str, Any]:
    return {
        "display_name": name,
        "log_source_id": SOURCES[name],
        "id": IDS[name],
        "script": body,
        **fields,
    }


TEMPLATE = [
    script("slow", "echo slow-start; sleep 1.5; echo slow-end", run_on_start=True),
    script(
        "fast",
        "#!/bin/sh\necho one; echo two; echo to-stderr >&2; printf 'no newline'",
        run_on_start=True,
        log_path="fast.log",
    ),
    script("fails", "echo failing; exit 3", run_on_start=True),
    script("times out", "echo waiting; sleep 30", run_on_start=True, timeout="1s"),
    script("stop", "echo stopping; sleep 2; echo stopped", run_on_stop=True),
    script("tick", 'echo "tick $CODER_SCRIPT_DATA_DIR"', cron="*/2 * * * * *"),
]


def run(tmp_path: Path, clientKeys: ClientKeys, scripts: list[dict[str, Any]]) -> dict[str, Any]:
    """Start coderd-dev and the agent, let the workspace start, see two cron runs, then
    stop the agent (SIGTERM) and coderd-dev; return coderd-dev's final state."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"scripts": scripts}))
    state = tmp_path / "state.json"
    extra = [f"--manifest={manifest}", f"--state-file={state}"]
    with runningCoderd(tmp_path / "coderd", token="tok", extra=extra) as coderd:
        args = [f"--agent-url={coderd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            coderd.waitForLog(r"agent lifecycle: (READY|START_ERROR|START_TIMEOUT)")
            coderd.waitForCount(r"script_completed  script=tick  stage=CRON  status=OK", 2)
            # SSH was served all along; it still is.
            assert ssh(agent, clientKeys.key, "true").returncode == 0
        assert agent.process.returncode == 0
        coderd.waitForLog("agent lifecycle: OFF")
    return dict(json.loads(state.read_text()))


def lines(state: dict[str, Any], name: str) -> list[tuple[str, str]]:
    source = state["logs"][SOURCES[name]]
    assert source["name"] == name
    return [(line["level"], line["output"]) for line in source["lines"]]


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def timings(state: dict[str, Any], name: str) -> list[tuple[str, str, int]]:
    return [
        (t["stage"], t["status"], t["exit_code"]) for t in state["timings"] if t["script"] == name
    ]


def test_a_template_starts_reports_and_stops(clientKeys: ClientKeys, tmp_path: Path) -> None:
    state = run(tmp_path, clientKeys, TEMPLATE)
    # The first script to fail failed (the timeout came later): START_ERROR.
    assert state["lifecycle"] == ["STARTING", "START_ERROR", "SHUTTING_DOWN", "OFF"]

    assert lines(state, "slow") == [("info", "slow-start"), ("info", "slow-end")]
    fast = lines(state, "fast")
    assert [o for lvl, o in fast if lvl == "info"] == ["one", "two", "no newline"]
    assert [o for lvl, o in fast if lvl == "error"] == ["to-stderr"]
    assert lines(state, "fails") == [("info", "failing")]
    assert lines(state, "times out") == [("info", "waiting")]
    assert lines(state, "stop") == [("info", "stopping"), ("info", "stopped")]
    data = tmp_path / "agent" / "data" / "coder-script-data" / SOURCES["tick"]
    assert set(lines(state, "tick")) == {("info", f"tick {data}")}

    assert timings(state, "slow") == [("START", "OK", 0)]
    assert timings(state, "fast") == [("START", "OK", 0)]
    assert timings(state, "fails") == [("START", "EXIT_FAILURE", 3)]
    assert timings(state, "times out") == [("START", "TIMED_OUT", 255)]
    assert timings(state, "stop") == [("STOP", "OK", 0)]
    ticks = timings(state, "tick")
    assert len(ticks) >= 2 and set(ticks) == {("CRON", "OK", 0)}
    # Cron waits for the start scripts.
    start = [t for t in state["timings"] if t["stage"] == "START"]
    cron = [t for t in state["timings"] if t["stage"] == "CRON"]
    assert min(when(t["start"]) for t in cron) >= max(when(t["end"]) for t in start)

    # The log files: upstream's default names in --log-dir, a relative log_path under it.
    logDir = tmp_path / "agent" / "data"
    fastLog = logDir / "fast.log"
    # stdout and stderr reach the file as they are read: whole writes, in either order.
    assert fastLog.read_text().replace("to-stderr\n", "", 1) == "one\ntwo\nno newline"
    slowLog = logDir / f"coder-script-{SOURCES['slow']}.log"
    assert slowLog.read_text() == "slow-start\nslow-end\n"
    stopLog = logDir / f"coder-script-{SOURCES['stop']}.log"
    assert stopLog.read_text() == "stopping\nstopped\n"
    for path in (fastLog, slowLog, stopLog):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_the_same_template_without_its_broken_scripts_is_ready(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    healthy = [s for s in TEMPLATE if s["display_name"] not in ("fails", "times out")]
    state = run(tmp_path, clientKeys, healthy)
    assert state["lifecycle"] == ["STARTING", "READY", "SHUTTING_DOWN", "OFF"]


def test_a_timeout_alone_is_start_timeout(clientKeys: ClientKeys, tmp_path: Path) -> None:
    scripts = [s for s in TEMPLATE if s["display_name"] != "fails"]
    state = run(tmp_path, clientKeys, scripts)
    assert state["lifecycle"] == ["STARTING", "START_TIMEOUT", "SHUTTING_DOWN", "OFF"]


def test_scripts_that_cannot_start_fail_clearly_and_the_agent_runs_on(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    scripts = [
        script("slow", "#!/nonexistent/interpreter\necho never", run_on_start=True),
        script("fast", "#!\necho never", run_on_start=True),
        script("fails", "#!nosuchinterpreter -x\necho never", run_on_start=True),
        script("tick", "echo never", cron="*/2 * * * * * *"),
    ]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"scripts": scripts}))
    state = tmp_path / "state.json"
    extra = [f"--manifest={manifest}", f"--state-file={state}"]
    with runningCoderd(tmp_path / "coderd", token="tok", extra=extra) as coderd:
        args = [f"--agent-url={coderd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            coderd.waitForLog("agent lifecycle: START_ERROR")
            assert ssh(agent, clientKeys.key, "echo alive").stdout == b"alive\n"
    final = json.loads(state.read_text())
    said = {
        final["logs"][SOURCES[name]]["lines"][0]["output"]
        for name in ("slow", "fast", "fails", "tick")
    }
    assert said == {
        "coder-agent: cannot run the script: fork/exec /nonexistent/interpreter: "
        "no such file or directory",
        "coder-agent: cannot run the script: split shebang: the #! line names no interpreter",
        'coder-agent: cannot run the script: exec: "nosuchinterpreter": '
        "executable file not found in $PATH",
        'coder-agent: cannot run the script: invalid cron schedule "*/2 * * * * * *": '
        "expected 5 to 6 fields, found 7: [*/2 * * * * * *]",
    }
    assert {(t["stage"], t["status"], t["exit_code"]) for t in final["timings"]} == {
        ("START", "EXIT_FAILURE", 255),
        ("CRON", "EXIT_FAILURE", 255),
    }
    assert all(t["script"] for t in final["timings"]) and len(final["timings"]) == 4


def test_a_start_script_installs_a_tool_a_later_session_runs_by_name(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    install = (
        'printf "#!/bin/sh\\necho installed tool in \\$PWD\\n" > "$CODER_SCRIPT_BIN_DIR/mytool"\n'
        'chmod +x "$CODER_SCRIPT_BIN_DIR/mytool"\n'
        'echo "PATH=$PATH"'
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"scripts": [script("slow", install, run_on_start=True)], "directory": "/tmp"})
    )
    with runningCoderd(tmp_path / "coderd", token="tok", extra=[f"--manifest={manifest}"]) as cd:
        args = [f"--agent-url={cd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            cd.waitForLog("agent lifecycle: READY")
            binDir = tmp_path / "agent" / "data" / "coder-script-data" / "bin"
            m = cd.waitForLog(r"script_log  source=slow  level=info  output=PATH=(\S+)")
            assert m.group(1).split(os.pathsep)[0] == str(binDir)
            result = ssh(agent, clientKeys.key, "mytool")
            assert (result.returncode, result.stdout) == (0, b"installed tool in /tmp\n")
            # A terminal gets the same PATH (a login shell's /etc/profile may then
            # replace it, as it does under upstream's agent).
            shell = ssh(agent, clientKeys.key, "-tt", 'echo "[$PATH]"')
            assert f"[{binDir}{os.pathsep}".encode() in shell.stdout, shell.stdout


def rss(pid: int) -> int:
    """The process's resident set size, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


LINES = 524288  # of 100 bytes: 50 MiB


def test_a_script_printing_50_mib_keeps_the_agent_small(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    body = f'while [ ! -e {go} ]; do sleep 0.05; done\nseq -f "%099g" 1 {LINES}'
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"scripts": [script("slow", body, run_on_start=True)]}))
    with runningCoderd(tmp_path / "coderd", token="tok", extra=[f"--manifest={manifest}"]) as cd:
        args = [f"--agent-url={cd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            metrics = listening(agent, "Prometheus metrics") + "/metrics"
            cd.waitForLog("agent lifecycle: STARTING")
            assert get(metrics)[0] == 200  # everything the agent will use is loaded
            idle = rss(agent.process.pid)
            peaks = [idle]
            done = threading.Event()

            def sample() -> None:  # every 20 ms until the script has ended: a measurement
                while not done.is_set():
                    peaks.append(rss(agent.process.pid))
                    done.wait(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                go.touch()
                cd.waitForLog(r"script_completed  script=slow  stage=START  status=OK")
            finally:
                done.set()
                sampler.join()
            peak = max([*peaks, rss(agent.process.pid)])
            cd.waitForLog("agent lifecycle: READY")
            # The queue coderd could not take (it is over its limit) is dropped, then counted.
            cd.waitForLog("coderd-dev: script logs overflowed")  # after every line it took
            agent.waitForLog("server log limit exceeded; logs truncated")
            dropped = samples(get(metrics)[2])
        log = (tmp_path / "agent" / "data" / f"coder-script-{SOURCES['slow']}.log").stat()
        assert log.st_size == LINES * 100
        assert peak - idle <= 32 * 1024 * 1024, (idle, peak)
        print(f"agent RSS: {idle / 2**20:.1f} MiB idle, {peak / 2**20:.1f} MiB at most")
        received = [
            int(m.group(1))
            for m in re.finditer(r"script_log  source=slow  level=info  output=(\d+)", cd.log())
        ]
    # coderd-dev took lines up to its limit, in order, from the first one on.
    assert received[0] == 1 and received == sorted(set(received))
    assert 1000 < len(received) and len(received) * 99 <= 1048576
    lost = sum(
        value
        for name, value in dropped.items()
        if name.startswith("agent_scripts_log_lines_dropped_total{")
    )
    assert len(received) + lost == LINES
    assert dropped['agent_scripts_log_lines_dropped_total{reason="limit_exceeded"}'] > 0
    assert agent.log().count("server log limit exceeded; logs truncated") == 1


def test_sigterm_runs_the_stop_script_and_delivers_its_lines_before_leaving(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    stop = script("stop", "echo stopping; sleep 2; echo stopped", run_on_stop=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"scripts": [stop]}))
    state = tmp_path / "state.json"
    extra = [f"--manifest={manifest}", f"--state-file={state}"]
    with runningCoderd(tmp_path / "coderd", token="tok", extra=extra) as coderd:
        args = [f"--agent-url={coderd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            coderd.waitForLog("agent lifecycle: READY")
        assert agent.process.returncode == 0
        coderd.waitForLog(r"agent 127\.0\.0\.1:\d+ disconnected")
        log = coderd.log()
    final = json.loads(state.read_text())
    assert final["lifecycle"] == ["STARTING", "READY", "SHUTTING_DOWN", "OFF"]
    [timing] = final["timings"]
    assert (timing["stage"], timing["status"]) == ("STOP", "OK")
    assert when(timing["end"]) - when(timing["start"]) >= timedelta(seconds=2)
    off = when(final["lifecycle_changed_at"][3])
    assert off >= when(timing["end"])
    assert when(final["lifecycle_changed_at"][2]) <= when(timing["start"])
    # The stop script's lines and timing reached coderd before the agent disconnected.
    order = [
        log.index("output=stopping"),
        log.index("output=stopped"),
        log.index("script_completed  script=stop  stage=STOP  status=OK"),
        log.index("agent lifecycle: OFF"),
    ]
    gone = re.search(r"agent 127\.0\.0\.1:\d+ disconnected", log)
    assert gone is not None and max(order) < gone.start()
    assert order[0] < order[1]
    assert "SSH server" in agent.log()
