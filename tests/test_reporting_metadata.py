# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Metadata: scripts run as upstream runs them, and the reporter's schedule and batches.

The script runner runs real processes in the test's reactor.  The reporter
talks to coderd-dev's real API through the real client, in memory on a
``task.Clock``; its scripts are run by a runner the test answers, so each
run's timing is exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from google.protobuf import duration_pb2
from twisted.internet import defer, reactor

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from coderagent.reporting.command import (
    DEADLINE_EXCEEDED,
    OUTPUT_LIMIT,
    CommandResult,
    CommandRunner,
    descendants,
)
from coderagent.reporting.metadata import MetadataReporter, scriptTimeout
from tests.localcoderd import InMemoryCoderd

Description = agent_pb2.WorkspaceAgentMetadata.Description
TIMEOUT = 30


def runner(tmp_path: Path, **environment: str) -> CommandRunner:
    return CommandRunner(
        reactor=reactor,
        shell="/bin/sh",
        home=str(tmp_path),
        environment=lambda: {"PATH": os.environ["PATH"], **environment},
    )


# -- the script runner ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_script_runs_in_the_shell_with_the_environment_given(tmp_path: Path) -> None:
    result = await runner(tmp_path, GREETING="hi").run("echo $GREETING; pwd; echo err >&2", 10)
    assert result == CommandResult(f"hi\n{tmp_path}\nerr\n", "")


