"""The generated coder.agent.v2 / boundary codec protobuf modules (coderagent.pb).

coderd decodes what we send by field number and routes DRPC calls by method name, so
the expectations below are transcribed from upstream coder/coder
(``agent/proto/agent.proto``, ``agent/boundarylogproxy/codec/boundary.proto``),
independently of ``proto/coderagent/pb/*.proto``: if someone edits
the .proto and regenerates, these tests say whether the wire contract still holds.
"""

from __future__ import annotations

import configparser
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, duration_pb2, empty_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from coderagent.pb import agent_pb2, boundary_pb2
from tests.vectors import load

ROOT = Path(__file__).resolve().parent.parent

AGENT_PKG = "coder.agent.v2"
BOUNDARY_PKG = "coder.boundarylogproxy.codec.v1"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_SCALAR_NAMES: dict[int, str] = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
}


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        return str(field.type_name).lstrip(".")
    return _SCALAR_NAMES[field.type]


def field_specs(message: type[Message]) -> list[str]:
    """Render a message's fields as .proto-like lines, sorted by field number.

    Goes through DescriptorProto (not FieldDescriptor.label, which protobuf 7 removed)
    so that it works on every runtime setup.cfg allows.
    """
    proto = descriptor_pb2.DescriptorProto()
    message.DESCRIPTOR.CopyToProto(proto)
    map_entries = {nested.name: nested for nested in proto.nested_type if nested.options.map_entry}
    lines = []
    for field in sorted(proto.field, key=lambda f: f.number):
        type_name = _type_name(field)
        entry_name = type_name.rsplit(".", 1)[-1]
        if (
            field.type_name
            and entry_name in map_entries
            and type_name.startswith(message.DESCRIPTOR.full_name + ".")
        ):
            entry = map_entries[entry_name]
            key, value = sorted(entry.field, key=lambda f: f.number)
            spec = f"map<{_type_name(key)}, {_type_name(value)}>"
        elif field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            spec = f"repeated {type_name}"
        elif field.proto3_optional:
            spec = f"optional {type_name}"
        elif field.HasField("oneof_index"):
            spec = f"oneof {proto.oneof_decl[field.oneof_index].name}: {type_name}"
        else:
            spec = type_name
        lines.append(f"{spec} {field.name} = {field.number}")
    return lines


def enum_values(enum: Any) -> dict[str, int]:
    return {v.name: v.number for v in enum.DESCRIPTOR.values}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _raw_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Split protobuf wire bytes into (field number, wire type, value), in wire order."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            pos += length
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:  # pragma: no cover - groups are not used by these messages
            raise AssertionError(f"unexpected wire type {wire_type}")
        yield number, wire_type, value
    assert pos == len(data), "trailing garbage"


def canonical_wire(data: bytes, message: type[Message]) -> list[tuple[int, int, Any]]:
    """Wire fields with nested messages expanded, stably sorted by field number.

    Two encodings of one message may legitimately differ in field order (Go writes
    oneof fields last, Python in number order); everything else, including the order of
    the elements of a repeated field, must agree byte for byte.
    """
    fields_by_number = message.DESCRIPTOR.fields_by_number
    out: list[tuple[int, int, Any]] = []
    for number, wire_type, value in _raw_fields(data):
        field = fields_by_number.get(number)
        if field is not None and field.message_type is not None and isinstance(value, bytes):
            sub = field.message_type._concrete_class
            out.append((number, wire_type, canonical_wire(value, sub)))
        else:
            out.append((number, wire_type, value))
    return sorted(out, key=lambda item: item[0])


def drpc_method_names() -> dict[str, tuple[str, str]]:
    service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    return {
        f"/{service.full_name}/{method.name}": (
            method.input_type.full_name,
            method.output_type.full_name,
        )
        for method in service.methods
    }


@pytest.fixture(scope="module")
def payloads() -> dict[str, Any]:
    """The checked-in Go encodings; a missing file fails the tests, never skips them."""
    return load("payloads")


