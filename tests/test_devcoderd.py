"""coderd-dev's own pieces: the manifest file, coderd's log format, the upgrade checks."""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from wsproto.events import Request

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.devcoderd.api import DevAgentAPI, resourcesMonitoring
from coderagent.devcoderd.coderdlog import boundaryFields, formatFields, rfc3339Nano, slogValue
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.workspace import ManifestError, Workspace
from coderagent.pb import agent_pb2

IDS = {
    "agent_id": "11111111-1111-1111-1111-111111111111",
    "workspace_id": "22222222-2222-2222-2222-222222222222",
    "template_id": "33333333-3333-3333-3333-333333333333",
    "template_version_id": "44444444-4444-4444-4444-444444444444",
}


def workspace() -> Workspace:
    fields = {
        **IDS,
        "owner_username": "alice",
        "workspace_name": "ws",
        "agent_name": "main",
        "directory": "/src",
        "environment_variables": {"A": "1"},
        "motd_path": "/etc/motd",
    }
    return Workspace.fromJSON(json.dumps(fields), "test")


def test_the_manifest_file_fills_the_manifest() -> None:
    m = workspace().manifest()
    assert uuid.UUID(bytes=m.agent_id) == uuid.UUID(IDS["agent_id"])
    assert uuid.UUID(bytes=m.workspace_id) == uuid.UUID(IDS["workspace_id"])
    assert (m.owner_username, m.workspace_name, m.agent_name) == ("alice", "ws", "main")
    assert (m.directory, dict(m.environment_variables), m.motd_path) == (
        "/src",
        {"A": "1"},
        "/etc/motd",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "expected a JSON object"),
        ("{", "not JSON"),
        ('{"agent_id": "nope"}', "agent_id: not a UUID"),
        ('{"agent_name": 3}', "agent_name: expected a string"),
        ('{"environment_variables": {"A": 1}}', "expected an object of strings"),
        ('{"agnet_name": "x"}', "unknown key 'agnet_name'"),
    ],
)
def test_a_bad_manifest_file_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Workspace.fromJSON(text, "m.json")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("GET", "GET"),
        ("", '""'),
        ("https://example.com/a?b=c", "https://example.com/a?b=c"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("tab\there", '"tab\\there"'),
        ("é", "é"),
    ],
)
def test_values_are_quoted_as_sloghuman_does(value: str, shown: str) -> None:
    assert slogValue(value) == shown


def test_rfc3339nano_drops_trailing_zeros() -> None:
    assert (
        rfc3339Nano(datetime(2026, 1, 2, 15, 4, 5, 100000, tzinfo=UTC)) == "2026-01-02T15:04:05.1Z"
    )
    assert rfc3339Nano(datetime(2026, 1, 2, 15, 4, 5, tzinfo=UTC)) == "2026-01-02T15:04:05Z"


def _log(allowed: bool, seconds: int = 0, nanos: int = 0, **http: str) -> agent_pb2.BoundaryLog:
    entry = agent_pb2.BoundaryLog(
        allowed=allowed, sequence_number=3, http_request=agent_pb2.BoundaryLog.HttpRequest(**http)
    )
    if seconds:
        entry.time.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    return entry


def test_boundary_request_line_has_coderds_fields_in_coderds_order() -> None:
    request = agent_pb2.ReportBoundaryLogsRequest(session_id="sess-1")
    allowed = _log(
        True,
        1767366245,
        100000000,
        method="GET",
        url="https://example.com/x",
        matched_rule="*.example.com",
    )
    line = formatFields("boundary_request", boundaryFields(workspace(), request, allowed, 0))
    assert line == (
        "boundary_request  owner=alice  workspace_name=ws  agent_name=main  decision=allow  "
        "session_id=sess-1  sequence_number=3  "
        f"workspace_id={IDS['workspace_id']}  template_id={IDS['template_id']}  "
        f"template_version_id={IDS['template_version_id']}  http_method=GET  "
        "http_url=https://example.com/x  event_time=2026-01-02T15:04:05.1Z  "
        "matched_rule=*.example.com"
    )
    denied = _log(False, method="POST", url="https://evil.test/")
    fields = dict(boundaryFields(workspace(), request, denied, 1767366245.25))
    assert fields["decision"] == "deny" and "matched_rule" not in fields
    assert fields["event_time"] == "2026-01-02T15:04:05.25Z"  # no time: when it was received


