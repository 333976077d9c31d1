"""coderd-dev: the server side of the agent API, in memory, for development and tests.

It serves what a real coderd serves at ``/api/v2/workspaceagents/me/rpc``:
the same WebSocket upgrade (token checked, 401 otherwise), yamux as the
server, one DRPC connection per stream, and the Agent RPCs the agent uses,
answered from a manifest and recorded.  Every boundary audit log is written
to stderr the way coderd writes it (``coderd.agentrpc: boundary_request
owner=…``, the line coderd's ``agentapi`` logs per boundary log), so what
reaches "coderd" can be read off its log.

Nothing here is used by the agent itself.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.cookies import CookieError, SimpleCookie
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import duration_pb2, empty_pb2
from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from wsproto.events import Request

from coderagent.coderd.api import RPC_PATH, RPCS, UNAUTHORIZED_MESSAGE
from coderagent.coderd.drpcwire import DRPCError
from coderagent.coderd.yamux import YamuxSession, YamuxStream
from coderagent.devcoderd.drpcserver import DRPCServerProtocol
from coderagent.devcoderd.websocketserver import Acceptance, WebSocketServerProtocol
from coderagent.gotext import goQuote
from coderagent.observe.logs import humanLine
from coderagent.pb import agent_pb2

log = Logger()
#: coderd's logger for the agent API: ``api.Logger.Named("agentrpc")``.
rpcLog = Logger(namespace="coderd.agentrpc")

#: coderd refuses larger ReportBoundaryLogs batches (maxBoundaryLogsPerBatch).
MAX_BOUNDARY_LOGS_PER_BATCH = 1000

#: Agent API versions coderd-dev accepts (major 2, minors up to this).
MAX_MINOR_VERSION = 13

#: How many ReportBoundaryLogs requests coderd-dev remembers (bounded memory).
KEEP_BOUNDARY_REQUESTS = 20_000

#: UpdateStats' answer: when to report next (coderd's default interval).
STATS_INTERVAL_SECONDS = 30

_SECRET_HEADERS = frozenset({b"cookie", b"coder-session-token", b"authorization"})


class ManifestError(ValueError):
    """The ``--manifest`` file cannot be used; the message says why."""


@dataclass
class Workspace:
    """Who the agent is, as coderd knows it: the manifest and the template ids."""

    agentID: uuid.UUID = field(default_factory=uuid.uuid4)
    agentName: str = "main"
    workspaceID: uuid.UUID = field(default_factory=uuid.uuid4)
    workspaceName: str = "dev"
    ownerUsername: str = "developer"
    templateID: uuid.UUID = field(default_factory=uuid.uuid4)
    templateVersionID: uuid.UUID = field(default_factory=uuid.uuid4)
    directory: str = ""
    environmentVariables: dict[str, str] = field(default_factory=dict)
    motdPath: str = ""
    banners: list[str] = field(default_factory=list)

    _UUIDS = {
        "agent_id": "agentID",
        "workspace_id": "workspaceID",
        "template_id": "templateID",
        "template_version_id": "templateVersionID",
    }
    _TEXTS = {
        "agent_name": "agentName",
        "workspace_name": "workspaceName",
        "owner_username": "ownerUsername",
        "directory": "directory",
        "motd_path": "motdPath",
    }

    @classmethod
    def fromJSON(cls, text: str, where: str) -> Workspace:
        """Read a manifest file; unknown keys and wrong types are errors, not ignored."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{where}: not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        workspace = cls()
        for key, value in data.items():
            if key in cls._UUIDS:
                try:
                    setattr(workspace, cls._UUIDS[key], uuid.UUID(str(value)))
                except ValueError as e:
                    raise ManifestError(f"{where}: {key}: not a UUID: {value!r}") from e
            elif key in cls._TEXTS:
                if not isinstance(value, str):
                    raise ManifestError(f"{where}: {key}: expected a string")
                setattr(workspace, cls._TEXTS[key], value)
            elif key == "environment_variables":
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise ManifestError(f"{where}: {key}: expected an object of strings")
                workspace.environmentVariables = dict(value)
            elif key == "banners":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ManifestError(f"{where}: {key}: expected a list of strings")
                workspace.banners = list(value)
            else:
                known = sorted([*cls._UUIDS, *cls._TEXTS, "environment_variables", "banners"])
                raise ManifestError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        return workspace

    def manifest(self) -> agent_pb2.Manifest:
        return agent_pb2.Manifest(
            agent_id=self.agentID.bytes,
            agent_name=self.agentName,
            workspace_id=self.workspaceID.bytes,
            workspace_name=self.workspaceName,
            owner_username=self.ownerUsername,
            directory=self.directory,
            environment_variables=self.environmentVariables,
            motd_path=self.motdPath,
        )


