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
import uuid
from collections import deque
from collections.abc import Callable, Sequence
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
from coderagent.gotext import goQuote
from coderagent.observe.logs import humanLine
from coderagent.pb import agent_pb2

log = Logger()

MAX_BOUNDARY_LOGS_PER_BATCH = 1000

#: How many of each kind of report the state file shows (the newest).
KEEP_IN_STATE = 1000

#: How many ReportBoundaryLogs requests coderd-dev remembers (bounded memory).
KEEP_BOUNDARY_REQUESTS = 20_000

#: UpdateStats' answer: when to report next (coderd's default ``--agent-stats-refresh-interval``).
STATS_INTERVAL_SECONDS = 30.0

#: How many resources usage pushes coderd-dev remembers.
KEEP_RESOURCE_PUSHES = 20

#: How much of a metadata value its ``agent metadata`` line shows.
METADATA_SHOWN = 80

#: The stats fields coderd-dev's ``agent stats`` line shows, in order.
STATS_LINE_FIELDS = (
    "connection_count",
    "session_count_ssh",
    "session_count_vscode",
    "session_count_jetbrains",
    "rx_bytes",
    "tx_bytes",
    "rx_packets",
    "tx_packets",
)


Handler = Callable[[bytes], Any]


class DevAgentAPI:
    """coderd's agent RPCs for one workspace agent, answered and recorded in memory."""

    def __init__(
        self,
        workspace: Workspace,
        clock: Callable[[], float] = time.time,
        out: IO[str] | None = None,
        logLimit: int = LOG_LIMIT,
        *,
        reportInterval: float = STATS_INTERVAL_SECONDS,
        monitoring: agent_pb2.GetResourcesMonitoringConfigurationResponse | None = None,
    ) -> None:
        """``out`` receives the ``boundary_request``, script and report lines (default:
        the process's stderr, not whatever twistd later puts in ``sys.stderr``);
        ``logLimit`` is coderd's bound on the agent's script logs; ``reportInterval``
        is the stats interval UpdateStats answers (``--report-interval``);
        ``monitoring`` the resources monitoring configuration (``--monitor-*``;
        default: nothing watched)."""
        self.workspace = workspace
        self.reportInterval = reportInterval
        self.monitoring = monitoring or resourcesMonitoring()
        self.clock = clock
        self.out: IO[str] = out or sys.__stderr__ or sys.stderr
        self.lifecycle: list[int] = []
        #: When the agent says each lifecycle state began (``changed_at``, Unix seconds).
        self.lifecycleChangedAt: list[float] = []
        #: Every startup reported (the agent reports it on each connection).
        self.startups: list[agent_pb2.Startup] = []
        self.connections: deque[agent_pb2.Connection] = deque(maxlen=KEEP_IN_STATE)
        #: The latest stats reports (blank ones, which only ask the interval, are not kept).
        self.stats: deque[agent_pb2.Stats] = deque(maxlen=KEEP_IN_STATE)
        #: Sums over every stats report, of the fields that are per period.
        self.statsTotals = dict.fromkeys(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"), 0)
        self.scripts = ScriptRecords(workspace, lambda: self.out, clock, logLimit)
        #: The latest value of each metadata key, as the agent sent it.
        self.metadata: dict[str, agent_pb2.WorkspaceAgentMetadata.Result] = {}
        #: Each app's health as the agent last reported it, by app id (16 bytes).
        self.appHealth: dict[bytes, int] = {}
        #: The latest resources usage pushes, each the agent's window of datapoints.
        self.resourcePushes: deque[agent_pb2.PushResourcesMonitoringUsageRequest] = deque(
            maxlen=KEEP_RESOURCE_PUSHES
        )
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
            ("BatchUpdateMetadata", self.batchUpdateMetadata),
            ("GetResourcesMonitoringConfiguration", self.getResourcesMonitoringConfiguration),
            ("PushResourcesMonitoringUsage", self.pushResourcesMonitoringUsage),
            ("BatchUpdateAppHealths", self.batchUpdateAppHealths),
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
            "connections": [_json(c) for c in self.connections],
            "stats": [_json(s) for s in self.stats],
            "stats_totals": dict(self.statsTotals),
            "metadata": {key: _json(result) for key, result in sorted(self.metadata.items())},
            "app_health": {
                str(uuid.UUID(bytes=app.id)): {
                    "slug": app.slug,
                    "health": agent_pb2.WorkspaceApp.Health.Name(self._health(app)),
                }
                for app in self.workspace.apps
            },
            "resources": {
                "configuration": _json(self.monitoring),
                "pushes": [_json(push) for push in self.resourcePushes],
            },
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
        manifest = self.workspace.manifest()
        self._appHealthInto(manifest)
        return manifest

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

    # -- ReportConnection ------------------------------------------------------------

    def reportConnection(self, request: agent_pb2.ReportConnectionRequest) -> Message:
        c = request.connection
        if len(c.id) != 16:
            raise DRPCError(0, f"connection id from bytes: invalid UUID (got {len(c.id)} bytes)")
        if c.id == bytes(16):
            raise DRPCError(0, "connection ID cannot be nil")
        if c.action == agent_pb2.Connection.ACTION_UNSPECIFIED:
            raise DRPCError(0, "unmapped agent proto connection action: ACTION_UNSPECIFIED")
        if c.type == agent_pb2.Connection.TYPE_UNSPECIFIED:
            raise DRPCError(0, "unmapped agent proto connection type: TYPE_UNSPECIFIED")
        self.connections.append(c)
        ended = ""
        if c.action == agent_pb2.Connection.DISCONNECT:
            ended = f" status={c.status_code} reason={goQuote(c.reason)}"
        log.info(
            "agent connection {action}: {type} from {ip} id={id}{ended}",
            action=agent_pb2.Connection.Action.Name(c.action),
            type=agent_pb2.Connection.Type.Name(c.type),
            ip=c.ip or "?",
            id=uuid.UUID(bytes=c.id),
            ended=ended,
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

    # -- UpdateStats -----------------------------------------------------------------

    def updateStats(self, request: agent_pb2.UpdateStatsRequest) -> Message:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(self.reportInterval * 1e9))
        response = agent_pb2.UpdateStatsResponse(report_interval=interval)
        if not request.HasField("stats"):
            return response  # as coderd: a blank report only asks for the interval
        stats = request.stats
        self.stats.append(stats)
        for name in self.statsTotals:
            self.statsTotals[name] += getattr(stats, name)
        shown = " ".join(f"{name}={getattr(stats, name)}" for name in STATS_LINE_FIELDS)
        log.info(
            "agent stats: {fields} metrics={metrics}", fields=shown, metrics=len(stats.metrics)
        )
        return response

    # -- BatchUpdateMetadata ---------------------------------------------------------

    def batchUpdateMetadata(self, request: agent_pb2.BatchUpdateMetadataRequest) -> Message:
        keys = {d.key for d in self.workspace.metadata}
        for item in request.metadata:
            if item.key not in keys:
                log.warn("agent metadata for a key not in the manifest: {key}", key=item.key)
                continue
            self.metadata[item.key] = item.result
            value = item.result.value
            log.info(
                "agent metadata {key}: {size} bytes {value} error={error}",
                key=item.key,
                size=len(value.encode()),
                value=goQuote(value[:METADATA_SHOWN]),
                error=goQuote(item.result.error),
            )
        return agent_pb2.BatchUpdateMetadataResponse()

    # -- BatchUpdateAppHealths -------------------------------------------------------

    def batchUpdateAppHealths(self, request: agent_pb2.BatchUpdateAppHealthRequest) -> Message:
        apps = {app.id: app for app in self.workspace.apps}
        for update in request.updates:
            app = apps.get(update.id)
            if app is None:
                raise DRPCError(0, "workspace agent app not found")
            if self._health(app) == agent_pb2.WorkspaceApp.DISABLED:
                raise DRPCError(0, f"workspace app {app.slug} health reporting is disabled")
        for update in request.updates:
            health = update.health
            self.appHealth[update.id] = health
            log.info(
                "agent app health: {slug} {health}",
                slug=apps[update.id].slug,
                health=agent_pb2.AppHealth.Name(health),
            )
        return agent_pb2.BatchUpdateAppHealthResponse()

    def _health(self, app: agent_pb2.WorkspaceApp) -> int:
        """An app's health as coderd holds it: reported, else from its manifest entry
        (coderd starts an app with a health check INITIALIZING, any other DISABLED)."""
        if app.id in self.appHealth:
            return self.appHealth[app.id]
        if app.health != agent_pb2.WorkspaceApp.HEALTH_UNSPECIFIED:
            return app.health
        if app.healthcheck.url:
            return agent_pb2.WorkspaceApp.INITIALIZING
        return agent_pb2.WorkspaceApp.DISABLED

    def _appHealthInto(self, manifest: agent_pb2.Manifest) -> None:
        for app in manifest.apps:
            app.health = self._health(app)

    # -- resources monitoring ----------------------------------------------------------

    def getResourcesMonitoringConfiguration(
        self, request: agent_pb2.GetResourcesMonitoringConfigurationRequest
    ) -> Message:
        return self.monitoring

    def pushResourcesMonitoringUsage(
        self, request: agent_pb2.PushResourcesMonitoringUsageRequest
    ) -> Message:
        self.resourcePushes.append(request)
        if request.datapoints:
            latest = request.datapoints[-1]
            parts = []
            if latest.HasField("memory"):
                parts.append(f"memory_used={latest.memory.used} memory_total={latest.memory.total}")
            parts.extend(f"volume={v.volume} used={v.used} total={v.total}" for v in latest.volumes)
            log.info(
                "agent resources: datapoints={count} {latest}",
                count=len(request.datapoints),
                latest=" ".join(parts),
            )
        return agent_pb2.PushResourcesMonitoringUsageResponse()

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


def resourcesMonitoring(
    *, memory: bool = False, volumes: Sequence[str] = (), interval: int = 10, datapoints: int = 20
) -> agent_pb2.GetResourcesMonitoringConfigurationResponse:
    """A resources monitoring configuration, as coderd builds it from the template's
    ``resources_monitoring`` (coderd's interval is 10 s, its window 20 datapoints)."""
    Response = agent_pb2.GetResourcesMonitoringConfigurationResponse
    config = Response(
        config=Response.Config(num_datapoints=datapoints, collection_interval_seconds=interval),
        volumes=[Response.Volume(enabled=True, path=path) for path in volumes],
    )
    if memory:
        config.memory.enabled = True
    return config


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