# ---------------------------------------------------------------------------
# packages and the service
# ---------------------------------------------------------------------------


def test_packages() -> None:
    assert agent_pb2.DESCRIPTOR.package == AGENT_PKG
    assert boundary_pb2.DESCRIPTOR.package == BOUNDARY_PKG
    assert agent_pb2.Manifest.DESCRIPTOR.full_name == "coder.agent.v2.Manifest"
    assert (
        boundary_pb2.BoundaryMessage.DESCRIPTOR.full_name
        == "coder.boundarylogproxy.codec.v1.BoundaryMessage"
    )
    # The boundary envelope embeds the very same ReportBoundaryLogsRequest class.
    logs_field = boundary_pb2.BoundaryMessage.DESCRIPTOR.fields_by_name["logs"]
    assert logs_field.message_type is agent_pb2.ReportBoundaryLogsRequest.DESCRIPTOR


# Upstream's Agent service in upstream order (append-only), up to UpdateAppStatus.
EXPECTED_METHODS = [
    ("GetManifest", "GetManifestRequest", "Manifest"),
    ("GetServiceBanner", "GetServiceBannerRequest", "ServiceBanner"),
    ("UpdateStats", "UpdateStatsRequest", "UpdateStatsResponse"),
    ("UpdateLifecycle", "UpdateLifecycleRequest", "Lifecycle"),
    ("BatchUpdateAppHealths", "BatchUpdateAppHealthRequest", "BatchUpdateAppHealthResponse"),
    ("UpdateStartup", "UpdateStartupRequest", "Startup"),
    ("BatchUpdateMetadata", "BatchUpdateMetadataRequest", "BatchUpdateMetadataResponse"),
    ("BatchCreateLogs", "BatchCreateLogsRequest", "BatchCreateLogsResponse"),
    (
        "GetAnnouncementBanners",
        "GetAnnouncementBannersRequest",
        "GetAnnouncementBannersResponse",
    ),
    (
        "ScriptCompleted",
        "WorkspaceAgentScriptCompletedRequest",
        "WorkspaceAgentScriptCompletedResponse",
    ),
    (
        "GetResourcesMonitoringConfiguration",
        "GetResourcesMonitoringConfigurationRequest",
        "GetResourcesMonitoringConfigurationResponse",
    ),
    (
        "PushResourcesMonitoringUsage",
        "PushResourcesMonitoringUsageRequest",
        "PushResourcesMonitoringUsageResponse",
    ),
    ("ReportConnection", "ReportConnectionRequest", "google.protobuf.Empty"),
    ("CreateSubAgent", "CreateSubAgentRequest", "CreateSubAgentResponse"),
    ("DeleteSubAgent", "DeleteSubAgentRequest", "DeleteSubAgentResponse"),
    ("ListSubAgents", "ListSubAgentsRequest", "ListSubAgentsResponse"),
    ("ReportBoundaryLogs", "ReportBoundaryLogsRequest", "ReportBoundaryLogsResponse"),
    ("UpdateAppStatus", "UpdateAppStatusRequest", "UpdateAppStatusResponse"),
]


def _qualify(name: str) -> str:
    return name if name.startswith("google.") else f"{AGENT_PKG}.{name}"


def test_service_methods_and_types() -> None:
    expected = {
        f"/coder.agent.v2.Agent/{name}": (_qualify(req), _qualify(resp))
        for name, req, resp in EXPECTED_METHODS
    }
    assert drpc_method_names() == expected
    service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    assert service.full_name == "coder.agent.v2.Agent"
    assert [m.name for m in service.methods] == [name for name, _, _ in EXPECTED_METHODS]