def _request(target: str, headers: list[tuple[bytes, bytes]]) -> Request:
    return Request(host="h", target=target, extra_headers=headers)


@pytest.mark.parametrize(
    ("target", "headers", "verdict"),
    [
        ("/api/v2/workspaceagents/me/rpc?version=2.7", [(b"coder-session-token", b"t")], None),
        (
            "/api/v2/workspaceagents/me/rpc?version=2.7",
            [(b"cookie", b"coder_session_token=t")],
            None,
        ),
        ("/api/v2/workspaceagents/me/rpc", [(b"coder-session-token", b"t")], None),
        (
            "/api/v2/workspaceagents/me/rpc?version=2.7",
            [(b"coder-session-token", b"x")],
            (401, "Workspace agent not authorized."),
        ),
        (
            "/api/v2/workspaceagents/me/rpc?version=2.7",
            [],
            (401, "Workspace agent not authorized."),
        ),
        (
            "/api/v2/workspaceagents/me/rpc?version=3.0",
            [(b"coder-session-token", b"t")],
            (400, "Unknown or unsupported API version"),
        ),
        ("/api/v2/nope", [(b"coder-session-token", b"t")], (404, "Route /api/v2/nope not found.")),
    ],
)
def test_the_upgrade_is_checked_like_coderd(
    target: str, headers: list[tuple[bytes, bytes]], verdict: Any
) -> None:
    factory = DevCoderdFactory(DevAgentAPI(Workspace()), "t", reactor=None)
    result = factory.accept(_request(target, headers), "peer")
    if verdict is None:
        assert not isinstance(result, tuple)
    else:
        assert result == verdict


def test_the_fast_batch_formatter_says_exactly_what_the_field_list_says() -> None:
    from coderagent.devcoderd.coderdlog import boundaryLines

    request = agent_pb2.ReportBoundaryLogsRequest(session_id="has space", confined_process_name="c")
    request.logs.append(
        _log(True, 1767366245, 120000000, method="GET", url="https://x/a b", matched_rule="*")
    )
    request.logs.append(_log(False, method="DELETE", url='https://x/"q"'))
    request.logs.append(_log(True, 1767366245, 0, method="", url="", matched_rule=""))
    request.logs.append(agent_pb2.BoundaryLog(allowed=True))  # no http_request: skipped
    w = workspace()
    lines = boundaryLines(w, request, 1767366300.5)
    fields = [
        formatFields("boundary_request", boundaryFields(w, request, entry, 1767366300.5))
        for entry in list(request.logs)[:3]
    ]
    assert [line.split("coderd.agentrpc: ", 1)[1] for line in lines] == [f + "\n" for f in fields]
    assert all(line.startswith(lines[0].split("coderd")[0]) for line in lines)


