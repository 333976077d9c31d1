# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Session processes started without forking the agent: the real reactor, real children."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from coderagent import compat, launch
from tests.waiting import untilDeferred

SH = "/bin/sh"


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[BaseException] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _spawn(
    script: str, path: str | None, pty: bool = False, newSession: bool = False
) -> tuple[_Collect, Any]:
    protocol = _Collect()
    env = {"PATH": "/usr/bin:/bin", "MARK": "m"}
    if not pty:
        process = launch.spawnProcess(
            _reactor(), protocol, SH, [SH, "-c", script], env=env, path=path, newSession=newSession
        )
        return protocol, process
    master, slave = os.openpty()
    try:
        process = launch.spawnProcess(
            _reactor(),
            protocol,
            SH,
            [SH, "-c", script],
            env=env,
            path=path,
            usePTY=(master, slave, os.ttyname(slave)),
        )
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return protocol, process


def test_the_c_library_here_can_start_children_without_forking() -> None:
    # The project machine's glibc has every function; without them the
    # fallback (Twisted's fork) would hide a regression of exec's cost.
    assert launch.available()


@pytest_twisted.inlineCallbacks
def test_a_child_runs_in_its_directory_with_its_environment(
    tmp_path: Path,
) -> Iterator[Deferred[Any]]:
    assert os.getcwd() != str(tmp_path)
    protocol, process = _spawn('pwd; echo "$MARK"; echo oops >&2; exit 7', str(tmp_path))
    assert isinstance(process, compat.StartedProcess)
    reason = yield protocol.ended
    assert isinstance(reason, ProcessTerminated)
    assert (reason.exitCode, reason.signal) == (7, None)
    assert protocol.out == f"{tmp_path}\nm\n".encode()
    assert protocol.err == b"oops\n"
    assert os.getcwd() != str(tmp_path)


@pytest_twisted.inlineCallbacks
def test_stdin_is_the_childs_and_closing_it_ends_cat() -> Iterator[Deferred[Any]]:
    protocol, process = _spawn("exec cat", "/")
    process.write(b"through the pipe\n")
    process.closeStdin()
    reason = yield protocol.ended
    assert isinstance(reason, ProcessDone)
    assert protocol.out == b"through the pipe\n"


#: The shell's pid, process group and session, from /proc/self/stat (fields 1, 5 and 6).
_IDS = 'read -r stat < /proc/self/stat; set -- ${stat##*) }; echo "$$ $3 $4"'


@pytest_twisted.inlineCallbacks
def test_a_script_child_leads_a_new_session_and_a_session_child_does_not() -> Iterator[
    Deferred[Any]
]:
    leader, _ = _spawn(_IDS, "/", newSession=True)
    yield leader.ended
    pid, pgrp, sid = leader.out.split()
    assert pid == pgrp == sid
    plain, _ = _spawn(_IDS, "/")
    yield plain.ended
    pid, pgrp, sid = plain.out.split()
    assert pgrp == str(os.getpgrp()).encode() and sid == str(os.getsid(0)).encode()


@pytest_twisted.inlineCallbacks
def test_a_signal_death_is_reported_as_such() -> Iterator[Deferred[Any]]:
    protocol, process = _spawn("echo up; exec sleep 30", "/")
    yield untilDeferred(lambda: b"up" in protocol.out, "the child's first line")
    process.signalProcess("KILL")
    reason = yield protocol.ended
    assert isinstance(reason, ProcessTerminated)
    assert reason.signal == signal.SIGKILL


@pytest_twisted.inlineCallbacks
def test_the_child_inherits_only_its_three_descriptors() -> Iterator[Deferred[Any]]:
    # An inheritable descriptor of the agent's must not leak into a session.
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        protocol, _ = _spawn("ls /proc/$$/fd", "/")
        yield protocol.ended
    finally:
        os.close(leaked)
    assert sorted(int(x) for x in protocol.out.split()) == [0, 1, 2]


@pytest_twisted.inlineCallbacks
def test_signals_the_agent_ignores_are_default_in_the_child() -> Iterator[Deferred[Any]]:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's own
    protocol, _ = _spawn("grep '^SigIgn' /proc/$$/status", "/")
    yield protocol.ended
    ignored = int(protocol.out.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


@pytest_twisted.inlineCallbacks
def test_a_pty_child_has_the_pty_as_its_controlling_terminal(
    tmp_path: Path,
) -> Iterator[Deferred[Any]]:
    script = "pwd; tty; exec 3</dev/tty && echo ctty-ok; ps -o sid= -o pid= -p $$"
    protocol, process = _spawn(script, str(tmp_path), pty=True)
    assert isinstance(process, compat.StartedPTYProcess)
    reason = yield protocol.ended
    assert isinstance(reason, ProcessDone)
    lines = protocol.out.decode().splitlines()
    assert lines[0] == str(tmp_path)
    assert lines[1].startswith("/dev/pts/")
    assert lines[2] == "ctty-ok"
    sid, pid = lines[3].split()
    assert sid == pid  # a session leader of its own


def test_a_missing_directory_is_an_error_in_the_agent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _spawn("true", str(tmp_path / "missing"))
    assert launch.spawnProcess  # the agent goes on


def test_a_missing_program_is_an_error_in_the_agent() -> None:
    protocol = _Collect()
    with pytest.raises(FileNotFoundError):
        launch.spawnProcess(_reactor(), protocol, "/nonexistent/shell", ["sh"], env={}, path="/")


def test_a_fake_reactor_gets_the_call_unchanged() -> None:
    calls: list[tuple[Any, ...]] = []

    class Fake:
        def spawnProcess(self, *args: Any, **kwargs: Any) -> str:
            calls.append((args, kwargs))
            return "process"

    protocol = ProcessProtocol()
    assert launch.spawnProcess(Fake(), protocol, SH, [SH], env={}, path="/x") == "process"
    assert calls == [((protocol, SH, [SH]), {"env": {}, "path": "/x", "usePTY": False})]
