# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""One script run: real processes in their own session; the timers on a clock the test moves."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from coderagent.coderd.client import CoderdClient
from coderagent.files import openPrivate
from coderagent.pb import agent_pb2
from coderagent.scripts.logsender import ERROR, INFO, LogSender
from coderagent.scripts.output import LineSplitter, RunOutput
from coderagent.scripts.process import (
    UNKNOWN_EXIT_CODE,
    WAIT_DELAY,
    RunResult,
    ScriptProcess,
    pipesLeftOpenWarning,
)
from coderagent.scripts.runner import spawnScript
from tests.waiting import until

Status = agent_pb2.Timing.Status
SOURCE = b"\x01" * 16


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Run:
    """A ScriptProcess whose output goes to a file and a LogSender that never sends."""

    def __init__(self, tmp_path: Path, timeout: float = 0.0) -> None:
        self.clock = task.Clock()
        self.path = tmp_path / "script.log"
        client = CoderdClient(url="http://coderd.test", token="t", reactor=reactor)
        self.sender = LogSender(client, self.clock)  # not started: lines stay queued
        self.output = RunOutput(
            openPrivate(self.path, os.O_WRONLY | os.O_TRUNC), SOURCE, self.sender
        )
        self.process = ScriptProcess(clock=self.clock, output=self.output, timeout=timeout)

    def start(self, script: str) -> Any:
        return self.process.start(
            lambda protocol: spawnScript(
                reactor, protocol, "/bin/sh", ["sh", "-c", script], {"PATH": "/bin:/usr/bin"}, "/"
            )
        )

    def lines(self) -> list[tuple[int, str]]:
        queue = self.sender.queues.get(SOURCE)
        return [(level, text) for _, level, text, _ in queue.lines] if queue else []


@pytest_twisted.ensureDeferred
async def test_a_clean_run_is_ok_and_its_output_goes_to_the_file_and_coderd(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path)
    result: RunResult = await run.start("echo out; echo err >&2; printf 'last'")
    assert (result.status, result.exitCode, result.error) == (Status.OK, 0, "")
    assert sorted(run.lines()) == sorted([(INFO, "out"), (ERROR, "err"), (INFO, "last")])
    # Each write reaches the file whole as it is read, stdout and stderr in either order.
    assert sorted(run.path.read_text()) == sorted("out\nerr\nlast")
    assert run.sender.queues[SOURCE].flushRequested  # the end of a run asks for a flush
    assert result.start <= result.end


@pytest.mark.parametrize(("script", "code"), [("exit 3", 3), ("kill -9 $$", -1)])
@pytest_twisted.ensureDeferred
async def test_a_failure_is_exit_failure_with_its_code(
    tmp_path: Path, script: str, code: int
) -> None:
    result = await Run(tmp_path).start(script)
    assert (result.status, result.exitCode) == (Status.EXIT_FAILURE, code)


@pytest_twisted.ensureDeferred
async def test_a_timeout_hangs_up_the_whole_group(tmp_path: Path) -> None:
    run = Run(tmp_path, timeout=5)
    marker = tmp_path / "child.pid"
    done = run.start(f"sleep 60 & echo $! > {marker}; echo started; wait")
    await until(run.lines, "the script's first line")
    run.clock.advance(4.9)
    assert not done.called
    run.clock.advance(0.1)  # SIGHUP to the group: the shell and its sleep
    result = await done
    assert (result.status, result.exitCode) == (Status.TIMED_OUT, UNKNOWN_EXIT_CODE)
    assert not alive(int(marker.read_text()))


@pytest_twisted.ensureDeferred
async def test_a_script_that_ignores_the_hangup_is_killed_after_the_wait_delay(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, timeout=1)
    done = run.start("trap '' HUP; echo ready; while :; do sleep 0.1; done")
    await until(run.lines, "the script's first line")
    run.clock.advance(1)
    assert not done.called
    run.clock.advance(WAIT_DELAY)  # SIGKILL, and the run is over at once
    result = done.result
    assert (result.status, result.exitCode) == (Status.TIMED_OUT, UNKNOWN_EXIT_CODE)
    await run.process.exited


@pytest_twisted.ensureDeferred
async def test_exiting_while_a_child_holds_the_pipes_is_pipes_left_open(tmp_path: Path) -> None:
    run = Run(tmp_path)
    done = run.start("sleep 60 & echo parent done")
    await run.process.exited
    assert not done.called
    try:
        run.clock.advance(WAIT_DELAY)  # the agent stops waiting for the pipes
        result = await done
    finally:
        os.killpg(run.process.pid or 0, signal.SIGKILL)
    assert (result.status, result.exitCode) == (Status.PIPES_LEFT_OPEN, UNKNOWN_EXIT_CODE)
    warning = pipesLeftOpenWarning(WAIT_DELAY)
    assert warning.startswith("WARNING: script exited successfully, but output pipes were not ")
    assert "closed after 10s." in warning
    assert run.lines() == [(INFO, "parent done"), (ERROR, warning)]
    assert run.path.read_text() == f"parent done\n{warning}\n"


@pytest_twisted.ensureDeferred
async def test_a_failing_exit_with_open_pipes_stays_an_exit_failure(tmp_path: Path) -> None:
    run = Run(tmp_path)
    done = run.start("sleep 60 & exit 4")
    await run.process.exited
    try:
        run.clock.advance(WAIT_DELAY)
        result = await done
    finally:
        os.killpg(run.process.pid or 0, signal.SIGKILL)
    assert (result.status, result.exitCode) == (Status.EXIT_FAILURE, 4)
    assert run.lines() == []


@pytest_twisted.ensureDeferred
async def test_stopping_a_run_is_an_exit_failure(tmp_path: Path) -> None:
    run = Run(tmp_path)
    done = run.start("echo up; sleep 60")
    await until(run.lines, "the script's first line")
    run.process.stop()
    result = await done
    assert (result.status, result.exitCode) == (Status.EXIT_FAILURE, UNKNOWN_EXIT_CODE)
    assert result.error == "stopped: the agent is shutting down"


def test_a_script_that_cannot_start_says_why_in_its_log(tmp_path: Path) -> None:
    run = Run(tmp_path)

    def refuse(protocol: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    result = run.process.start(refuse).result
    assert (result.status, result.exitCode) == (Status.EXIT_FAILURE, UNKNOWN_EXIT_CODE)
    message = "coder-agent: cannot run the script: start command: No such file or directory"
    assert run.lines() == [(ERROR, message)]
    assert run.path.read_text() == message + "\n"


def test_lines_are_split_as_upstream_and_bounded() -> None:
    lines: list[bytes] = []
    overlong: list[int] = []
    splitter = LineSplitter(lines.append, lambda: overlong.append(1), maxLine=8)
    for chunk in [b"one\r\ntw", b"o\n\nthree", b"\r", b"\nfour-is-too-long", b"-still\nfi", b"ve"]:
        splitter.feed(chunk)
    splitter.close()
    assert lines == [b"one", b"two", b"", b"three", b"five"]
    assert overlong == [1]
    splitter.feed(b"x" * 9)
    splitter.close()
    assert overlong == [1, 1]
