# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The script runner: real scripts, coderd-dev's server side in this reactor, timers on a clock."""

from __future__ import annotations

import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from google.protobuf import duration_pb2
from twisted.internet import reactor, task

from coderagent.agentlifecycle import Outcome
from coderagent.coderd.client import CoderdClient
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from coderagent.scripts.logsender import LogSender
from coderagent.scripts.runner import ScriptRunner, logPath, scriptBinDir
from coderagent.scripts.timings import TimingReporter
from coderagent.workspaceenv import UserInfo, WorkspaceEnvironment
from tests.localcoderd import TOKEN, Coderd
from tests.waiting import until

TIMEOUT = 15
Stage = agent_pb2.Timing.Stage
Status = agent_pb2.Timing.Status


def script(n: int, body: str, **fields: Any) -> agent_pb2.WorkspaceAgentScript:
    return agent_pb2.WorkspaceAgentScript(
        display_name=f"s{n}",
        log_source_id=uuid.UUID(int=n).bytes,
        id=uuid.UUID(int=1000 + n).bytes,
        script=body,
        **fields,
    )


class Agent:
    """A runner with its log sender and timing reporter, connected to coderd-dev."""

    def __init__(self, tmp_path: Path, scripts: list[agent_pb2.WorkspaceAgentScript]) -> None:
        self.tmp = tmp_path
        self.scripts = scripts
        self.clock = task.Clock()
        self.home = tmp_path / "home"
        self.home.mkdir()
        (self.home / "project").mkdir()
        self.data = tmp_path / "data"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()

    async def start(self) -> None:
        self.server = Coderd(Workspace(scripts=self.scripts))
        port = await self.server.start()
        self.client = CoderdClient(url=f"http://127.0.0.1:{port}", token=TOKEN, reactor=reactor)
        sender = LogSender(self.client, reactor)
        sender.setServiceParent(self.client)
        timings = TimingReporter(self.client, reactor)
        timings.setServiceParent(self.client)
        environ = {
            "HOME": str(self.home),
            "PATH": "/usr/bin:/bin",
            "CODER_AGENT_TOKEN": "secret",
            "WHERE": "somewhere",
        }
        workspace = WorkspaceEnvironment(
            environ,
            UserInfo("dev", str(self.home), "/bin/sh"),
            scriptBinDir=scriptBinDir(str(self.data)),
        )
        self.manifest = agent_pb2.Manifest(
            directory="~/project", environment_variables={"FROM": "manifest"}, scripts=self.scripts
        )
        workspace.update(self.manifest)
        self.runner = ScriptRunner(
            reactor=reactor,
            clock=self.clock,
            workspace=workspace,
            dataDirBase=str(self.data),
            logDir=str(self.logs),
            logs=sender,
            timings=timings,
        )
        self.client.startService()

    async def stop(self) -> None:
        await self.client.stopService()
        await self.server.stop()

    async def drained(self) -> None:
        await self.runner.drain().addTimeout(TIMEOUT, reactor)

    def lines(self, n: int) -> list[str]:
        record = self.server.api.scripts.sources.get(uuid.UUID(int=n))
        return [line.output for line in record.lines] if record else []

    def timings(self) -> dict[str, tuple[int, int, int]]:
        by = {uuid.UUID(bytes=s.id): s.display_name for s in self.scripts}
        return {
            by[uuid.UUID(bytes=t.script_id)]: (t.stage, t.status, t.exit_code)
            for t in self.server.api.scripts.timings
        }


@pytest_twisted.async_yield_fixture
async def agent(tmp_path: Path, request: Any) -> AsyncIterator[Agent]:
    a = Agent(tmp_path, request.param)
    await a.start()
    yield a
    await a.stop()


def scripts(*items: agent_pb2.WorkspaceAgentScript) -> Any:
    return pytest.mark.parametrize("agent", [list(items)], indirect=True)


ENV = (
    'echo "data=$CODER_SCRIPT_DATA_DIR"; echo "bin=$CODER_SCRIPT_BIN_DIR"; '
    'echo "path=${PATH%%:*}"; echo "pwd=$(pwd)"; echo "from=$FROM"; '
    'echo "token=${CODER_AGENT_TOKEN-unset}"'
)


