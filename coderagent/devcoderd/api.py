"""coderd's agent RPCs, answered from the workspace and recorded in memory.

:class:`DevAgentAPI` is coderd-dev's whole state: what the agent reported
(lifecycle, startups, connections, stats, script logs per source and
timings, boundary logs, ...), readable
by tests in the same process (``when``) and by a person through
``--state-file`` (:meth:`DevAgentAPI.state`).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from google.protobuf import duration_pb2, empty_pb2, json_format
from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.devcoderd.coderdlog import boundaryLines, formatFields, rfc3339Nano, rpcLog
from coderagent.devcoderd.scriptlogs import LOG_LIMIT, ScriptRecords
from coderagent.devcoderd.workspace import Workspace
from coderagent.observe.logs import humanLine
from coderagent.pb import agent_pb2

log = Logger()

MAX_BOUNDARY_LOGS_PER_BATCH = 1000

#: How many of each kind of report the state file shows (the newest).
KEEP_IN_STATE = 1000

#: How many ReportBoundaryLogs requests coderd-dev remembers (bounded memory).
KEEP_BOUNDARY_REQUESTS = 20_000

#: UpdateStats' answer: when to report next (coderd's default interval).
STATS_INTERVAL_SECONDS = 30


Handler = Callable[[bytes], Any]


class DevAgentAPI:
    """coderd's agent RPCs for one workspace agent, answered and recorded in memory."""

    def __init__(
        self,
        workspace: Workspace,
        clock: Callable[[], float] = time.time,
        out: IO[str] | None = None,
        logLimit: int = LOG_LIMIT,
    ) -> None:
        """``out`` receives the ``boundary_request`` and script lines (default: the
        process's stderr, not whatever twistd later puts in ``sys.stderr``);
        ``logLimit`` is coderd's bound on the agent's script logs."""
        self.workspace = workspace
        self.clock = clock
        self.out: IO[str] = out or sys.__stderr__ or sys.stderr
        self.lifecycle: list[int] = []
        #: When the agent says each lifecycle state began (``changed_at``, Unix seconds).
        self.lifecycleChangedAt: list[float] = []
        #: Every startup reported (the agent reports it on each connection).
        self.startups: list[agent_pb2.Startup] = []
        self.connections: list[agent_pb2.Connection] = []
        self.stats: list[agent_pb2.Stats] = []
        self.scripts = ScriptRecords(workspace, lambda: self.out, clock, logLimit)
        self.boundaryLogs = 0
        self._boundarySessions: set[str] = set()
        #: The latest ReportBoundaryLogs requests accepted, in order (for tests and inspection).
        self.boundaryRequests: deque[agent_pb2.ReportBoundaryLogsRequest] = deque(
            maxlen=KEEP_BOUNDARY_REQUESTS
        )
        self._waiters: list[tuple[Callable[[DevAgentAPI], bool], Deferred[None]]] = []
        self._changeHooks: list[Callable[[], None]] = []
        self.handlers: dict[str, Handler] = {}
        for name, method in (
            ("GetManifest", self.getManifest),
            ("UpdateLifecycle", self.updateLifecycle),
            ("UpdateStartup", self.updateStartup),
            ("ReportConnection", self.reportConnection),
            ("BatchCreateLogs", self.batchCreateLogs),
            ("GetAnnouncementBanners", self.getAnnouncementBanners),
            ("ScriptCompleted", self.scripts.scriptCompleted),
            ("UpdateStats", self.updateStats),
            ("ReportBoundaryLogs", self.reportBoundaryLogs),
        ):
            self.handlers[RPCS[name].path] = _typed(RPCS[name].request, method, self._handled)

    def when(self, condition: Callable[[DevAgentAPI], bool]) -> Deferred[None]:
        """Fires once ``condition(api)`` holds, checked after every call handled."""
        d: Deferred[None] = Deferred()
        if condition(self):
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d

    def onChange(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every call handled (the state may have changed)."""
        self._changeHooks.append(hook)

    def _handled(self) -> None:
        for condition, d in list(self._waiters):
            if condition(self):
                self._waiters.remove((condition, d))
                d.callback(None)
        for hook in self._changeHooks:
            hook()

    def state(self) -> dict[str, Any]:
        """What the agent reported, as JSON-ready data (``--state-file``)."""
        w = self.workspace
        return {
            "workspace": {
                "agent_id": str(w.agentID),
                "workspace_id": str(w.workspaceID),
                "workspace_name": w.workspaceName,
                "owner_username": w.ownerUsername,
            },
            "lifecycle": [agent_pb2.Lifecycle.State.Name(s) for s in self.lifecycle],
            "lifecycle_changed_at": [
                rfc3339Nano(datetime.fromtimestamp(t, tz=UTC)) for t in self.lifecycleChangedAt
            ],
            "startup": _json(self.startup) if self.startup is not None else None,
            "startups": len(self.startups),
            "connections": [_json(c) for c in self.connections[-KEEP_IN_STATE:]],
            "stats": [_json(s) for s in self.stats[-KEEP_IN_STATE:]],
            **self.scripts.state(KEEP_IN_STATE),
            "boundary": {"logs": self.boundaryLogs, "sessions": len(self._boundarySessions)},
        }

    @property
    def startup(self) -> agent_pb2.Startup | None:
        """The startup the agent reported last."""
        return self.startups[-1] if self.startups else None

    @property
    def logs(self) -> list[agent_pb2.Log]:
        """Every script log line taken (all sources)."""
        return self.scripts.logs

    def getManifest(self, request: agent_pb2.GetManifestRequest) -> Message:
        return self.workspace.manifest()

    def updateLifecycle(self, request: agent_pb2.UpdateLifecycleRequest) -> Message:
        state = request.lifecycle.state
        self.lifecycle.append(state)
        self.lifecycleChangedAt.append(request.lifecycle.changed_at.ToNanoseconds() / 1e9)
        log.info(
            "agent lifecycle: {state}", state=agent_pb2.Lifecycle.State.Name(state), state_id=state
        )
        return request.lifecycle

    def updateStartup(self, request: agent_pb2.UpdateStartupRequest) -> Message:
        self.startups.append(request.startup)
        log.info(
            "agent startup: version {version}, directory {directory}",
            version=request.startup.version or '""',
            directory=request.startup.expanded_directory or '""',
        )
        return request.startup

    def reportConnection(self, request: agent_pb2.ReportConnectionRequest) -> Message:
        self.connections.append(request.connection)
        c = request.connection
        log.info(
            "agent connection {action}: {type} from {ip}",
            action=agent_pb2.Connection.Action.Name(c.action),
            type=agent_pb2.Connection.Type.Name(c.type),
            ip=c.ip or "?",
        )
        return empty_pb2.Empty()

    def batchCreateLogs(self, request: agent_pb2.BatchCreateLogsRequest) -> Message:
        return self.scripts.batchCreateLogs(request)

    def getAnnouncementBanners(self, request: agent_pb2.GetAnnouncementBannersRequest) -> Message:
        return agent_pb2.GetAnnouncementBannersResponse(
            announcement_banners=[
                agent_pb2.BannerConfig(enabled=True, message=text)
                for text in self.workspace.banners
            ]
        )

    def updateStats(self, request: agent_pb2.UpdateStatsRequest) -> Message:
        self.stats.append(request.stats)
        return agent_pb2.UpdateStatsResponse(
            report_interval=duration_pb2.Duration(seconds=STATS_INTERVAL_SECONDS)
        )

    def reportBoundaryLogs(self, request: agent_pb2.ReportBoundaryLogsRequest) -> Message:
        count = len(request.logs)
        if count == 0:
            rpcLog.debug("empty boundary logs request, skipping")
            return agent_pb2.ReportBoundaryLogsResponse()
        if count > MAX_BOUNDARY_LOGS_PER_BATCH:
            limit = MAX_BOUNDARY_LOGS_PER_BATCH
            raise DRPCError(0, f"batch size {count} exceeds maximum of {limit}")
        received = self.clock()
        self.boundaryRequests.append(request)
        lines = boundaryLines(self.workspace, request, received)
        self.boundaryLogs += len(lines)
        if request.session_id not in self._boundarySessions:
            # coderd stores a boundary_sessions row (with the process name) the
            # first time it sees a session; coderd-dev shows it as a line.
            if len(self._boundarySessions) >= KEEP_BOUNDARY_REQUESTS:
                self._boundarySessions.clear()
            self._boundarySessions.add(request.session_id)
            fields = [
                ("session_id", request.session_id),
                ("confined_process_name", request.confined_process_name),
            ]
            text = formatFields("boundary_session", fields)
            lines.insert(0, humanLine(received, LogLevel.info, "coderd-dev", text))
        # One write per batch, straight to the sink: at tens of thousands of
        # logs a second, the logging system's per-event work would be the
        # bottleneck of every benchmark run through coderd-dev.
        self.out.write("".join(lines))
        self.out.flush()
        return agent_pb2.ReportBoundaryLogsResponse()


def _json(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def _typed(
    requestType: type[Message], method: Callable[[Any], Message], after: Callable[[], None]
) -> Handler:
    def handle(data: bytes) -> bytes:
        try:
            request = requestType.FromString(data)
        except DecodeError as e:
            raise DRPCError(0, f"unmarshal {requestType.DESCRIPTOR.full_name}: {e}") from e
        try:
            response: bytes = method(request).SerializeToString()
        finally:
            after()
        return response

    return handle


# -- the HTTP side: the upgrade, and yamux on it ----------------------------------------

