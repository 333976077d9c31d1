"""coderd's log lines, as its human sink (cdr.dev/slog's sloghuman) writes them.

coderd-dev writes every boundary audit log to stderr exactly as coderd does
(``coderd.agentrpc: boundary_request  owner=…``), so what reaches "coderd"
can be read off its log, by a person or a test.
"""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime

from twisted.logger import Logger, LogLevel

from coderagent.devcoderd.workspace import Workspace
from coderagent.gotext import goQuote
from coderagent.observe.logs import humanLine
from coderagent.pb import agent_pb2

log = Logger()
#: coderd's logger for the agent API: ``api.Logger.Named("agentrpc")``.
rpcLog = Logger(namespace="coderd.agentrpc")



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