@scripts(script(1, ENV, run_on_start=True, log_path="~/logs/$WHERE.log"))
@pytest_twisted.ensureDeferred
async def test_a_script_runs_where_and_as_upstream_runs_it(agent: Agent) -> None:
    (agent.home / "logs").mkdir()
    outcome = await agent.runner.start(agent.manifest).addTimeout(TIMEOUT, reactor)
    await agent.drained()
    assert outcome is Outcome.OK
    data = agent.data / "coder-script-data" / str(uuid.UUID(int=1))
    binDir = agent.data / "coder-script-data" / "bin"
    expected = [
        f"data={data}",
        f"bin={binDir}",
        f"path={binDir}",
        f"pwd={agent.home}/project",
        "from=manifest",
        "token=unset",
    ]
    assert agent.lines(1) == expected
    logFile = agent.home / "logs" / "somewhere.log"
    assert logFile.read_text().splitlines() == expected
    assert stat.S_IMODE(logFile.stat().st_mode) == 0o600
    for directory in (data, binDir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert agent.timings() == {"s1": (Stage.START, Status.OK, 0)}


def test_log_paths_resolve_as_upstream() -> None:
    source = uuid.UUID(int=7)
    env = {"HOME": "/home/dev", "D": "/var/log", "CODER_AGENT_TOKEN": "t"}
    assert logPath("", source, "/tmp/logs", "/home/dev", env) == (
        f"/tmp/logs/coder-script-{source}.log"
    )
    assert logPath("x.log", source, "/tmp/logs", "/home/dev", env) == "/tmp/logs/x.log"
    assert logPath("~/x.log", source, "/tmp", "/home/dev", env) == "/home/dev/x.log"
    assert logPath("$D/x.log", source, "/tmp", "/home/dev", env) == "/var/log/x.log"
    assert logPath("$CODER_AGENT_TOKEN.log", source, "/tmp", "/h", env) == "/tmp/.log"


@scripts(
    script(1, "sleep 0.3; exit 2", run_on_start=True),
    script(2, "exit 5", run_on_start=True),
    script(3, "echo fine", run_on_start=True),
    script(4, "echo never", run_on_stop=True),
)
@pytest_twisted.ensureDeferred
async def test_start_scripts_run_in_parallel_and_the_first_failure_decides(
    agent: Agent,
) -> None:
    outcome = await agent.runner.start(agent.manifest).addTimeout(TIMEOUT, reactor)
    await agent.drained()
    assert outcome is Outcome.FAILED
    assert agent.timings() == {
        "s1": (Stage.START, Status.EXIT_FAILURE, 2),
        "s2": (Stage.START, Status.EXIT_FAILURE, 5),
        "s3": (Stage.START, Status.OK, 0),
    }


@scripts(
    script(
        1, "echo waiting; sleep 60", run_on_start=True, timeout=duration_pb2.Duration(seconds=5)
    ),
    script(2, "sleep 0.2; exit 1", run_on_start=True),
)
@pytest_twisted.ensureDeferred
async def test_a_timeout_that_comes_first_is_timed_out(agent: Agent) -> None:
    started = agent.runner.start(agent.manifest)
    await until(lambda: "waiting" in agent.lines(1), 'the script\'s line "waiting"')
    agent.clock.advance(5)
    outcome = await started.addTimeout(TIMEOUT, reactor)
    assert outcome is Outcome.TIMED_OUT
    await agent.drained()
    assert agent.timings()["s1"] == (Stage.START, Status.TIMED_OUT, 255)


@scripts(
    script(1, "echo up; sleep 60", run_on_start=True),
    script(2, "echo bye from $CODER_SCRIPT_DATA_DIR", run_on_stop=True),
    script(3, "echo tick", cron="*/1 * * * * *"),
)
@pytest_twisted.ensureDeferred
async def test_stopping_ends_start_and_cron_runs_then_runs_the_stop_scripts(
    agent: Agent,
) -> None:
    started = agent.runner.start(agent.manifest)
    await until(lambda: "up" in agent.lines(1), 'the start script\'s line "up"')
    agent.clock.advance(5)
    assert not agent.runner.scheduler.running  # cron waits for the start scripts
    outcome = await agent.runner.stop().addTimeout(TIMEOUT, reactor)
    assert outcome is Outcome.OK
    assert await started is Outcome.FAILED  # the start script was stopped
    agent.clock.advance(5)
    await agent.drained()
    assert agent.timings() == {
        "s1": (Stage.START, Status.EXIT_FAILURE, 255),
        "s2": (Stage.STOP, Status.OK, 0),
    }
    data = agent.data / "coder-script-data" / str(uuid.UUID(int=2))
    assert agent.lines(2) == [f"bye from {data}"]
    assert agent.lines(3) == []  # cron never started


@scripts(
    script(1, "echo tick", cron="*/2 * * * * * *"),
    script(2, "echo ok", run_on_start=True),
)
@pytest_twisted.ensureDeferred
async def test_an_invalid_schedule_is_a_start_error_with_a_line_in_its_log(agent: Agent) -> None:
    outcome = await agent.runner.start(agent.manifest).addTimeout(TIMEOUT, reactor)
    await agent.drained()
    assert outcome is Outcome.FAILED
    assert agent.lines(1) == [
        'coder-agent: cannot run the script: invalid cron schedule "*/2 * * * * * *": '
        "expected 5 to 6 fields, found 7: [*/2 * * * * * *]"
    ]
    assert agent.timings() == {
        "s1": (Stage.CRON, Status.EXIT_FAILURE, 255),
        "s2": (Stage.START, Status.OK, 0),
    }
