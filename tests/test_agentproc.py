"""The traceback check every process-level test gets (``tests/conftest.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.agentproc import LoggedProcess, newTracebacks

CRASH = "import sys; print('starting', file=sys.stderr, flush=True); raise ValueError('boom')"


def crashing(expected: str = "") -> LoggedProcess:
    """A process of ours that logs a traceback and exits."""
    process = subprocess.Popen(
        [sys.executable, "-c", CRASH],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = LoggedProcess(process, tracebacksExpected=expected)
    watched.startReading()
    watched.waitForLog("ValueError: boom")
    return watched


@pytest.mark.allows_traceback("the process under test crashes on purpose")
def test_a_traceback_is_reported_once_with_the_lines_around_it() -> None:
    watched = crashing()
    [report] = newTracebacks()
    assert "logged a traceback" in report
    assert "starting\nTraceback (most recent call last):" in report
    assert report.endswith("ValueError: boom\n")
    assert newTracebacks() == []  # each line is looked at once
    watched.stop()
    assert newTracebacks() == []  # and a stopped process is no longer watched


def test_a_process_that_may_log_one_says_why() -> None:
    watched = crashing(expected="it crashes on purpose")
    assert newTracebacks() == []
    watched.stop()
