"""One run of one script: the process, its timeout, and how it ended.

What upstream's ``exec.Cmd`` (``WaitDelay`` 10 s, ``Cancel`` sending SIGHUP
to the process group) and its ``run`` decide, as a small state machine:

* the script runs in a session of its own, so it and everything it starts
  form one process group;
* its ``timeout`` (0: none) passed, or the agent stopping it: SIGHUP to the
  group; whatever is left after :data:`WAIT_DELAY` is killed (SIGKILL, the
  whole group: upstream kills only the leader) and the run ends then at the
  latest.  A timeout is ``TIMED_OUT``; being stopped is ``EXIT_FAILURE``;
* it exited but something it started still holds its stdout or stderr:
  after :data:`WAIT_DELAY` the agent stops reading them, and a run that had
  exited 0 is ``PIPES_LEFT_OPEN``, with upstream's warning in its log;
* otherwise its exit status: 0 is ``OK``, anything else ``EXIT_FAILURE``
  (killed by a signal: exit code -1, as Go reports it).

The exit code reported for ``TIMED_OUT``, ``PIPES_LEFT_OPEN``, a stopped
run and a script that could not start is 255, upstream's "unknown".
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.deferreds import cancelCall
from coderagent.pb import agent_pb2
from coderagent.scripts.output import RunOutput

log = Logger()

Status = agent_pb2.Timing.Status

#: Upstream's ``cmd.WaitDelay``.
WAIT_DELAY = 10.0

#: Upstream's "unknown status" exit code.
UNKNOWN_EXIT_CODE = 255

Spawn = Callable[[ProcessProtocol], IProcessTransport]


def pipesLeftOpenWarning(waitDelay: float) -> str:
    """Upstream's words for a script that exited while its pipes stayed open."""
    return (
        f"WARNING: script exited successfully, but output pipes were not closed after "
        f"{waitDelay:g}s. This usually means a child process was started with references to "
        "stdout or stderr. As a result, this process may now have been terminated. Consider "
        'redirecting the output or using a separate "coder_script" for the process, see '
        "https://coder.com/docs/templates/troubleshooting#startup-script-issues for more "
        "information."
    )


@dataclass(frozen=True)
class RunResult:
    """How one run ended, as ``ScriptCompleted`` reports it."""

    status: int
    exitCode: int
    start: float
    end: float
    #: Why it did not succeed, for the agent's log ("" when it did).
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


class ScriptProcess(ProcessProtocol):
    """Runs once: :meth:`start` fires with the :class:`RunResult`, never fails."""

    def __init__(
        self,
        *,
        clock: Any,
        output: RunOutput,
        timeout: float = 0.0,
        waitDelay: float = WAIT_DELAY,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.output = output
        self.timeout = timeout
        self.waitDelay = waitDelay
        self.wallClock = wallClock
        self.pid: int | None = None
        self.started = 0.0
        self._done: Deferred[RunResult] = Deferred()
        #: Fires when the script's own process has exited (its pipes may still be open).
        self.exited: Deferred[None] = Deferred()
        self._finished = False
        self._exitCode: int | None = None
        #: Why the agent is ending the run: "timeout" or "stopped" (None: it is not).
        self._cause: str | None = None
        self._pipesStuck = False
        self._timeoutTimer: IDelayedCall | None = None
        self._waitTimer: IDelayedCall | None = None

    # -- starting ------------------------------------------------------------------

    def start(self, spawn: Spawn) -> Deferred[RunResult]:
        self.started = self.wallClock()
        try:
            process = spawn(self)
        except OSError as e:
            self.fail(f"start command: {e.strerror or e}")
            return self._done
        self.pid = process.pid
        process.closeStdin()
        if self.timeout > 0:
            self._timeoutTimer = self.clock.callLater(self.timeout, self._end, "timeout")
        return self._done

    def fail(self, error: str) -> Deferred[RunResult]:
        """The script could not run at all: say why in its log; ``EXIT_FAILURE``."""
        if not self.started:
            self.started = self.wallClock()
        self.output.message(f"coder-agent: cannot run the script: {error}")
        self._finish(Status.EXIT_FAILURE, UNKNOWN_EXIT_CODE, error)
        return self._done

    def stop(self) -> None:
        """The agent is stopping: end the run as a timeout would (it is ``EXIT_FAILURE``)."""
        self._end("stopped")

    # -- the process -----------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        self.output.stdout(data)

    def errReceived(self, data: bytes) -> None:
        self.output.stderr(data)

    def processExited(self, reason: Failure) -> None:
        self._exitCode = _exitCode(reason)
        if not self._finished and self._cause is None and self._waitTimer is None:
            # The pipes may close any moment now; if they do not, something holds them.
            self._waitTimer = self.clock.callLater(self.waitDelay, self._pipesLeftOpen)
        self.exited.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if self._exitCode is None:
            self._exitCode = _exitCode(reason)
        if self._finished:
            return
        if self._cause is not None:
            self._concludeCause()
            return
        code = self._exitCode
        if self._pipesStuck and code == 0:
            self.output.message(pipesLeftOpenWarning(self.waitDelay))
            self._finish(
                Status.PIPES_LEFT_OPEN,
                UNKNOWN_EXIT_CODE,
                "script exited without closing output pipes",
            )
        elif code != 0:
            self._finish(Status.EXIT_FAILURE, code, f"exit status {code}")
        else:
            self._finish(Status.OK, 0)

    def _pipesLeftOpen(self) -> None:
        self._waitTimer = None
        self._pipesStuck = True
        self._closePipes()

    def _closePipes(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.closeChildFD(1)
            transport.closeChildFD(2)

    # -- ending it -------------------------------------------------------------------

    def _end(self, cause: str) -> None:
        if self._finished or self._cause is not None:
            return
        self._cause = cause
        cancelCall(self._timeoutTimer)
        self._timeoutTimer = None
        cancelCall(self._waitTimer)
        self._signalGroup(signal.SIGHUP)
        self._waitTimer = self.clock.callLater(self.waitDelay, self._kill)

    def _kill(self) -> None:
        self._waitTimer = None
        self._signalGroup(signal.SIGKILL)
        self._closePipes()
        self._concludeCause()

    def _concludeCause(self) -> None:
        if self._cause == "timeout":
            self._finish(Status.TIMED_OUT, UNKNOWN_EXIT_CODE, "script timed out")
        else:
            self._finish(
                Status.EXIT_FAILURE, UNKNOWN_EXIT_CODE, "stopped: the agent is shutting down"
            )

    def _signalGroup(self, number: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, number)
        except (ProcessLookupError, PermissionError):
            pass  # every process of the group is gone already

    def _finish(self, status: int, exitCode: int, error: str = "") -> None:
        if self._finished:
            return
        self._finished = True
        cancelCall(self._timeoutTimer)
        cancelCall(self._waitTimer)
        self._timeoutTimer = self._waitTimer = None
        self.output.close()
        result = RunResult(status, exitCode, self.started, self.wallClock(), error)
        self._done.callback(result)


def _exitCode(reason: Failure) -> int:
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return -1
        return int(value.exitCode or 0)
    if isinstance(value, ProcessDone):
        return 0
    return UNKNOWN_EXIT_CODE
