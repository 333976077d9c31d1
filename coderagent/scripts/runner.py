"""The workspace's ``coder_script`` resources: which run when, where, and what is reported.

As upstream's ``agentscripts.Runner``:

* the scripts come from the first manifest (a reconnection changes nothing);
  the ``run_on_start`` ones run at once, all in parallel (the manifest has
  no ordering rules for them); cron starts once they have all ended; the
  ``run_on_stop`` ones run, in parallel, when the agent stops;
* each run is ``$SHELL -c <script>`` (or its ``#!`` interpreter), in the
  workspace's directory, with the environment every command gets plus
  ``CODER_SCRIPT_DATA_DIR`` (``<script-data-dir>/coder-script-data/<log
  source id>``, created 0700) and ``CODER_SCRIPT_BIN_DIR``
  (``…/coder-script-data/bin``, first on every command's ``PATH``);
* its output goes to its ``log_path`` (default ``coder-script-<log source
  id>.log``; ``~`` and ``$VARS`` expanded, relative to ``--log-dir``; 0600)
  and, line by line, to coderd under its ``log_source_id``;
* each run's outcome is reported with ``ScriptCompleted`` (stage ``START``,
  ``STOP`` or ``CRON``) and counted in ``agent_scripts_executed_total``.

A script that cannot run (its data directory or log file cannot be made,
its ``#!`` line is unreadable, its interpreter is missing, its cron schedule
is invalid) is an ``EXIT_FAILURE`` with a line in its log saying why; it
never stops the agent or the other scripts.

The start scripts' outcome is the first failure (in the order they end),
which upstream's ``errgroup`` reports too: a timeout makes the workspace
``START_TIMEOUT``, anything else ``START_ERROR``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.logger import Logger

from coderagent import launch
from coderagent.agentlifecycle import Outcome
from coderagent.deferreds import Waiters
from coderagent.files import makePrivateDirs, openPrivate
from coderagent.gotext import goExpand, goQuote
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2
from coderagent.scripts import cron
from coderagent.scripts.logsender import LogSender
from coderagent.scripts.output import RunOutput
from coderagent.scripts.process import WAIT_DELAY, RunResult, ScriptProcess
from coderagent.scripts.scheduler import CronScheduler
from coderagent.scripts.timings import TimingReporter
from coderagent.workspaceenv import (
    SECRET_AGENT_VARIABLES,
    CommandLineError,
    WorkspaceEnvironment,
    commandLine,
    goJoin,
)

log = Logger()

Stage = agent_pb2.Timing.Stage
Status = agent_pb2.Timing.Status

#: Under ``--script-data-dir``, as upstream names it.
DATA_SUBDIR = "coder-script-data"


def scriptDataDir(base: str) -> str:
    return os.path.join(base, DATA_SUBDIR)


def scriptBinDir(base: str) -> str:
    """``CODER_SCRIPT_BIN_DIR``: where modules install tools, first on every ``PATH``."""
    return os.path.join(scriptDataDir(base), "bin")


def logPath(
    configured: str, source: uuid.UUID, logDir: str, home: str, environ: dict[str, str]
) -> str:
    """Where a script's output is written, as upstream resolves ``log_path``."""
    path = configured or f"coder-script-{source}.log"
    if path.startswith("~"):
        path = goJoin(home, path[1:])
    path = goExpand(
        path, lambda name: "" if name in SECRET_AGENT_VARIABLES else environ.get(name, "")
    )
    if not path.startswith("/"):
        path = goJoin(logDir, path)
    return path


@dataclass
class Script:
    """A ``WorkspaceAgentScript`` as the runner uses it."""

    spec: agent_pb2.WorkspaceAgentScript
    source: uuid.UUID
    id: bytes | None
    schedule: cron.Schedule | None = None

    @property
    def name(self) -> str:
        return self.spec.display_name or str(self.source)

    @property
    def timeout(self) -> float:
        return float(self.spec.timeout.seconds + self.spec.timeout.nanos / 1e9)


Spawner = Callable[..., Any]


def spawnScript(
    reactor: Any,
    protocol: Any,
    executable: str,
    args: list[str],
    env: dict[str, str],
    path: str | None,
) -> Any:
    """Start a script as the leader of a new session (pipes, no terminal), so that a
    timeout can signal everything it started at once (``os.killpg``), as upstream."""
    return launch.spawnProcess(
        reactor, protocol, executable, args, env=env, path=path, newSession=True
    )