def test_the_state_file_holds_what_the_agent_reported(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from coderagent.devcoderd.statefile import INTERVAL, StateFile

    clock = Clock()
    api = DevAgentAPI(Workspace.fromJSON(json.dumps(IDS), "test"), out=io.StringIO())
    path = tmp_path / "state.json"
    state = StateFile(api, str(path), clock)
    state.startService()
    assert json.loads(path.read_text())["lifecycle"] == []
    lifecycle = agent_pb2.Lifecycle(state=agent_pb2.Lifecycle.READY)
    api.handlers[RPCS["UpdateLifecycle"].path](
        agent_pb2.UpdateLifecycleRequest(lifecycle=lifecycle).SerializeToString()
    )
    assert json.loads(path.read_text())["lifecycle"] == []  # at most every INTERVAL
    clock.advance(INTERVAL)
    written = json.loads(path.read_text())
    assert written["lifecycle"] == ["READY"]
    assert written["workspace"]["workspace_id"] == IDS["workspace_id"]
    state.stopService()
    assert not list(tmp_path.glob("*.tmp"))


def test_the_manifest_file_carries_scripts_apps_and_metadata() -> None:
    source = "0b6f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1c"
    text = json.dumps(
        {
            **IDS,
            "vs_code_port_proxy_uri": "https://{{port}}.proxy.example",
            "scripts": [
                {
                    "display_name": "install",
                    "log_source_id": source,
                    "script": "echo hi",
                    "run_on_start": True,
                    "timeout": "5s",
                    "cron": "*/2 * * * * *",
                }
            ],
            "apps": [
                {"slug": "web", "healthcheck": {"url": "http://127.0.0.1:1", "interval": "1s"}}
            ],
            "metadata": [{"key": "load", "script": "cat /proc/loadavg", "interval": "1s"}],
        }
    )
    manifest = Workspace.fromJSON(text, "test").manifest()
    [script] = manifest.scripts
    assert uuid.UUID(bytes=script.log_source_id) == uuid.UUID(source)
    assert len(script.id) == 16 and script.timeout.seconds == 5 and script.run_on_start
    assert manifest.apps[0].healthcheck.interval.seconds == 1
    assert manifest.metadata[0].key == "load"
    assert manifest.vs_code_port_proxy_uri == "https://{{port}}.proxy.example"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"scripts": {}}, "scripts: expected a list of objects"),
        ({"scripts": [{"log_source_id": "nope"}]}, "scripts[0].log_source_id: not a UUID"),
        ({"apps": [{"slugg": "x"}]}, "apps[0]: "),
    ],
)
def test_a_bad_script_or_app_is_an_error(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        Workspace.fromJSON(json.dumps({**IDS, **extra}), "m.json")


def test_the_options_default_as_coderd_does() -> None:
    from coderagent.devcoderd.tap import Options, makeService

    options = Options(environ={})
    options.parseOptions(["--token=t"])
    api = makeService(options).api
    assert api.reportInterval == 30.0
    config = api.monitoring.config
    assert (config.collection_interval_seconds, config.num_datapoints) == (10, 20)
    assert not api.monitoring.HasField("memory") and not api.monitoring.volumes
    options = Options(environ={})
    options.parseOptions(
        [
            "--token=t",
            "--report-interval=1s",
            "--monitor-memory",
            "--monitor-volume=/",
            "--monitor-volume=/tmp",
        ]
    )
    api = makeService(options).api
    assert api.reportInterval == 1.0
    assert api.monitoring.memory.enabled
    assert [(v.path, v.enabled) for v in api.monitoring.volumes] == [("/", True), ("/tmp", True)]


@pytest.mark.parametrize("value", ["1", "-1s", "0s", "soon"])
def test_a_report_interval_that_is_not_a_positive_duration_is_refused(value: str) -> None:
    from twisted.python.usage import UsageError

    from coderagent.devcoderd.tap import Options

    with pytest.raises(UsageError, match="--report-interval"):
        Options(environ={}).parseOptions([f"--report-interval={value}"])


def test_the_state_shows_every_report() -> None:
    web = uuid.UUID(int=7)
    workspace = Workspace(
        apps=[
            agent_pb2.WorkspaceApp(
                id=web.bytes,
                slug="web",
                healthcheck=agent_pb2.WorkspaceApp.Healthcheck(
                    url="http://x/", interval=duration_pb2.Duration(seconds=1), threshold=1
                ),
            ),
            agent_pb2.WorkspaceApp(id=uuid.UUID(int=8).bytes, slug="plain"),
        ],
        metadata=[agent_pb2.WorkspaceAgentMetadata.Description(key="cpu", script="true")],
    )
    api = DevAgentAPI(workspace, out=io.StringIO(), monitoring=resourcesMonitoring(memory=True))

    def call(name: str, request: Any) -> Any:
        return RPCS[name].response.FromString(
            api.handlers[RPCS[name].path](request.SerializeToString())
        )

    assert call("UpdateStats", agent_pb2.UpdateStatsRequest()).report_interval.seconds == 30
    stats = agent_pb2.Stats(connection_count=1, rx_bytes=10, tx_bytes=20)
    call("UpdateStats", agent_pb2.UpdateStatsRequest(stats=stats))
    call("UpdateStats", agent_pb2.UpdateStatsRequest(stats=stats))
    result = agent_pb2.WorkspaceAgentMetadata.Result(value="3%")
    call(
        "BatchUpdateMetadata",
        agent_pb2.BatchUpdateMetadataRequest(
            metadata=[agent_pb2.Metadata(key="cpu", result=result)]
        ),
    )
    point = agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint()
    point.memory.used, point.memory.total = 1, 2
    call(
        "PushResourcesMonitoringUsage",
        agent_pb2.PushResourcesMonitoringUsageRequest(datapoints=[point]),
    )
    health = agent_pb2.BatchUpdateAppHealthRequest()
    health.updates.add(id=web.bytes, health=agent_pb2.HEALTHY)
    call("BatchUpdateAppHealths", health)
    state = api.state()
    assert len(state["stats"]) == 2
    totals = {"rx_bytes": 20, "tx_bytes": 40, "rx_packets": 0, "tx_packets": 0}
    assert state["stats_totals"] == totals
    assert state["metadata"] == {"cpu": {"value": "3%"}}
    assert state["resources"]["configuration"]["memory"] == {"enabled": True}
    pushed = [{"datapoints": [{"memory": {"used": "1", "total": "2"}}]}]
    assert state["resources"]["pushes"] == pushed
    assert state["app_health"] == {
        str(web): {"slug": "web", "health": "HEALTHY"},
        str(uuid.UUID(int=8)): {"slug": "plain", "health": "DISABLED"},
    }
    [served] = call("GetManifest", agent_pb2.GetManifestRequest()).apps[:1]
    assert served.health == agent_pb2.WorkspaceApp.HEALTHY


def test_reports_coderd_would_refuse_are_refused() -> None:
    api = DevAgentAPI(
        Workspace(apps=[agent_pb2.WorkspaceApp(id=bytes(range(16)), slug="plain")]),
        out=io.StringIO(),
    )
    unspecified = agent_pb2.Connection(id=bytes(range(1, 17)), action=1)
    for connection, error in [
        (unspecified, "unmapped agent proto connection type: TYPE_UNSPECIFIED"),
        (agent_pb2.Connection(id=bytes(16), action=1, type=1), "connection ID cannot be nil"),
    ]:
        request = agent_pb2.ReportConnectionRequest(connection=connection)
        with pytest.raises(DRPCError, match=error):
            api.handlers[RPCS["ReportConnection"].path](request.SerializeToString())
    health = agent_pb2.BatchUpdateAppHealthRequest()
    health.updates.add(id=bytes(range(16)), health=agent_pb2.HEALTHY)
    with pytest.raises(DRPCError, match="workspace app plain health reporting is disabled"):
        api.handlers[RPCS["BatchUpdateAppHealths"].path](health.SerializeToString())
    assert not api.connections and not api.appHealth


def _scriptRecords(logLimit: int = 20) -> tuple[DevAgentAPI, io.StringIO]:
    out = io.StringIO()
    scripts = [
        {"display_name": "install", "log_source_id": SOURCE, "id": SCRIPT, "script": "true"},
    ]
    w = Workspace.fromJSON(json.dumps({**IDS, "scripts": scripts}), "test")
    return DevAgentAPI(w, out=out, logLimit=logLimit, clock=lambda: 1767366245.0), out


SOURCE = "0b6f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1c"
SCRIPT = "5e4f3c8e-5d2a-4c1e-9f7b-2a4d6e8f0a1c"


def _call(api: DevAgentAPI, name: str, request: Any) -> Any:
    raw = api.handlers[RPCS[name].path](request.SerializeToString())
    return RPCS[name].response.FromString(raw)


def test_script_logs_are_kept_per_source_up_to_coderds_limit() -> None:
    api, out = _scriptRecords(logLimit=20)
    source = uuid.UUID(SOURCE).bytes

    def batch(*outputs: str) -> Any:
        logs = [agent_pb2.Log(output=o, level=agent_pb2.Log.INFO) for o in outputs]
        return _call(
            api,
            "BatchCreateLogs",
            agent_pb2.BatchCreateLogsRequest(log_source_id=source, logs=logs),
        )

    assert not batch("hello", "world").log_limit_exceeded  # 10 bytes
    assert not _call(api, "BatchCreateLogs", agent_pb2.BatchCreateLogsRequest()).log_limit_exceeded
    assert batch("0123456789", "x").log_limit_exceeded  # 21 > 20: refused whole
    assert batch("y").log_limit_exceeded  # and everything after
    assert [e.output for e in api.logs] == ["hello", "world"]
    state = api.state()
    assert state["logs_length"] == 10 and state["logs_overflowed"]
    assert state["logs"][SOURCE]["name"] == "install"
    assert state["logs"][SOURCE]["lines"] == [
        {"level": "info", "output": "hello"},
        {"level": "info", "output": "world"},
    ]
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("coderd-dev: script_log  source=install  level=info  output=hello")
    assert "script logs overflowed  limit=20  logs_length=10  refused=11" in lines[2]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"short", "parse log source ID"),
        (uuid.UUID(int=5).bytes, "violates foreign key constraint"),
    ],
)
def test_logs_from_an_unknown_source_are_refused_as_coderd_does(
    source: bytes, message: str
) -> None:
    from coderagent.coderd.drpcwire import DRPCError

    api, _ = _scriptRecords()
    request = agent_pb2.BatchCreateLogsRequest(
        log_source_id=source, logs=[agent_pb2.Log(output="x")]
    )
    with pytest.raises(DRPCError, match=message):
        _call(api, "BatchCreateLogs", request)