# -- coderd's log format (cdr.dev/slog, human sink) -----------------------------------


#: Values sloghuman prints as they are: printable ASCII without space, quote or backslash.
_PLAIN = re.compile(r"[!#-\[\]-~]+")


def slogValue(value: str) -> str:
    """A field value as sloghuman prints it: bare unless it needs Go quoting."""
    if _PLAIN.fullmatch(value):
        return value
    if value == "":
        return '""'
    quoted = goQuote(value)
    if quoted[1:-1] == value and not any(c.isspace() for c in value):
        return value
    return quoted


def rfc3339Nano(when: datetime) -> str:
    """Go's ``time.RFC3339Nano`` in UTC: trailing zeros of the fraction dropped."""
    when = when.astimezone(UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += "." + f"{when.microsecond:06d}".rstrip("0")
    return text + "Z"


@functools.lru_cache(maxsize=1024)
def _utcSeconds(seconds: int) -> str:
    # Logs of one batch mostly share their second: format it once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _timestamp(seconds: int, nanos: int) -> str:
    text = _utcSeconds(seconds)
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _eventTime(logEntry: agent_pb2.BoundaryLog, received: float) -> str:
    if logEntry.HasField("time"):
        return _timestamp(logEntry.time.seconds, logEntry.time.nanos)
    return rfc3339Nano(datetime.fromtimestamp(received, tz=UTC))


def boundaryFields(
    workspace: Workspace,
    request: agent_pb2.ReportBoundaryLogsRequest,
    entry: agent_pb2.BoundaryLog,
    received: float,
) -> list[tuple[str, str]]:
    """coderd's ``boundary_request`` fields for one log, in coderd's order."""
    http = entry.http_request
    fields = [
        ("owner", workspace.ownerUsername),
        ("workspace_name", workspace.workspaceName),
        ("agent_name", workspace.agentName),
        ("decision", "allow" if entry.allowed else "deny"),
        ("session_id", request.session_id),
        ("sequence_number", str(entry.sequence_number)),
        ("workspace_id", str(workspace.workspaceID)),
        ("template_id", str(workspace.templateID)),
        ("template_version_id", str(workspace.templateVersionID)),
        ("http_method", http.method),
        ("http_url", http.url),
        ("event_time", _eventTime(entry, received)),
    ]
    if entry.allowed:
        fields.append(("matched_rule", http.matched_rule))
    return fields


def formatFields(message: str, fields: list[tuple[str, str]]) -> str:
    return "  ".join([message, *(f"{k}={slogValue(v)}" for k, v in fields)])


def boundaryLines(
    workspace: Workspace, request: agent_pb2.ReportBoundaryLogsRequest, received: float
) -> list[str]:
    """coderd's log lines for one batch: ``formatFields(boundaryFields(…))`` per log,
    with everything that is the same for the batch computed once.

    This is coderd-dev's hot path when a benchmark pushes tens of thousands
    of logs a second through it; ``tests/test_devcoderd.py`` checks it
    against the field-by-field definition above.
    """
    # One timestamp per batch, as the batch is logged at one moment.
    prefix = humanLine(received, LogLevel.info, "coderd.agentrpc", "")[:-1]
    head = (
        prefix
        + f"boundary_request  owner={slogValue(workspace.ownerUsername)}"
        + f"  workspace_name={slogValue(workspace.workspaceName)}"
        + f"  agent_name={slogValue(workspace.agentName)}  decision="
    )
    session = f"  session_id={slogValue(request.session_id)}  sequence_number="
    ids = (
        f"  workspace_id={workspace.workspaceID}  template_id={workspace.templateID}"
        f"  template_version_id={workspace.templateVersionID}  http_method="
    )
    receivedTime = ""
    lines = []
    for entry in request.logs:
        if entry.WhichOneof("resource") != "http_request":
            rpcLog.warn("empty http request resource")
            continue
        http = entry.http_request
        if entry.HasField("time"):
            when = _timestamp(entry.time.seconds, entry.time.nanos)
        else:
            receivedTime = receivedTime or _eventTime(entry, received)
            when = receivedTime
        line = (
            head
            + ("allow" if entry.allowed else "deny")
            + session
            + str(entry.sequence_number)
            + ids
            + slogValue(http.method)
            + "  http_url="
            + slogValue(http.url)
            + "  event_time="
            + when
        )
        if entry.allowed:
            line += "  matched_rule=" + slogValue(http.matched_rule)
        lines.append(line + "\n")
    return lines


# -- the Agent API, in memory ----------------------------------------------------------


Handler = Callable[[bytes], Any]


class DevAgentAPI:
    """coderd's agent RPCs for one workspace agent, answered and recorded in memory."""

    def __init__(
        self,
        workspace: Workspace,
        clock: Callable[[], float] = time.time,
        out: IO[str] | None = None,
    ) -> None:
        """``out`` receives the ``boundary_request`` lines (default: the process's stderr,
        not whatever twistd later puts in ``sys.stderr``)."""
        self.workspace = workspace
        self.clock = clock
        self.out: IO[str] = out or sys.__stderr__ or sys.stderr
        self.lifecycle: list[int] = []
        self.startup: agent_pb2.Startup | None = None
        self.connections: list[agent_pb2.Connection] = []
        self.stats: list[agent_pb2.Stats] = []
        self.logs: list[agent_pb2.Log] = []
        self.boundaryLogs = 0
        self._boundarySessions: set[str] = set()
        #: The latest ReportBoundaryLogs requests accepted, in order (for tests and inspection).
        self.boundaryRequests: deque[agent_pb2.ReportBoundaryLogsRequest] = deque(
            maxlen=KEEP_BOUNDARY_REQUESTS
        )
        self._waiters: list[tuple[Callable[[DevAgentAPI], bool], Deferred[None]]] = []
        self.handlers: dict[str, Handler] = {}
        for name, method in (
            ("GetManifest", self.getManifest),
            ("UpdateLifecycle", self.updateLifecycle),
            ("UpdateStartup", self.updateStartup),
            ("ReportConnection", self.reportConnection),
            ("BatchCreateLogs", self.batchCreateLogs),
            ("GetAnnouncementBanners", self.getAnnouncementBanners),
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

    def _handled(self) -> None:
        for condition, d in list(self._waiters):
            if condition(self):
                self._waiters.remove((condition, d))
                d.callback(None)

    def getManifest(self, request: agent_pb2.GetManifestRequest) -> Message:
        return self.workspace.manifest()

    def updateLifecycle(self, request: agent_pb2.UpdateLifecycleRequest) -> Message:
        state = request.lifecycle.state
        self.lifecycle.append(state)
        log.info(
            "agent lifecycle: {state}", state=agent_pb2.Lifecycle.State.Name(state), state_id=state
        )
        return request.lifecycle

    def updateStartup(self, request: agent_pb2.UpdateStartupRequest) -> Message:
        self.startup = request.startup
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
        self.logs.extend(request.logs)
        return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=False)

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


def _requestToken(request: Request) -> str:
    for name, value in request.extra_headers:
        if name.lower() == b"coder-session-token":
            return value.decode("utf-8", "replace")
    for name, value in request.extra_headers:
        if name.lower() == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:
                continue
            morsel = jar.get("coder_session_token")
            if morsel is not None:
                return morsel.value
    return ""


def _supportedVersion(query: Mapping[str, list[str]]) -> bool:
    versions = query.get("version") or ["2.0"]
    major, dot, minor = versions[0].partition(".")
    return major == "2" and (not dot or (minor.isdigit() and int(minor) <= MAX_MINOR_VERSION))


class DevCoderdFactory(Factory):
    """Accepts agent connections: checks path, version and token, then serves the API."""

    noisy = False

    def __init__(self, api: DevAgentAPI, token: str, reactor: Any) -> None:
        self.api = api
        self.token = token
        self.reactor = reactor

    def buildProtocol(self, addr: IAddress | None) -> WebSocketServerProtocol:
        peer = f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
        return WebSocketServerProtocol(lambda request: self.accept(request, peer))

    def accept(self, request: Request, peer: str) -> Acceptance:
        parts = urlsplit(request.target)
        if parts.path != RPC_PATH:
            return 404, f"Route {parts.path} not found."
        if not _supportedVersion(parse_qs(parts.query)):
            return 400, "Unknown or unsupported API version"
        if _requestToken(request) != self.token:
            log.warn("refused agent connection from {peer}: bad or missing token", peer=peer)
            return 401, UNAUTHORIZED_MESSAGE
        shown = [
            f"{name.decode('latin-1')}={value.decode('utf-8', 'replace')}"
            for name, value in request.extra_headers
            if name.lower() not in _SECRET_HEADERS and name.lower().startswith(b"x-")
        ]
        log.info(
            "agent connected from {peer}{headers}",
            peer=peer,
            headers=f" with headers {', '.join(shown)}" if shown else "",
        )
        return _AgentSession(self.api.handlers, peer, self.reactor)


class _AgentSession(YamuxSession):
    """The server end of one agent's yamux session: each stream is one DRPC connection."""

    def __init__(self, handlers: Mapping[str, Handler], peer: str, reactor: Any) -> None:
        super().__init__(client=False, clock=reactor, onStream=self._serve)
        self._handlers = handlers
        self._peer = peer

    def _serve(self, stream: YamuxStream) -> None:
        stream.attach(DRPCServerProtocol(self._handlers))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        log.info("agent {peer} disconnected", peer=self._peer)