class ScriptRunner:
    """Runs the first manifest's scripts at start, on their cron schedules, and at stop."""

    def __init__(
        self,
        *,
        reactor: Any,
        workspace: WorkspaceEnvironment,
        dataDirBase: str,
        logDir: str,
        logs: LogSender,
        timings: TimingReporter,
        metrics: AgentMetrics | None = None,
        clock: Any = None,
        wallClock: Callable[[], float] = time.time,
        waitDelay: float = WAIT_DELAY,
        spawner: Spawner = spawnScript,
    ) -> None:
        """``reactor`` starts processes; ``clock`` (the reactor by default) times them."""
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.workspace = workspace
        self.dataDir = scriptDataDir(dataDirBase)
        self.binDir = scriptBinDir(dataDirBase)
        self.logDir = logDir
        self.logs = logs
        self.timings = timings
        self.metrics = metrics
        self.wallClock = wallClock
        self.waitDelay = waitDelay
        self.spawner = spawner
        self.scripts: list[Script] = []
        self.scheduler = CronScheduler(self.clock)
        self.stopping = False
        self._initErrors: list[str] = []
        self._active: dict[ScriptProcess, tuple[Script, int]] = {}
        self._idle: Waiters[None] = Waiters()

    # -- the lifecycle's side ------------------------------------------------------------

    def start(self, manifest: agent_pb2.Manifest) -> Deferred[Outcome]:
        """Take the first manifest's scripts, run the start scripts, then start cron."""
        self._init(manifest)
        began = self.wallClock()
        starting = [s for s in self.scripts if s.spec.run_on_start]
        d = self._runAll(starting, Stage.START)

        def ended(outcome: Outcome) -> Outcome:
            if self._initErrors:
                outcome = Outcome.FAILED
            if outcome is not Outcome.OK:
                log.warn("startup script(s) failed: {outcome}", outcome=outcome.value)
            if self.metrics is not None:
                success = "true" if outcome is Outcome.OK else "false"
                self.metrics.startupScriptSeconds.labels(success).set(self.wallClock() - began)
            if not self.stopping:
                self.scheduler.start()
            return outcome

        return d.addCallback(ended)

    def stop(self) -> Deferred[Outcome]:
        """No more cron; unfinished start and cron runs are stopped; the stop scripts run."""
        self.stopping = True
        self.scheduler.stop()
        for run in list(self._active):
            run.stop()
        stopping = [s for s in self.scripts if s.spec.run_on_stop]
        d = self._runAll(stopping, Stage.STOP)

        def ended(outcome: Outcome) -> Outcome:
            if outcome is not Outcome.OK:
                log.warn("shutdown script(s) failed: {outcome}", outcome=outcome.value)
            return outcome

        return d.addCallback(ended)

    def drain(self) -> Deferred[Any]:
        """Fires once no run is going and coderd has their logs and timings."""
        idle: Deferred[None] = self._idle.wait() if self._active else Deferred()
        if not self._active:
            idle.callback(None)
        return idle.addCallback(
            lambda _: DeferredList(
                [self.logs.waitUntilEmpty(), self.timings.waitUntilEmpty()], consumeErrors=True
            )
        )

    def status(self) -> dict[str, Any]:
        """The runner as ``/health`` and ``coder-agent status`` show it."""
        return {
            "scripts": len(self.scripts),
            "running": sorted(
                f"{script.name} ({Stage.Name(stage)})" for script, stage in self._active.values()
            ),
            "cron": self.scheduler.running,
            "log_lines_queued": self.logs.queuedLines,
            "log_lines_dropped": {k: v for k, v in self.logs.dropped.items() if v},
            "timings_pending": len(self.timings.pending),
        }

    # -- setting up ------------------------------------------------------------------------

    def _init(self, manifest: agent_pb2.Manifest) -> None:
        log.info(
            "initializing agent scripts: {count} script(s), logs in {logDir}",
            count=len(manifest.scripts),
            logDir=self.logDir,
        )
        try:
            makePrivateDirs(self.binDir)
        except OSError as e:
            log.error("create script bin dir {path}: {error}", path=self.binDir, error=e)
        for spec in manifest.scripts:
            try:
                source = uuid.UUID(bytes=spec.log_source_id)
            except ValueError:
                error = f"script {spec.display_name!r} has no valid log source id; not run"
                log.error(error)
                self._initErrors.append(error)
                continue
            script = Script(spec, source, spec.id if len(spec.id) == 16 else None)
            self.scripts.append(script)
            if spec.cron:
                try:
                    script.schedule = cron.parse(spec.cron)
                except cron.CronError as e:
                    error = f"cron schedule {goQuote(spec.cron)}: {e}"
                    log.error("script {name}: {error}", name=script.name, error=error)
                    self._initErrors.append(error)
                    self._refuse(script, Stage.CRON, f"invalid {error}")
                    continue
                self.scheduler.add(script.name, script.schedule, self._cronJob(script))

    def _cronJob(self, script: Script) -> Callable[[], Deferred[RunResult]]:
        return lambda: self._run(script, Stage.CRON)

    # -- running ---------------------------------------------------------------------------

    def _runAll(self, scripts: list[Script], stage: int) -> Deferred[Outcome]:
        outcome: list[Outcome] = []

        def ended(result: RunResult) -> None:
            if not outcome and not result.ok:
                timedOut = result.status == Status.TIMED_OUT
                outcome.append(Outcome.TIMED_OUT if timedOut else Outcome.FAILED)

        runs = [self._run(s, stage).addCallback(ended) for s in scripts]
        all_: Deferred[Any] = gatherResults(runs)
        return all_.addCallback(lambda _: outcome[0] if outcome else Outcome.OK)

    def _run(self, script: Script, stage: int) -> Deferred[RunResult]:
        """Run ``script`` once; fires with how it ended (never fails)."""
        path = logPath(
            script.spec.log_path,
            script.source,
            self.logDir,
            self.workspace.agentEnvironment.get("HOME") or self.workspace.home,
            dict(self.workspace.agentEnvironment),
        )
        dataDir = os.path.join(self.dataDir, str(script.source))
        fd: int | None = None
        problem = ""
        try:
            makePrivateDirs(dataDir)
        except OSError as e:
            problem = f"{dataDir} script: create script temp dir: {e.strerror or e}"
        if not problem:
            try:
                fd = openPrivate(path, os.O_WRONLY | os.O_TRUNC)
            except OSError as e:
                problem = f"open {path} script log file: {e.strerror or e}"
        output = RunOutput(fd, script.source.bytes, self.logs, path)
        run = ScriptProcess(
            clock=self.clock,
            output=output,
            timeout=script.timeout,
            waitDelay=self.waitDelay,
            wallClock=self.wallClock,
        )
        log.info(
            "running agent script {name} ({stage}): log {path}, data {dataDir}",
            name=script.name,
            stage=Stage.Name(stage),
            path=path,
            dataDir=dataDir,
        )
        if problem:
            d = run.fail(problem)
        else:
            try:
                argv, env, cwd = self._command(script, dataDir)
            except (CommandLineError, OSError) as e:
                d = run.fail(str(e))
            else:
                d = run.start(
                    lambda protocol: self.spawner(self.reactor, protocol, argv[0], argv, env, cwd)
                )
                if not d.called:
                    self._active[run] = (script, stage)
        return d.addCallback(self._ended, script, stage, run, path)

    def _command(self, script: Script, dataDir: str) -> tuple[list[str], dict[str, str], str]:
        workspace = self.workspace
        argv = commandLine(workspace.user.shell, script.spec.script)
        env = workspace.commandEnvironment(workspace.baseEnvironment())
        env["CODER_SCRIPT_DATA_DIR"] = dataDir
        env["CODER_SCRIPT_BIN_DIR"] = self.binDir
        argv[0] = _executable(argv[0], env.get("PATH", ""))
        return argv, env, workspace.workingDirectory()

    def _refuse(self, script: Script, stage: int, error: str) -> None:
        """Report a script that will not run at all (an invalid cron schedule)."""
        output = RunOutput(None, script.source.bytes, self.logs)
        run = ScriptProcess(clock=self.clock, output=output, wallClock=self.wallClock)
        run.fail(error).addCallback(self._ended, script, stage, run, "")

    def _ended(
        self, result: RunResult, script: Script, stage: int, run: ScriptProcess, path: str
    ) -> RunResult:
        self._active.pop(run, None)
        seconds = result.end - result.start
        if result.ok:
            log.info(
                "{path} script completed in {seconds:.3f}s, exit code 0",
                path=path or script.name,
                seconds=seconds,
            )
        else:
            log.warn(
                "{path} script failed after {seconds:.3f}s, exit code {code}: {error}",
                path=path or script.name,
                seconds=seconds,
                code=result.exitCode,
                error=result.error,
            )
        if self.metrics is not None:
            self.metrics.scriptsExecuted.labels("true" if result.ok else "false").inc()
        if script.id is not None:
            self.timings.report(_timing(script.id, stage, result))
        if not self._active:
            self._idle.fire(None)
        return result


def _executable(name: str, path: str) -> str:
    """``name`` as ``exec`` will find it, or an error worded as Go's ``exec`` words it."""
    if "/" in name:
        if not os.path.exists(name):
            raise OSError(f"fork/exec {name}: no such file or directory")
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise OSError(f"fork/exec {name}: permission denied")
        return name
    found = shutil.which(name, path=path)
    if found is None:
        raise OSError(f"exec: {goQuote(name)}: executable file not found in $PATH")
    return found


def _timing(scriptID: bytes, stage: int, result: RunResult) -> agent_pb2.Timing:
    start = timestamp_pb2.Timestamp()
    start.FromNanoseconds(int(result.start * 1e9))
    end = timestamp_pb2.Timestamp()
    end.FromNanoseconds(int(result.end * 1e9))
    return agent_pb2.Timing(
        script_id=scriptID,
        start=start,
        end=end,
        exit_code=result.exitCode,
        stage=stage,  # type: ignore[arg-type]
        status=result.status,  # type: ignore[arg-type]
    )