@pytest.mark.parametrize(
    ("drpc_name", "request_cls", "response_cls"),
    [
        ("/coder.agent.v2.Agent/GetManifest", agent_pb2.GetManifestRequest, agent_pb2.Manifest),
        (
            "/coder.agent.v2.Agent/UpdateStats",
            agent_pb2.UpdateStatsRequest,
            agent_pb2.UpdateStatsResponse,
        ),
        (
            "/coder.agent.v2.Agent/UpdateLifecycle",
            agent_pb2.UpdateLifecycleRequest,
            agent_pb2.Lifecycle,
        ),
        ("/coder.agent.v2.Agent/UpdateStartup", agent_pb2.UpdateStartupRequest, agent_pb2.Startup),
        (
            "/coder.agent.v2.Agent/BatchCreateLogs",
            agent_pb2.BatchCreateLogsRequest,
            agent_pb2.BatchCreateLogsResponse,
        ),
        (
            "/coder.agent.v2.Agent/GetAnnouncementBanners",
            agent_pb2.GetAnnouncementBannersRequest,
            agent_pb2.GetAnnouncementBannersResponse,
        ),
        (
            "/coder.agent.v2.Agent/ReportConnection",
            agent_pb2.ReportConnectionRequest,
            empty_pb2.Empty,
        ),
        (
            "/coder.agent.v2.Agent/ReportBoundaryLogs",
            agent_pb2.ReportBoundaryLogsRequest,
            agent_pb2.ReportBoundaryLogsResponse,
        ),
    ],
)
def test_required_methods_map_to_generated_classes(
    drpc_name: str, request_cls: type[Message], response_cls: type[Message]
) -> None:
    req, resp = drpc_method_names()[drpc_name]
    assert req == request_cls.DESCRIPTOR.full_name
    assert resp == response_cls.DESCRIPTOR.full_name


# ---------------------------------------------------------------------------
# field numbers and types, transcribed from upstream
# ---------------------------------------------------------------------------

