"""coderd-dev's record of the workspace's scripts: their logs and their timings.

``BatchCreateLogs`` is answered as coderd answers it: an empty request is
skipped; the log source must be a UUID, and one coderd knows (a script's
``log_source_id`` from the manifest, or the nil UUID that coderd turns into
its "External" source); the agent's logs may add up to :data:`LOG_LIMIT`
bytes of output (coderd's ``max_logs_length``), and a batch that would pass
it is refused whole, the agent marked as overflowed, and that and every
later batch answered ``log_limit_exceeded``.

``ScriptCompleted`` is checked as coderd checks it (a known script id, start
and end times set, the start not after the end) and recorded.

Each line and each timing is also written to stderr (``coderd-dev:
script_log …``, ``coderd-dev: script_completed …``), so a person running the
README's command reads the scripts' output as the dashboard would show it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import IO, Any

from twisted.logger import LogLevel

from coderagent.coderd.drpcwire import DRPCError
from coderagent.devcoderd.coderdlog import formatFields, rfc3339Nano
from coderagent.devcoderd.workspace import Workspace
from coderagent.observe.logs import humanLine
from coderagent.pb import agent_pb2

#: coderd's bound on an agent's script logs (``workspace_agents.logs_length``).
LOG_LIMIT = 1048576

#: The log source coderd uses for logs sent with the nil UUID.
EXTERNAL_SOURCE = uuid.UUID(int=0)

_LEVELS = {
    agent_pb2.Log.TRACE: "trace",
    agent_pb2.Log.DEBUG: "debug",
    agent_pb2.Log.INFO: "info",
    agent_pb2.Log.WARN: "warn",
    agent_pb2.Log.ERROR: "error",
}


@dataclass
class SourceLog:
    """The lines one log source sent, in the order coderd took them."""

    name: str
    lines: list[agent_pb2.Log] = field(default_factory=list)


class ScriptRecords:
    """Script logs and timings, kept and checked as coderd does."""

    def __init__(
        self,
        workspace: Workspace,
        out: Callable[[], IO[str]],
        clock: Callable[[], float],
        logLimit: int = LOG_LIMIT,
    ) -> None:
        self.workspace = workspace
        self.out = out
        self.clock = clock
        self.logLimit = logLimit
        self.logsLength = 0
        self.logsOverflowed = False
        self.sources: dict[uuid.UUID, SourceLog] = {}
        self.timings: list[agent_pb2.Timing] = []
        self._names = {EXTERNAL_SOURCE: "External"}
        self._scripts: dict[uuid.UUID, str] = {}
        for script in workspace.scripts:
            name = script.display_name or str(uuid.UUID(bytes=script.log_source_id))
            self._names[uuid.UUID(bytes=script.log_source_id)] = name
            self._scripts[uuid.UUID(bytes=script.id)] = name

    @property
    def logs(self) -> list[agent_pb2.Log]:
        """Every line taken, all sources, in order of arrival per source."""
        return [line for source in self.sources.values() for line in source.lines]

    def batchCreateLogs(
        self, request: agent_pb2.BatchCreateLogsRequest
    ) -> agent_pb2.BatchCreateLogsResponse:
        if not request.logs:
            return agent_pb2.BatchCreateLogsResponse()
        try:
            source = uuid.UUID(bytes=request.log_source_id)
        except ValueError as e:
            raise DRPCError(0, f"parse log source ID {request.log_source_id!r}: {e}") from e
        if source not in self._names:
            raise DRPCError(
                0,
                "insert workspace agent logs: workspace_agent_logs violates foreign key "
                f"constraint: unknown log source {source}",
            )
        if self.logsOverflowed:
            return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        length = sum(len(entry.output.encode("utf-8")) for entry in request.logs)
        if self.logsLength + length > self.logLimit:
            self.logsOverflowed = True
            self._write(
                [
                    humanLine(
                        self.clock(),
                        LogLevel.warn,
                        "coderd-dev",
                        formatFields(
                            "script logs overflowed",
                            [
                                ("limit", str(self.logLimit)),
                                ("logs_length", str(self.logsLength)),
                                ("refused", str(length)),
                            ],
                        ),
                    )
                ]
            )
            return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        self.logsLength += length
        record = self.sources.setdefault(source, SourceLog(self._names[source]))
        record.lines.extend(request.logs)
        now = self.clock()
        self._write(
            [
                humanLine(
                    now,
                    LogLevel.info,
                    "coderd-dev",
                    formatFields(
                        "script_log",
                        [
                            ("source", record.name),
                            ("level", _LEVELS.get(entry.level, "info")),
                            ("output", entry.output),
                        ],
                    ),
                )
                for entry in request.logs
            ]
        )
        return agent_pb2.BatchCreateLogsResponse()

    def scriptCompleted(
        self, request: agent_pb2.WorkspaceAgentScriptCompletedRequest
    ) -> agent_pb2.WorkspaceAgentScriptCompletedResponse:
        timing = request.timing
        try:
            script = uuid.UUID(bytes=timing.script_id)
        except ValueError as e:
            raise DRPCError(0, f"script id from bytes: {e}") from e
        if script not in self._scripts:
            raise DRPCError(
                0,
                f"insert workspace agent script timings into database: unknown script {script}",
            )
        if not timing.HasField("start") or timing.start.ToNanoseconds() == 0:
            raise DRPCError(0, "script start time is required and cannot be zero")
        if not timing.HasField("end") or timing.end.ToNanoseconds() == 0:
            raise DRPCError(0, "script end time is required and cannot be zero")
        if timing.start.ToNanoseconds() > timing.end.ToNanoseconds():
            raise DRPCError(0, "script start time cannot be after end time")
        self.timings.append(timing)
        seconds = (timing.end.ToNanoseconds() - timing.start.ToNanoseconds()) / 1e9
        fields = [
            ("script", self._scripts[script]),
            ("stage", agent_pb2.Timing.Stage.Name(timing.stage)),
            ("status", agent_pb2.Timing.Status.Name(timing.status)),
            ("exit_code", str(timing.exit_code)),
            ("duration", f"{seconds:.3f}s"),
        ]
        line = formatFields("script_completed", fields)
        self._write([humanLine(self.clock(), LogLevel.info, "coderd-dev", line)])
        return agent_pb2.WorkspaceAgentScriptCompletedResponse()

    def _write(self, lines: list[str]) -> None:
        out = self.out()
        out.write("".join(lines))
        out.flush()

    def state(self, keep: int) -> dict[str, Any]:
        """The logs (the newest ``keep`` lines per source) and timings, JSON-ready."""
        return {
            "logs_length": self.logsLength,
            "logs_overflowed": self.logsOverflowed,
            "logs": {
                str(source): {
                    "name": record.name,
                    "count": len(record.lines),
                    "lines": [
                        {"level": _LEVELS.get(entry.level, "info"), "output": entry.output}
                        for entry in record.lines[-keep:]
                    ],
                }
                for source, record in self.sources.items()
            },
            "timings": [
                {
                    "script": self._scripts.get(uuid.UUID(bytes=t.script_id), ""),
                    "script_id": str(uuid.UUID(bytes=t.script_id)),
                    "stage": agent_pb2.Timing.Stage.Name(t.stage),
                    "status": agent_pb2.Timing.Status.Name(t.status),
                    "exit_code": t.exit_code,
                    "start": rfc3339Nano(t.start.ToDatetime(tzinfo=UTC)),
                    "end": rfc3339Nano(t.end.ToDatetime(tzinfo=UTC)),
                }
                for t in self.timings[-keep:]
            ],
        }