def test_script_timings_are_checked_and_recorded() -> None:
    from coderagent.coderd.drpcwire import DRPCError

    api, out = _scriptRecords()
    start = timestamp_pb2.Timestamp(seconds=1767366245)
    end = timestamp_pb2.Timestamp(seconds=1767366247, nanos=500_000_000)
    timing = agent_pb2.Timing(
        script_id=uuid.UUID(SCRIPT).bytes,
        start=start,
        end=end,
        exit_code=3,
        stage=agent_pb2.Timing.START,
        status=agent_pb2.Timing.EXIT_FAILURE,
    )
    request = agent_pb2.WorkspaceAgentScriptCompletedRequest(timing=timing)
    _call(api, "ScriptCompleted", request)
    [recorded] = api.state()["timings"]
    assert recorded == {
        "script": "install",
        "script_id": SCRIPT,
        "stage": "START",
        "status": "EXIT_FAILURE",
        "exit_code": 3,
        "start": "2026-01-02T15:04:05Z",
        "end": "2026-01-02T15:04:07.5Z",
    }
    assert (
        out.getvalue()
        .rstrip()
        .endswith(
            "coderd-dev: script_completed  script=install  stage=START  status=EXIT_FAILURE  "
            "exit_code=3  duration=2.500s"
        )
    )
    for bad, message in [
        (agent_pb2.Timing(script_id=b"x", start=start, end=end), "script id from bytes"),
        (agent_pb2.Timing(script_id=uuid.UUID(int=9).bytes, start=start, end=end), "unknown"),
        (agent_pb2.Timing(script_id=uuid.UUID(SCRIPT).bytes, end=end), "start time is required"),
        (agent_pb2.Timing(script_id=uuid.UUID(SCRIPT).bytes, start=end, end=start), "after end"),
    ]:
        with pytest.raises(DRPCError, match=message):
            _call(
                api, "ScriptCompleted", agent_pb2.WorkspaceAgentScriptCompletedRequest(timing=bad)
            )