A = AGENT_PKG
EXPECTED_FIELDS: dict[type[Message], list[str]] = {
    agent_pb2.GetManifestRequest: [],
    agent_pb2.Manifest: [
        "bytes agent_id = 1",
        "uint32 git_auth_configs = 2",
        "map<string, string> environment_variables = 3",
        "string directory = 4",
        "string vs_code_port_proxy_uri = 5",
        "string motd_path = 6",
        "bool disable_direct_connections = 7",
        "bool derp_force_websockets = 8",
        # 9 = coder.tailnet.v2.DERPMap derp_map: deliberately not modelled
        f"repeated {A}.WorkspaceAgentScript scripts = 10",
        f"repeated {A}.WorkspaceApp apps = 11",
        f"repeated {A}.WorkspaceAgentMetadata.Description metadata = 12",
        "string owner_username = 13",
        "bytes workspace_id = 14",
        "string agent_name = 15",
        "string workspace_name = 16",
        f"repeated {A}.WorkspaceAgentDevcontainer devcontainers = 17",
        "optional bytes parent_id = 18",
        f"repeated {A}.WorkspaceSecret secrets = 19",
    ],
    agent_pb2.WorkspaceSecret: [
        "string env_name = 1",
        "string file_path = 2",
        "bytes value = 3",
    ],
    agent_pb2.WorkspaceAgentScript: [
        "bytes log_source_id = 1",
        "string log_path = 2",
        "string script = 3",
        "string cron = 4",
        "bool run_on_start = 5",
        "bool run_on_stop = 6",
        "bool start_blocks_login = 7",
        "google.protobuf.Duration timeout = 8",
        "string display_name = 9",
        "bytes id = 10",
    ],
    agent_pb2.Stats: [
        "map<string, int64> connections_by_proto = 1",
        "int64 connection_count = 2",
        "double connection_median_latency_ms = 3",
        "int64 rx_packets = 4",
        "int64 rx_bytes = 5",
        "int64 tx_packets = 6",
        "int64 tx_bytes = 7",
        "int64 session_count_vscode = 8",
        "int64 session_count_jetbrains = 9",
        "int64 session_count_reconnecting_pty = 10",
        "int64 session_count_ssh = 11",
        f"repeated {A}.Stats.Metric metrics = 12",
        "map<string, int64> session_counts = 13",
    ],
    agent_pb2.Stats.Metric: [
        "string name = 1",
        f"{A}.Stats.Metric.Type type = 2",
        "double value = 3",
        f"repeated {A}.Stats.Metric.Label labels = 4",
    ],
    agent_pb2.Stats.Metric.Label: ["string name = 1", "string value = 2"],
    agent_pb2.UpdateStatsRequest: [f"{A}.Stats stats = 1"],
    agent_pb2.UpdateStatsResponse: ["google.protobuf.Duration report_interval = 1"],
    agent_pb2.Lifecycle: [
        f"{A}.Lifecycle.State state = 1",
        "google.protobuf.Timestamp changed_at = 2",
    ],
    agent_pb2.UpdateLifecycleRequest: [f"{A}.Lifecycle lifecycle = 1"],
    agent_pb2.Startup: [
        "string version = 1",
        "string expanded_directory = 2",
        f"repeated {A}.Startup.Subsystem subsystems = 3",
    ],
    agent_pb2.UpdateStartupRequest: [f"{A}.Startup startup = 1"],
    agent_pb2.Log: [
        "google.protobuf.Timestamp created_at = 1",
        "string output = 2",
        f"{A}.Log.Level level = 3",
    ],
    agent_pb2.BatchCreateLogsRequest: [
        "bytes log_source_id = 1",
        f"repeated {A}.Log logs = 2",
    ],
    agent_pb2.BatchCreateLogsResponse: ["bool log_limit_exceeded = 1"],
    agent_pb2.GetAnnouncementBannersRequest: [],
    agent_pb2.GetAnnouncementBannersResponse: [
        f"repeated {A}.BannerConfig announcement_banners = 1",
    ],
    agent_pb2.BannerConfig: [
        "bool enabled = 1",
        "string message = 2",
        "string background_color = 3",
    ],
    agent_pb2.Connection: [
        "bytes id = 1",
        f"{A}.Connection.Action action = 2",
        f"{A}.Connection.Type type = 3",
        "google.protobuf.Timestamp timestamp = 4",
        "string ip = 5",
        "int32 status_code = 6",
        "optional string reason = 7",
        # 8 differs between upstream branches: deliberately not modelled
    ],
    agent_pb2.ReportConnectionRequest: [f"{A}.Connection connection = 1"],
    agent_pb2.BoundaryLog: [
        "bool allowed = 1",
        "google.protobuf.Timestamp time = 2",
        f"oneof resource: {A}.BoundaryLog.HttpRequest http_request = 3",
        "int32 sequence_number = 4",
    ],
    agent_pb2.BoundaryLog.HttpRequest: [
        "string method = 1",
        "string url = 2",
        "string matched_rule = 3",
    ],
    agent_pb2.ReportBoundaryLogsRequest: [
        f"repeated {A}.BoundaryLog logs = 1",
        "string session_id = 2",
        "string confined_process_name = 3",
    ],
    agent_pb2.ReportBoundaryLogsResponse: [],
    boundary_pb2.BoundaryMessage: [
        f"oneof msg: {A}.ReportBoundaryLogsRequest logs = 1",
        f"oneof msg: {BOUNDARY_PKG}.BoundaryStatus status = 2",
    ],
    boundary_pb2.BoundaryStatus: [
        "int64 dropped_channel_full = 1",
        "int64 dropped_batch_full = 2",
    ],
}