@pytest_twisted.ensureDeferred
async def test_the_workspace_directory_is_used_when_it_exists(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = runner(tmp_path)
    r.directory = lambda: str(work)
    assert (await r.run("pwd", 10)).value == f"{work}\n"
    r.directory = lambda: str(tmp_path / "missing")
    assert (await r.run("pwd", 10)).value == f"{tmp_path}\n"


@pytest_twisted.ensureDeferred
async def test_a_failing_script_keeps_its_output_and_says_why(tmp_path: Path) -> None:
    assert await runner(tmp_path).run("echo partial; exit 3", 10) == CommandResult(
        "partial\n", "run cmd: exit status 3"
    )
    assert await runner(tmp_path).run("kill -TERM $$", 10) == CommandResult(
        "", "run cmd: signal: terminated"
    )


@pytest_twisted.ensureDeferred
async def test_output_beyond_10_kib_is_counted_not_kept(tmp_path: Path) -> None:
    size = 2 * 1024 * 1024
    result = await runner(tmp_path).run(f"head -c {size} /dev/zero | tr '\\0' x", 30)
    assert result.value == "x" * OUTPUT_LIMIT
    assert result.error == f"run cmd: output truncated from {size} to {OUTPUT_LIMIT} bytes"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest_twisted.ensureDeferred
async def test_a_script_still_running_at_its_timeout_is_killed_with_what_it_started(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; sleep 300 | sleep 300 & echo started; wait"
    started = reactor.seconds()
    result = await runner(tmp_path).run(script, 1)
    assert 1 <= reactor.seconds() - started < 10
    assert result == CommandResult(
        "started\n", f"run cmd: signal: killed\n{DEADLINE_EXCEEDED}"
    )
    background = int(pids.read_text())
    for _ in range(100):  # SIGKILL is delivered asynchronously; a reaper collects them
        if not _alive(background):
            break
        await defer.succeed(None)
        await _turn()
    assert not _alive(background)


async def _turn() -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    await d


@pytest_twisted.ensureDeferred
async def test_cancelling_a_run_kills_it(tmp_path: Path) -> None:
    running = runner(tmp_path).run("echo $$; sleep 300", 30)
    running.cancel()
    with pytest.raises(defer.CancelledError):
        await running


@pytest_twisted.ensureDeferred
async def test_a_shell_that_cannot_start_is_a_start_error(tmp_path: Path) -> None:
    r = runner(tmp_path)
    r.shell = str(tmp_path / "no-such-shell")
    result = await r.run("true", 5)
    missing = f"start cmd: fork/exec {r.shell}: no such file or directory"
    assert result == CommandResult("", missing)
    r.shell = str(tmp_path)
    result = await r.run("true", 5)
    assert result == CommandResult("", f"start cmd: fork/exec {r.shell}: permission denied")


# -- the schedule and the batches -------------------------------------------------------


class Scripts:
    """Runs nothing: records each run and lets the test answer it."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, float, defer.Deferred[CommandResult]]] = []

    def run(self, script: str, timeout: float) -> defer.Deferred[CommandResult]:
        d: defer.Deferred[CommandResult] = defer.Deferred()
        self.runs.append((script, timeout, d))
        return d

    def answer(self, script: str, value: str, error: str = "") -> None:
        [d] = [d for s, _, d in self.runs if s == script and not d.called]
        d.callback(CommandResult(value, error))


def describe(key: str, script: str, interval: int, timeout: int = 0) -> Description:
    return Description(
        key=key,
        display_name=key,
        script=script,
        interval=duration_pb2.Duration(seconds=interval),
        timeout=duration_pb2.Duration(seconds=timeout),
    )


class Setup:
    def __init__(self, *descriptions: Description) -> None:
        self.coderd = InMemoryCoderd(Workspace(metadata=list(descriptions)))
        self.scripts = Scripts()
        self.reporter = MetadataReporter(
            self.coderd.client,
            manifest=lambda: self.coderd.api.workspace.manifest(),
            runner=self.scripts,
            clock=self.coderd.clock,
        )
        self.reporter.setServiceParent(self.coderd.client)

    def start(self) -> None:
        self.coderd.client.startService()
        self.coderd.settle()

    def values(self) -> dict[str, tuple[str, str]]:
        return {k: (r.value, r.error) for k, r in self.coderd.api.metadata.items()}


def test_each_item_runs_every_interval_and_values_go_in_one_batch_a_second() -> None:
    s = Setup(describe("cpu", "cpu.sh", 2), describe("mem", "mem.sh", 5, timeout=1))
    s.start()
    assert [(script, t) for script, t, _ in s.scripts.runs] == [("cpu.sh", 2), ("mem.sh", 1)]
    s.scripts.answer("cpu.sh", "12%")
    s.scripts.answer("mem.sh", "", "run cmd: exit status 1")
    s.coderd.advance(1.0)
    assert s.values() == {"cpu": ("12%", ""), "mem": ("", "run cmd: exit status 1")}
    s.coderd.advance(1.0)
    assert [script for script, _, _ in s.scripts.runs] == ["cpu.sh", "mem.sh", "cpu.sh"]
    s.scripts.answer("cpu.sh", "13%")
    s.coderd.advance(3.0)
    assert s.values()["cpu"] == ("13%", "")
    assert [script for script, _, _ in s.scripts.runs].count("mem.sh") == 2


def test_a_slow_script_is_not_started_again_while_it_runs() -> None:
    s = Setup(describe("slow", "slow.sh", 1))
    s.start()
    for _ in range(5):
        s.coderd.advance(1.0)
    assert len(s.scripts.runs) == 1
    s.scripts.answer("slow.sh", "done")
    s.coderd.advance(1.0)
    assert len(s.scripts.runs) == 2 and s.values() == {"slow": ("done", "")}


def test_interval_zero_runs_once_per_connection() -> None:
    s = Setup(describe("once", "once.sh", 0))
    s.start()
    s.scripts.answer("once.sh", "v1")
    for _ in range(5):
        s.coderd.advance(1.0)
    assert len(s.scripts.runs) == 1
    s.coderd.disconnect()
    for _ in range(30):
        s.coderd.advance(0.5)
    assert len(s.scripts.runs) == 2


def test_timeouts_default_as_upstream() -> None:
    assert scriptTimeout(describe("k", "s", 7, timeout=2)) == 2
    assert scriptTimeout(describe("k", "s", 7)) == 7
    assert scriptTimeout(describe("k", "s", 0)) == 3


def test_a_batch_that_did_not_reach_coderd_goes_with_the_next() -> None:
    s = Setup(describe("a", "a.sh", 1), describe("b", "b.sh", 1))
    s.start()
    s.scripts.answer("a.sh", "a1")
    s.scripts.answer("b.sh", "b1")
    s.coderd.disconnect()  # the batch is not sent: nothing is connected
    assert s.reporter.updates.keys() == {"a", "b"}
    for _ in range(30):
        s.coderd.advance(0.5)
        for script, _, d in s.scripts.runs:
            if not d.called:
                d.callback(CommandResult(script.replace(".sh", "2"), ""))
    assert s.values() == {"a": ("a2", ""), "b": ("b2", "")}


def test_a_batch_coderd_refuses_is_not_sent_again() -> None:
    s = Setup(describe("a", "a.sh", 10))
    path = RPCS["BatchUpdateMetadata"].path
    calls = []

    def refused(data: bytes) -> bytes:
        calls.append(data)
        raise DRPCError(0, "some metadata was omitted")

    s.coderd.api.handlers[path] = refused
    s.start()
    s.scripts.answer("a.sh", "x")
    for _ in range(5):
        s.coderd.advance(1.0)
    assert len(calls) == 1 and not s.reporter.updates


def test_stopping_kills_the_scripts_under_way() -> None:
    s = Setup(describe("slow", "slow.sh", 1))
    s.start()
    [(_, _, running)] = s.scripts.runs
    cancelled: list[object] = []
    running.addErrback(cancelled.append)
    s.reporter.stopService()
    assert running.called
    s.coderd.advance(5.0)
    assert len(s.scripts.runs) == 1


def test_descendants_are_what_proc_says_a_process_started() -> None:
    script = "sleep 30 & a=$!; sh -c 'sleep 30 & echo $!; wait' & b=$!; read g; echo $a $b $g; wait"
    parent = subprocess.Popen(
        ["/bin/sh", "-c", script.replace("read g", "read g < /dev/stdin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        grandchild = parent.stdout.readline().strip()  # printed by the inner shell
        parent.stdin.write(grandchild + "\n")
        parent.stdin.flush()
        a, b, g = (int(p) for p in parent.stdout.readline().split())
        assert sorted(descendants(parent.pid)) == sorted([a, b, g])
        assert descendants(parent.pid, proc="/nonexistent") == []
    finally:
        for pid in [*descendants(parent.pid), parent.pid]:
            os.kill(pid, signal.SIGKILL)
        parent.wait()
