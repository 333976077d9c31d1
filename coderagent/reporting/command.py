"""Running one script for coderd, as upstream's agent runs metadata scripts.

The script runs as the agent's user, ``$SHELL -c <script>`` (never a command
line built from parts), in the workspace directory (or the home directory if
that does not exist), with the environment an injected function returns, and
with an empty stdin.  Its stdout and stderr are one stream; the first
:data:`OUTPUT_LIMIT` bytes are kept and the rest only counted, so a script
that prints without end costs no memory.

Errors read as upstream's do, since they are shown in the dashboard: ``start
cmd: …`` when it cannot start, ``run cmd: exit status 2``, ``run cmd: output
truncated from 2097152 to 10240 bytes``, and for a script still running at
its timeout ``run cmd: signal: killed`` and ``context deadline exceeded``
(joined by newlines, as Go's ``errors.Join``).  At the timeout the script is
killed with everything it started (found in ``/proc`` before the kill), so a
hung pipeline does not outlive it; the result is given then, without waiting
for processes that hold its output open.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent import launch
from coderagent.deferreds import cancelCall
from coderagent.gotext import signalText

log = Logger()

#: Output kept of one run (upstream's 10 KiB).
OUTPUT_LIMIT = 10 << 10

DEADLINE_EXCEEDED = "context deadline exceeded"


@dataclass(frozen=True)
class CommandResult:
    """What a run produced: its output (cut to the limit) and an error text, or ''."""

    value: str
    error: str = ""


class CommandRunner:
    """Starts scripts; each run fires with a :class:`CommandResult`, never with a failure."""

    def __init__(
        self,
        *,
        reactor: Any,
        shell: str,
        home: str,
        environment: Callable[[], Mapping[str, str]],
        directory: Callable[[], str] | None = None,
        outputLimit: int = OUTPUT_LIMIT,
    ) -> None:
        """``environment()`` is called at every run: it is the environment of commands
        the agent runs for the workspace.  ``directory()``, if given, is where to run
        (the manifest's directory); the home directory when it does not exist."""
        self.reactor = reactor
        self.shell = shell
        self.home = home
        self.environment = environment
        self.directory = directory
        self.outputLimit = outputLimit

    def run(self, script: str, timeout: float) -> Deferred[CommandResult]:
        """Run ``script``; cancelling the result kills it (and fails with CancelledError)."""
        protocol = _Run(self)
        done = protocol.done
        cwd = self.directory() if self.directory is not None else self.home
        if not cwd or not os.path.isdir(cwd):
            cwd = self.home
        if not (os.path.isfile(self.shell) and os.access(self.shell, os.X_OK)):
            # Checked here: a failed exec in the forked child would only show as a
            # traceback on the script's stderr.
            problem = "no such file or directory"
            if os.path.exists(self.shell):
                problem = "permission denied"
            done.callback(CommandResult("", f"start cmd: fork/exec {self.shell}: {problem}"))
            return done
        try:
            transport = launch.spawnProcess(
                self.reactor,
                protocol,
                self.shell,
                [self.shell, "-c", script],
                env=dict(self.environment()),
                path=cwd,
                newSession=True,
            )
        except OSError as e:
            done.callback(CommandResult("", f"start cmd: {e}"))
            return done
        transport.closeStdin()
        protocol.timer = self.reactor.callLater(timeout, protocol.timedOut)
        return done


class _Run(ProcessProtocol):
    """One run: collects the output, ends with the process or at the timeout."""

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner
        self.done: Deferred[CommandResult] = Deferred(lambda _: self.stop())
        self.output = bytearray()
        self.total = 0
        self.timer: IDelayedCall | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.total += len(data)
        room = self.runner.outputLimit - len(self.output)
        if room > 0:
            self.output += data[:room]

    def processEnded(self, reason: Failure) -> None:
        cancelCall(self.timer)
        self.timer = None
        if self.done.called:
            return
        value = reason.value
        waitError = ""
        if isinstance(value, ProcessTerminated) and value.signal is not None:
            core = value.status is not None and os.WCOREDUMP(value.status)
            waitError = signalText(value.signal, core)
        elif isinstance(value, ProcessTerminated | ProcessDone) and value.exitCode:
            waitError = f"exit status {value.exitCode}"
        self._finish([waitError] if waitError else [])

    def timedOut(self) -> None:
        self.timer = None
        self.stop()
        self._finish([signalText(signal.SIGKILL)], deadline=True)

    def stop(self) -> None:
        """Kill the script and what it started; read nothing more from it."""
        cancelCall(self.timer)
        self.timer = None
        pid = self.transport.pid if self.transport is not None else None
        if pid is not None:
            killTree(pid)
        if self.transport is not None:
            self.transport.loseConnection()  # our ends of its pipes

    def _finish(self, errors: list[str], deadline: bool = False) -> None:
        limit = self.runner.outputLimit
        if self.total > limit:
            errors.append(f"output truncated from {self.total} to {limit} bytes")
        if deadline:
            errors.append(DEADLINE_EXCEEDED)
        error = "run cmd: " + "\n".join(errors) if errors else ""
        value = self.output.decode("utf-8", "replace")
        self.done.callback(CommandResult(value, error))


def descendants(pid: int, proc: str = "/proc") -> list[int]:
    """The processes ``pid`` started, and theirs, as ``/proc`` says now."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat"), "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def killTree(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started (looked up before any is killed)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass  # already gone