@pytest.mark.parametrize("message", list(EXPECTED_FIELDS), ids=lambda m: m.DESCRIPTOR.full_name)
def test_fields_match_upstream(message: type[Message]) -> None:
    assert field_specs(message) == EXPECTED_FIELDS[message]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (agent_pb2.BoundaryLog, "allowed", 1),
        (agent_pb2.BoundaryLog, "time", 2),
        (agent_pb2.BoundaryLog, "http_request", 3),
        (agent_pb2.BoundaryLog, "sequence_number", 4),
        (agent_pb2.ReportBoundaryLogsRequest, "logs", 1),
        (agent_pb2.ReportBoundaryLogsRequest, "session_id", 2),
        (agent_pb2.ReportBoundaryLogsRequest, "confined_process_name", 3),
        (agent_pb2.Manifest, "agent_id", 1),
        (agent_pb2.Manifest, "environment_variables", 3),
        (agent_pb2.Manifest, "directory", 4),
        (agent_pb2.Manifest, "vs_code_port_proxy_uri", 5),
        (agent_pb2.Manifest, "motd_path", 6),
        (agent_pb2.Manifest, "owner_username", 13),
        (agent_pb2.Manifest, "workspace_id", 14),
        (agent_pb2.Manifest, "agent_name", 15),
        (agent_pb2.Manifest, "workspace_name", 16),
        (agent_pb2.Connection, "id", 1),
        (agent_pb2.Connection, "ip", 5),
        (agent_pb2.Connection, "status_code", 6),
        (agent_pb2.Connection, "reason", 7),
        (agent_pb2.UpdateStatsResponse, "report_interval", 1),
        (agent_pb2.Stats, "metrics", 12),
        (agent_pb2.Stats, "session_counts", 13),
        (agent_pb2.BatchCreateLogsResponse, "log_limit_exceeded", 1),
        (boundary_pb2.BoundaryMessage, "logs", 1),
        (boundary_pb2.BoundaryMessage, "status", 2),
        (boundary_pb2.BoundaryStatus, "dropped_channel_full", 1),
        (boundary_pb2.BoundaryStatus, "dropped_batch_full", 2),
    ],
)
def test_key_field_numbers(message: type[Message], field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_left_out_numbers_are_reserved() -> None:
    for message, number in ((agent_pb2.Manifest, 9), (agent_pb2.Connection, 8)):
        proto = descriptor_pb2.DescriptorProto()
        message.DESCRIPTOR.CopyToProto(proto)
        assert number not in message.DESCRIPTOR.fields_by_number
        assert any(r.start <= number < r.end for r in proto.reserved_range), message


def test_enums_match_upstream() -> None:
    assert enum_values(agent_pb2.Lifecycle.State) == {
        "STATE_UNSPECIFIED": 0,
        "CREATED": 1,
        "STARTING": 2,
        "START_TIMEOUT": 3,
        "START_ERROR": 4,
        "READY": 5,
        "SHUTTING_DOWN": 6,
        "SHUTDOWN_TIMEOUT": 7,
        "SHUTDOWN_ERROR": 8,
        "OFF": 9,
    }
    assert enum_values(agent_pb2.Startup.Subsystem) == {
        "SUBSYSTEM_UNSPECIFIED": 0,
        "ENVBOX": 1,
        "ENVBUILDER": 2,
        "EXECTRACE": 3,
    }
    assert enum_values(agent_pb2.Connection.Action) == {
        "ACTION_UNSPECIFIED": 0,
        "CONNECT": 1,
        "DISCONNECT": 2,
    }
    assert enum_values(agent_pb2.Connection.Type) == {
        "TYPE_UNSPECIFIED": 0,
        "SSH": 1,
        "VSCODE": 2,
        "JETBRAINS": 3,
        "RECONNECTING_PTY": 4,
    }
    assert enum_values(agent_pb2.Log.Level) == {
        "LEVEL_UNSPECIFIED": 0,
        "TRACE": 1,
        "DEBUG": 2,
        "INFO": 3,
        "WARN": 4,
        "ERROR": 5,
    }
    assert enum_values(agent_pb2.Stats.Metric.Type) == {
        "TYPE_UNSPECIFIED": 0,
        "COUNTER": 1,
        "GAUGE": 2,
    }
    assert enum_values(agent_pb2.AppHealth) == {
        "APP_HEALTH_UNSPECIFIED": 0,
        "DISABLED": 1,
        "INITIALIZING": 2,
        "HEALTHY": 3,
        "UNHEALTHY": 4,
    }


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

AGENT_ID = bytes(range(16))
WORKSPACE_ID = bytes(range(16, 32))


def _roundtrip(msg: Message) -> Message:
    # Map entries serialize in hash order unless asked otherwise.
    data = msg.SerializeToString(deterministic=True)
    back = type(msg).FromString(data)
    assert back == msg
    assert back.SerializeToString(deterministic=True) == data
    return back


def test_manifest_roundtrip() -> None:
    manifest = agent_pb2.Manifest(
        agent_id=AGENT_ID,
        environment_variables={"FOO": "bar", "EMPTY": ""},
        directory="/home/coder/project",
        vs_code_port_proxy_uri="https://{{port}}--agent.example.com",
        motd_path="/etc/motd",
        owner_username="alice",
        workspace_id=WORKSPACE_ID,
        agent_name="main",
        workspace_name="dev",
        secrets=[agent_pb2.WorkspaceSecret(env_name="TOKEN", value=b"\x00s3cret")],
    )
    back = _roundtrip(manifest)
    assert isinstance(back, agent_pb2.Manifest)
    assert dict(back.environment_variables) == {"FOO": "bar", "EMPTY": ""}
    assert back.workspace_id == WORKSPACE_ID
    assert not back.HasField("parent_id")


def test_manifest_keeps_unmodelled_derp_map_as_unknown_field() -> None:
    # coderd always sends derp_map (field 9, LEN); we must decode around it and keep it.
    derp = bytes([0x4A, 0x03, 0x0A, 0x01, 0x78])  # field 9, LEN 3: an opaque sub-message
    data = agent_pb2.Manifest(agent_name="main").SerializeToString() + derp
    manifest = agent_pb2.Manifest.FromString(data)
    assert manifest.agent_name == "main"
    assert derp in manifest.SerializeToString()


def test_stats_roundtrip() -> None:
    stats = agent_pb2.Stats(
        connections_by_proto={"ssh": 2},
        connection_count=2,
        connection_median_latency_ms=1.5,
        rx_bytes=1 << 40,
        tx_bytes=7,
        session_counts={"ssh": 1, "vscode": 1},
        metrics=[
            agent_pb2.Stats.Metric(
                name="agent_sessions",
                type=agent_pb2.Stats.Metric.GAUGE,
                value=3.0,
                labels=[agent_pb2.Stats.Metric.Label(name="kind", value="ssh")],
            )
        ],
    )
    _roundtrip(agent_pb2.UpdateStatsRequest(stats=stats))
    resp = agent_pb2.UpdateStatsResponse(report_interval=duration_pb2.Duration(seconds=30))
    back = _roundtrip(resp)
    assert isinstance(back, agent_pb2.UpdateStatsResponse)
    assert back.report_interval.ToTimedelta().total_seconds() == 30


def test_lifecycle_startup_logs_banners_roundtrip() -> None:
    when = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    _roundtrip(
        agent_pb2.UpdateLifecycleRequest(
            lifecycle=agent_pb2.Lifecycle(state=agent_pb2.Lifecycle.READY, changed_at=when)
        )
    )
    _roundtrip(
        agent_pb2.UpdateStartupRequest(
            startup=agent_pb2.Startup(
                version="v2.20.0",
                expanded_directory="/home/coder",
                subsystems=[agent_pb2.Startup.ENVBOX, agent_pb2.Startup.EXECTRACE],
            )
        )
    )
    _roundtrip(
        agent_pb2.BatchCreateLogsRequest(
            log_source_id=AGENT_ID,
            logs=[agent_pb2.Log(created_at=when, output="hello", level=agent_pb2.Log.INFO)],
        )
    )
    _roundtrip(agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True))
    _roundtrip(
        agent_pb2.GetAnnouncementBannersResponse(
            announcement_banners=[
                agent_pb2.BannerConfig(enabled=True, message="hi", background_color="#000")
            ]
        )
    )


def test_connection_reason_has_presence() -> None:
    conn = agent_pb2.Connection(
        id=AGENT_ID,
        action=agent_pb2.Connection.DISCONNECT,
        type=agent_pb2.Connection.SSH,
        timestamp=timestamp_pb2.Timestamp(seconds=1),
        ip="10.0.0.1",
        status_code=0,
        reason="",
    )
    back = _roundtrip(agent_pb2.ReportConnectionRequest(connection=conn))
    assert isinstance(back, agent_pb2.ReportConnectionRequest)
    # An explicitly empty reason is still sent (field 7, LEN 0) ...
    assert back.connection.HasField("reason")
    assert b"\x3a\x00" in conn.SerializeToString()
    # ... and an unset one is not.
    conn.ClearField("reason")
    assert not conn.HasField("reason")
    assert b"\x3a" not in conn.SerializeToString()
    assert empty_pb2.Empty().SerializeToString() == b""


def test_boundary_envelope_roundtrip() -> None:
    req = agent_pb2.ReportBoundaryLogsRequest(
        session_id="s", logs=[agent_pb2.BoundaryLog(allowed=False, sequence_number=0)]
    )
    env = boundary_pb2.BoundaryMessage(logs=req)
    assert env.WhichOneof("msg") == "logs"
    # Field 1, LEN, then exactly the bare (TagV1) request bytes.
    inner = req.SerializeToString()
    assert env.SerializeToString() == bytes([0x0A, len(inner)]) + inner
    _roundtrip(env)

    status = boundary_pb2.BoundaryMessage(
        status=boundary_pb2.BoundaryStatus(dropped_channel_full=3, dropped_batch_full=1 << 33)
    )
    back = _roundtrip(status)
    assert isinstance(back, boundary_pb2.BoundaryMessage)
    assert back.WhichOneof("msg") == "status"
    assert back.status.dropped_batch_full == 1 << 33

    # An envelope from a newer boundary with a variant we do not know decodes as "no
    # variant" (the proxy logs and ignores it) instead of failing.
    unknown = boundary_pb2.BoundaryMessage.FromString(bytes([0x1A, 0x00]))
    assert unknown.WhichOneof("msg") is None


# ---------------------------------------------------------------------------
# the Go-encoded vectors in tests/golden/payloads.json
# ---------------------------------------------------------------------------


def test_go_bytes_decode_to_reference_values(payloads: dict[str, Any]) -> None:
    vec = payloads["ReportBoundaryLogsRequest"]
    go_bytes = bytes.fromhex(vec["go_protobuf_hex"])
    assert len(go_bytes) == vec["len"] == 112

    req = agent_pb2.ReportBoundaryLogsRequest.FromString(go_bytes)
    value = vec["value"]
    assert req.session_id == value["session_id"] == "0b0e6f6e-7a2c-4f6c-9d8e-2f1c3b4a5d6e"
    assert req.confined_process_name == value["confined_process_name"] == "claude-code"
    assert len(req.logs) == len(value["logs"]) == 1
    log, ref = req.logs[0], value["logs"][0]
    assert log.allowed is ref["allowed"] is True
    assert log.time.seconds == ref["time"]["seconds"] == 1_700_000_000
    assert log.time.nanos == ref["time"]["nanos"] == 5
    assert log.WhichOneof("resource") == "http_request"
    assert log.http_request.method == ref["http_request"]["method"] == "GET"
    assert log.http_request.url == ref["http_request"]["url"]
    assert log.http_request.matched_rule == ref["http_request"]["matched_rule"]
    assert log.sequence_number == ref["sequence_number"] == 3

    # Re-build the message from the reference values: equal as messages.
    expected = agent_pb2.ReportBoundaryLogsRequest(
        session_id=value["session_id"],
        confined_process_name=value["confined_process_name"],
        logs=[
            agent_pb2.BoundaryLog(
                allowed=ref["allowed"],
                time=timestamp_pb2.Timestamp(**ref["time"]),
                http_request=agent_pb2.BoundaryLog.HttpRequest(**ref["http_request"]),
                sequence_number=ref["sequence_number"],
            )
        ],
    )
    assert req == expected


def test_our_encoding_matches_go_up_to_oneof_order(payloads: dict[str, Any]) -> None:
    vec = payloads["ReportBoundaryLogsRequest"]
    go_bytes = bytes.fromhex(vec["go_protobuf_hex"])
    value = vec["value"]
    ours = agent_pb2.ReportBoundaryLogsRequest(
        session_id=value["session_id"],
        confined_process_name=value["confined_process_name"],
    )
    log = ours.logs.add(allowed=True, sequence_number=value["logs"][0]["sequence_number"])
    log.time.seconds = value["logs"][0]["time"]["seconds"]
    log.time.nanos = value["logs"][0]["time"]["nanos"]
    log.http_request.CopyFrom(
        json_format.ParseDict(value["logs"][0]["http_request"], agent_pb2.BoundaryLog.HttpRequest())
    )
    our_bytes = ours.SerializeToString()

    # Same message either way.
    assert agent_pb2.ReportBoundaryLogsRequest.FromString(our_bytes) == (
        agent_pb2.ReportBoundaryLogsRequest.FromString(go_bytes)
    )
    # Same bytes, once Go's "oneof last" placement is normalised away.
    assert len(our_bytes) == len(go_bytes)
    assert canonical_wire(our_bytes, agent_pb2.ReportBoundaryLogsRequest) == canonical_wire(
        go_bytes, agent_pb2.ReportBoundaryLogsRequest
    )
    # Python writes fields in number order: exactly the recorded Python encoding.
    assert our_bytes == bytes.fromhex(vec["python_protobuf_hex"])
    # And the one place where Go differs is the order inside BoundaryLog.
    go_log_bytes = next(v for n, _, v in _raw_fields(go_bytes) if n == 1)
    assert isinstance(go_log_bytes, bytes)
    go_log = [n for n, _, _ in _raw_fields(go_log_bytes)]
    our_log = [n for n, _, _ in _raw_fields(ours.logs[0].SerializeToString())]
    assert go_log == [1, 2, 4, 3]
    assert our_log == [1, 2, 3, 4]


def test_empty_response_and_large_request(payloads: dict[str, Any]) -> None:
    assert payloads["ReportBoundaryLogsResponse"]["hex"] == ""
    assert agent_pb2.ReportBoundaryLogsResponse().SerializeToString() == b""
    assert agent_pb2.ReportBoundaryLogsResponse.FromString(b"") == (
        agent_pb2.ReportBoundaryLogsResponse()
    )

    large = payloads["large_request"]
    n = large["len"] - 4
    s = "".join(chr(ord("a") + i % 26) for i in range(n))
    data = agent_pb2.ReportBoundaryLogsRequest(confined_process_name=s).SerializeToString()
    assert len(data) == large["len"]
    assert data.hex().startswith(large["head_hex"])
    assert hashlib.sha256(data).hexdigest() == large["sha256"]


# ---------------------------------------------------------------------------
# generated code vs the runtime requirement
# ---------------------------------------------------------------------------


def _gencode_version(module: Any) -> tuple[int, ...]:
    text = Path(module.__file__).read_text()
    match = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)$", text, re.M)
    assert match, f"no gencode version header in {module.__file__}"
    return tuple(int(g) for g in match.groups())


def test_setup_cfg_protobuf_floor_covers_gencode() -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    gencode = {_gencode_version(agent_pb2), _gencode_version(boundary_pb2)}
    assert len(gencode) == 1
    (gen,) = gencode
    gen_version = Version(".".join(map(str, gen)))

    script = (ROOT / "scripts" / "gen-proto").read_text()
    pinned = re.search(r"^PROTOBUF_GENCODE=(\S+)", script, re.M)
    assert pinned and Version(pinned.group(1)) == gen_version

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [
        Requirement(line)
        for line in cfg["options"]["install_requires"].splitlines()
        if line.strip()
    ]
    (protobuf,) = [r for r in reqs if r.name == "protobuf"]
    floors = [Version(s.version) for s in protobuf.specifier if s.operator == ">="]
    assert floors, "protobuf needs a >= lower bound"
    # The runtime refuses gencode newer than itself, so the floor must be >= gencode.
    assert max(floors) >= gen_version
    assert protobuf.specifier.contains(gen_version)
