from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AppHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APP_HEALTH_UNSPECIFIED: _ClassVar[AppHealth]
    DISABLED: _ClassVar[AppHealth]
    INITIALIZING: _ClassVar[AppHealth]
    HEALTHY: _ClassVar[AppHealth]
    UNHEALTHY: _ClassVar[AppHealth]
APP_HEALTH_UNSPECIFIED: AppHealth
DISABLED: AppHealth
INITIALIZING: AppHealth
HEALTHY: AppHealth
UNHEALTHY: AppHealth

class GetManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("agent_id", "git_auth_configs", "environment_variables", "directory", "vs_code_port_proxy_uri", "motd_path", "disable_direct_connections", "derp_force_websockets", "scripts", "apps", "metadata", "owner_username", "workspace_id", "agent_name", "workspace_name", "devcontainers", "parent_id", "secrets")
    class EnvironmentVariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    GIT_AUTH_CONFIGS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    VS_CODE_PORT_PROXY_URI_FIELD_NUMBER: _ClassVar[int]
    MOTD_PATH_FIELD_NUMBER: _ClassVar[int]
    DISABLE_DIRECT_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    DERP_FORCE_WEBSOCKETS_FIELD_NUMBER: _ClassVar[int]
    SCRIPTS_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OWNER_USERNAME_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVCONTAINERS_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    agent_id: bytes
    git_auth_configs: int
    environment_variables: _containers.ScalarMap[str, str]
    directory: str
    vs_code_port_proxy_uri: str
    motd_path: str
    disable_direct_connections: bool
    derp_force_websockets: bool
    scripts: _containers.RepeatedCompositeFieldContainer[WorkspaceAgentScript]
    apps: _containers.RepeatedCompositeFieldContainer[WorkspaceApp]
    metadata: _containers.RepeatedCompositeFieldContainer[WorkspaceAgentMetadata.Description]
    owner_username: str
    workspace_id: bytes
    agent_name: str
    workspace_name: str
    devcontainers: _containers.RepeatedCompositeFieldContainer[WorkspaceAgentDevcontainer]
    parent_id: bytes
    secrets: _containers.RepeatedCompositeFieldContainer[WorkspaceSecret]
    def __init__(self, agent_id: _Optional[bytes] = ..., git_auth_configs: _Optional[int] = ..., environment_variables: _Optional[_Mapping[str, str]] = ..., directory: _Optional[str] = ..., vs_code_port_proxy_uri: _Optional[str] = ..., motd_path: _Optional[str] = ..., disable_direct_connections: bool = ..., derp_force_websockets: bool = ..., scripts: _Optional[_Iterable[_Union[WorkspaceAgentScript, _Mapping]]] = ..., apps: _Optional[_Iterable[_Union[WorkspaceApp, _Mapping]]] = ..., metadata: _Optional[_Iterable[_Union[WorkspaceAgentMetadata.Description, _Mapping]]] = ..., owner_username: _Optional[str] = ..., workspace_id: _Optional[bytes] = ..., agent_name: _Optional[str] = ..., workspace_name: _Optional[str] = ..., devcontainers: _Optional[_Iterable[_Union[WorkspaceAgentDevcontainer, _Mapping]]] = ..., parent_id: _Optional[bytes] = ..., secrets: _Optional[_Iterable[_Union[WorkspaceSecret, _Mapping]]] = ...) -> None: ...

class WorkspaceApp(_message.Message):
    __slots__ = ("id", "url", "external", "slug", "display_name", "command", "icon", "subdomain", "subdomain_name", "sharing_level", "healthcheck", "health", "hidden")
    class SharingLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SHARING_LEVEL_UNSPECIFIED: _ClassVar[WorkspaceApp.SharingLevel]
        OWNER: _ClassVar[WorkspaceApp.SharingLevel]
        AUTHENTICATED: _ClassVar[WorkspaceApp.SharingLevel]
        PUBLIC: _ClassVar[WorkspaceApp.SharingLevel]
        ORGANIZATION: _ClassVar[WorkspaceApp.SharingLevel]
    SHARING_LEVEL_UNSPECIFIED: WorkspaceApp.SharingLevel
    OWNER: WorkspaceApp.SharingLevel
    AUTHENTICATED: WorkspaceApp.SharingLevel
    PUBLIC: WorkspaceApp.SharingLevel
    ORGANIZATION: WorkspaceApp.SharingLevel
    class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HEALTH_UNSPECIFIED: _ClassVar[WorkspaceApp.Health]
        DISABLED: _ClassVar[WorkspaceApp.Health]
        INITIALIZING: _ClassVar[WorkspaceApp.Health]
        HEALTHY: _ClassVar[WorkspaceApp.Health]
        UNHEALTHY: _ClassVar[WorkspaceApp.Health]
    HEALTH_UNSPECIFIED: WorkspaceApp.Health
    DISABLED: WorkspaceApp.Health
    INITIALIZING: WorkspaceApp.Health
    HEALTHY: WorkspaceApp.Health
    UNHEALTHY: WorkspaceApp.Health
    class Healthcheck(_message.Message):
        __slots__ = ("url", "interval", "threshold")
        URL_FIELD_NUMBER: _ClassVar[int]
        INTERVAL_FIELD_NUMBER: _ClassVar[int]
        THRESHOLD_FIELD_NUMBER: _ClassVar[int]
        url: str
        interval: _duration_pb2.Duration
        threshold: int
        def __init__(self, url: _Optional[str] = ..., interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., threshold: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ICON_FIELD_NUMBER: _ClassVar[int]
    SUBDOMAIN_FIELD_NUMBER: _ClassVar[int]
    SUBDOMAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    SHARING_LEVEL_FIELD_NUMBER: _ClassVar[int]
    HEALTHCHECK_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    url: str
    external: bool
    slug: str
    display_name: str
    command: str
    icon: str
    subdomain: bool
    subdomain_name: str
    sharing_level: WorkspaceApp.SharingLevel
    healthcheck: WorkspaceApp.Healthcheck
    health: WorkspaceApp.Health
    hidden: bool
    def __init__(self, id: _Optional[bytes] = ..., url: _Optional[str] = ..., external: bool = ..., slug: _Optional[str] = ..., display_name: _Optional[str] = ..., command: _Optional[str] = ..., icon: _Optional[str] = ..., subdomain: bool = ..., subdomain_name: _Optional[str] = ..., sharing_level: _Optional[_Union[WorkspaceApp.SharingLevel, str]] = ..., healthcheck: _Optional[_Union[WorkspaceApp.Healthcheck, _Mapping]] = ..., health: _Optional[_Union[WorkspaceApp.Health, str]] = ..., hidden: bool = ...) -> None: ...

class WorkspaceAgentScript(_message.Message):
    __slots__ = ("log_source_id", "log_path", "script", "cron", "run_on_start", "run_on_stop", "start_blocks_login", "timeout", "display_name", "id")
    LOG_SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_FIELD_NUMBER: _ClassVar[int]
    CRON_FIELD_NUMBER: _ClassVar[int]
    RUN_ON_START_FIELD_NUMBER: _ClassVar[int]
    RUN_ON_STOP_FIELD_NUMBER: _ClassVar[int]
    START_BLOCKS_LOGIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    log_source_id: bytes
    log_path: str
    script: str
    cron: str
    run_on_start: bool
    run_on_stop: bool
    start_blocks_login: bool
    timeout: _duration_pb2.Duration
    display_name: str
    id: bytes
    def __init__(self, log_source_id: _Optional[bytes] = ..., log_path: _Optional[str] = ..., script: _Optional[str] = ..., cron: _Optional[str] = ..., run_on_start: bool = ..., run_on_stop: bool = ..., start_blocks_login: bool = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., display_name: _Optional[str] = ..., id: _Optional[bytes] = ...) -> None: ...

class WorkspaceAgentMetadata(_message.Message):
    __slots__ = ("result", "description")
    class Result(_message.Message):
        __slots__ = ("collected_at", "age", "value", "error")
        COLLECTED_AT_FIELD_NUMBER: _ClassVar[int]
        AGE_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        collected_at: _timestamp_pb2.Timestamp
        age: int
        value: str
        error: str
        def __init__(self, collected_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., age: _Optional[int] = ..., value: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
    class Description(_message.Message):
        __slots__ = ("display_name", "key", "script", "interval", "timeout")
        DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
        KEY_FIELD_NUMBER: _ClassVar[int]
        SCRIPT_FIELD_NUMBER: _ClassVar[int]
        INTERVAL_FIELD_NUMBER: _ClassVar[int]
        TIMEOUT_FIELD_NUMBER: _ClassVar[int]
        display_name: str
        key: str
        script: str
        interval: _duration_pb2.Duration
        timeout: _duration_pb2.Duration
        def __init__(self, display_name: _Optional[str] = ..., key: _Optional[str] = ..., script: _Optional[str] = ..., interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    result: WorkspaceAgentMetadata.Result
    description: WorkspaceAgentMetadata.Description
    def __init__(self, result: _Optional[_Union[WorkspaceAgentMetadata.Result, _Mapping]] = ..., description: _Optional[_Union[WorkspaceAgentMetadata.Description, _Mapping]] = ...) -> None: ...

class WorkspaceAgentDevcontainer(_message.Message):
    __slots__ = ("id", "workspace_folder", "config_path", "name", "subagent_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FOLDER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUBAGENT_ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    workspace_folder: str
    config_path: str
    name: str
    subagent_id: bytes
    def __init__(self, id: _Optional[bytes] = ..., workspace_folder: _Optional[str] = ..., config_path: _Optional[str] = ..., name: _Optional[str] = ..., subagent_id: _Optional[bytes] = ...) -> None: ...

class WorkspaceSecret(_message.Message):
    __slots__ = ("env_name", "file_path", "value")
    ENV_NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    env_name: str
    file_path: str
    value: bytes
    def __init__(self, env_name: _Optional[str] = ..., file_path: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class GetServiceBannerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceBanner(_message.Message):
    __slots__ = ("enabled", "message", "background_color")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_COLOR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    message: str
    background_color: str
    def __init__(self, enabled: bool = ..., message: _Optional[str] = ..., background_color: _Optional[str] = ...) -> None: ...

class GetAnnouncementBannersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAnnouncementBannersResponse(_message.Message):
    __slots__ = ("announcement_banners",)
    ANNOUNCEMENT_BANNERS_FIELD_NUMBER: _ClassVar[int]
    announcement_banners: _containers.RepeatedCompositeFieldContainer[BannerConfig]
    def __init__(self, announcement_banners: _Optional[_Iterable[_Union[BannerConfig, _Mapping]]] = ...) -> None: ...

class BannerConfig(_message.Message):
    __slots__ = ("enabled", "message", "background_color")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_COLOR_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    message: str
    background_color: str
    def __init__(self, enabled: bool = ..., message: _Optional[str] = ..., background_color: _Optional[str] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("connections_by_proto", "connection_count", "connection_median_latency_ms", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "session_count_vscode", "session_count_jetbrains", "session_count_reconnecting_pty", "session_count_ssh", "metrics", "session_counts")
    class Metric(_message.Message):
        __slots__ = ("name", "type", "value", "labels")
        class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            TYPE_UNSPECIFIED: _ClassVar[Stats.Metric.Type]
            COUNTER: _ClassVar[Stats.Metric.Type]
            GAUGE: _ClassVar[Stats.Metric.Type]
        TYPE_UNSPECIFIED: Stats.Metric.Type
        COUNTER: Stats.Metric.Type
        GAUGE: Stats.Metric.Type
        class Label(_message.Message):
            __slots__ = ("name", "value")
            NAME_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            name: str
            value: str
            def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
        NAME_FIELD_NUMBER: _ClassVar[int]
        TYPE_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        LABELS_FIELD_NUMBER: _ClassVar[int]
        name: str
        type: Stats.Metric.Type
        value: float
        labels: _containers.RepeatedCompositeFieldContainer[Stats.Metric.Label]
        def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[Stats.Metric.Type, str]] = ..., value: _Optional[float] = ..., labels: _Optional[_Iterable[_Union[Stats.Metric.Label, _Mapping]]] = ...) -> None: ...
    class ConnectionsByProtoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SessionCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CONNECTIONS_BY_PROTO_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_MEDIAN_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    RX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_PACKETS_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_COUNT_VSCODE_FIELD_NUMBER: _ClassVar[int]
    SESSION_COUNT_JETBRAINS_FIELD_NUMBER: _ClassVar[int]
    SESSION_COUNT_RECONNECTING_PTY_FIELD_NUMBER: _ClassVar[int]
    SESSION_COUNT_SSH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SESSION_COUNTS_FIELD_NUMBER: _ClassVar[int]
    connections_by_proto: _containers.ScalarMap[str, int]
    connection_count: int
    connection_median_latency_ms: float
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    session_count_vscode: int
    session_count_jetbrains: int
    session_count_reconnecting_pty: int
    session_count_ssh: int
    metrics: _containers.RepeatedCompositeFieldContainer[Stats.Metric]
    session_counts: _containers.ScalarMap[str, int]
    def __init__(self, connections_by_proto: _Optional[_Mapping[str, int]] = ..., connection_count: _Optional[int] = ..., connection_median_latency_ms: _Optional[float] = ..., rx_packets: _Optional[int] = ..., rx_bytes: _Optional[int] = ..., tx_packets: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., session_count_vscode: _Optional[int] = ..., session_count_jetbrains: _Optional[int] = ..., session_count_reconnecting_pty: _Optional[int] = ..., session_count_ssh: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[Stats.Metric, _Mapping]]] = ..., session_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UpdateStatsRequest(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: Stats
    def __init__(self, stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class UpdateStatsResponse(_message.Message):
    __slots__ = ("report_interval",)
    REPORT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    report_interval: _duration_pb2.Duration
    def __init__(self, report_interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Lifecycle(_message.Message):
    __slots__ = ("state", "changed_at")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Lifecycle.State]
        CREATED: _ClassVar[Lifecycle.State]
        STARTING: _ClassVar[Lifecycle.State]
        START_TIMEOUT: _ClassVar[Lifecycle.State]
        START_ERROR: _ClassVar[Lifecycle.State]
        READY: _ClassVar[Lifecycle.State]
        SHUTTING_DOWN: _ClassVar[Lifecycle.State]
        SHUTDOWN_TIMEOUT: _ClassVar[Lifecycle.State]
        SHUTDOWN_ERROR: _ClassVar[Lifecycle.State]
        OFF: _ClassVar[Lifecycle.State]
    STATE_UNSPECIFIED: Lifecycle.State
    CREATED: Lifecycle.State
    STARTING: Lifecycle.State
    START_TIMEOUT: Lifecycle.State
    START_ERROR: Lifecycle.State
    READY: Lifecycle.State
    SHUTTING_DOWN: Lifecycle.State
    SHUTDOWN_TIMEOUT: Lifecycle.State
    SHUTDOWN_ERROR: Lifecycle.State
    OFF: Lifecycle.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    state: Lifecycle.State
    changed_at: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[_Union[Lifecycle.State, str]] = ..., changed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UpdateLifecycleRequest(_message.Message):
    __slots__ = ("lifecycle",)
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    lifecycle: Lifecycle
    def __init__(self, lifecycle: _Optional[_Union[Lifecycle, _Mapping]] = ...) -> None: ...

class Startup(_message.Message):
    __slots__ = ("version", "expanded_directory", "subsystems")
    class Subsystem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SUBSYSTEM_UNSPECIFIED: _ClassVar[Startup.Subsystem]
        ENVBOX: _ClassVar[Startup.Subsystem]
        ENVBUILDER: _ClassVar[Startup.Subsystem]
        EXECTRACE: _ClassVar[Startup.Subsystem]
    SUBSYSTEM_UNSPECIFIED: Startup.Subsystem
    ENVBOX: Startup.Subsystem
    ENVBUILDER: Startup.Subsystem
    EXECTRACE: Startup.Subsystem
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEMS_FIELD_NUMBER: _ClassVar[int]
    version: str
    expanded_directory: str
    subsystems: _containers.RepeatedScalarFieldContainer[Startup.Subsystem]
    def __init__(self, version: _Optional[str] = ..., expanded_directory: _Optional[str] = ..., subsystems: _Optional[_Iterable[_Union[Startup.Subsystem, str]]] = ...) -> None: ...

class UpdateStartupRequest(_message.Message):
    __slots__ = ("startup",)
    STARTUP_FIELD_NUMBER: _ClassVar[int]
    startup: Startup
    def __init__(self, startup: _Optional[_Union[Startup, _Mapping]] = ...) -> None: ...

class BatchUpdateAppHealthRequest(_message.Message):
    __slots__ = ("updates",)
    class HealthUpdate(_message.Message):
        __slots__ = ("id", "health")
        ID_FIELD_NUMBER: _ClassVar[int]
        HEALTH_FIELD_NUMBER: _ClassVar[int]
        id: bytes
        health: AppHealth
        def __init__(self, id: _Optional[bytes] = ..., health: _Optional[_Union[AppHealth, str]] = ...) -> None: ...
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[BatchUpdateAppHealthRequest.HealthUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[BatchUpdateAppHealthRequest.HealthUpdate, _Mapping]]] = ...) -> None: ...

class BatchUpdateAppHealthResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("key", "result")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    key: str
    result: WorkspaceAgentMetadata.Result
    def __init__(self, key: _Optional[str] = ..., result: _Optional[_Union[WorkspaceAgentMetadata.Result, _Mapping]] = ...) -> None: ...

class BatchUpdateMetadataRequest(_message.Message):
    __slots__ = ("metadata",)
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.RepeatedCompositeFieldContainer[Metadata]
    def __init__(self, metadata: _Optional[_Iterable[_Union[Metadata, _Mapping]]] = ...) -> None: ...

class BatchUpdateMetadataResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Log(_message.Message):
    __slots__ = ("created_at", "output", "level")
    class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        LEVEL_UNSPECIFIED: _ClassVar[Log.Level]
        TRACE: _ClassVar[Log.Level]
        DEBUG: _ClassVar[Log.Level]
        INFO: _ClassVar[Log.Level]
        WARN: _ClassVar[Log.Level]
        ERROR: _ClassVar[Log.Level]
    LEVEL_UNSPECIFIED: Log.Level
    TRACE: Log.Level
    DEBUG: Log.Level
    INFO: Log.Level
    WARN: Log.Level
    ERROR: Log.Level
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    created_at: _timestamp_pb2.Timestamp
    output: str
    level: Log.Level
    def __init__(self, created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., output: _Optional[str] = ..., level: _Optional[_Union[Log.Level, str]] = ...) -> None: ...

class BatchCreateLogsRequest(_message.Message):
    __slots__ = ("log_source_id", "logs")
    LOG_SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    log_source_id: bytes
    logs: _containers.RepeatedCompositeFieldContainer[Log]
    def __init__(self, log_source_id: _Optional[bytes] = ..., logs: _Optional[_Iterable[_Union[Log, _Mapping]]] = ...) -> None: ...

class BatchCreateLogsResponse(_message.Message):
    __slots__ = ("log_limit_exceeded",)
    LOG_LIMIT_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    log_limit_exceeded: bool
    def __init__(self, log_limit_exceeded: bool = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("script_id", "start", "end", "exit_code", "stage", "status")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        START: _ClassVar[Timing.Stage]
        STOP: _ClassVar[Timing.Stage]
        CRON: _ClassVar[Timing.Stage]
    START: Timing.Stage
    STOP: Timing.Stage
    CRON: Timing.Stage
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[Timing.Status]
        EXIT_FAILURE: _ClassVar[Timing.Status]
        TIMED_OUT: _ClassVar[Timing.Status]
        PIPES_LEFT_OPEN: _ClassVar[Timing.Status]
    OK: Timing.Status
    EXIT_FAILURE: Timing.Status
    TIMED_OUT: Timing.Status
    PIPES_LEFT_OPEN: Timing.Status
    SCRIPT_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    script_id: bytes
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    exit_code: int
    stage: Timing.Stage
    status: Timing.Status
    def __init__(self, script_id: _Optional[bytes] = ..., start: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., stage: _Optional[_Union[Timing.Stage, str]] = ..., status: _Optional[_Union[Timing.Status, str]] = ...) -> None: ...

class WorkspaceAgentScriptCompletedRequest(_message.Message):
    __slots__ = ("timing",)
    TIMING_FIELD_NUMBER: _ClassVar[int]
    timing: Timing
    def __init__(self, timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class WorkspaceAgentScriptCompletedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetResourcesMonitoringConfigurationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetResourcesMonitoringConfigurationResponse(_message.Message):
    __slots__ = ("config", "memory", "volumes")
    class Config(_message.Message):
        __slots__ = ("num_datapoints", "collection_interval_seconds")
        NUM_DATAPOINTS_FIELD_NUMBER: _ClassVar[int]
        COLLECTION_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
        num_datapoints: int
        collection_interval_seconds: int
        def __init__(self, num_datapoints: _Optional[int] = ..., collection_interval_seconds: _Optional[int] = ...) -> None: ...
    class Memory(_message.Message):
        __slots__ = ("enabled",)
        ENABLED_FIELD_NUMBER: _ClassVar[int]
        enabled: bool
        def __init__(self, enabled: bool = ...) -> None: ...
    class Volume(_message.Message):
        __slots__ = ("enabled", "path")
        ENABLED_FIELD_NUMBER: _ClassVar[int]
        PATH_FIELD_NUMBER: _ClassVar[int]
        enabled: bool
        path: str
        def __init__(self, enabled: bool = ..., path: _Optional[str] = ...) -> None: ...
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    config: GetResourcesMonitoringConfigurationResponse.Config
    memory: GetResourcesMonitoringConfigurationResponse.Memory
    volumes: _containers.RepeatedCompositeFieldContainer[GetResourcesMonitoringConfigurationResponse.Volume]
    def __init__(self, config: _Optional[_Union[GetResourcesMonitoringConfigurationResponse.Config, _Mapping]] = ..., memory: _Optional[_Union[GetResourcesMonitoringConfigurationResponse.Memory, _Mapping]] = ..., volumes: _Optional[_Iterable[_Union[GetResourcesMonitoringConfigurationResponse.Volume, _Mapping]]] = ...) -> None: ...

class PushResourcesMonitoringUsageRequest(_message.Message):
    __slots__ = ("datapoints",)
    class Datapoint(_message.Message):
        __slots__ = ("collected_at", "memory", "volumes")
        class MemoryUsage(_message.Message):
            __slots__ = ("used", "total")
            USED_FIELD_NUMBER: _ClassVar[int]
            TOTAL_FIELD_NUMBER: _ClassVar[int]
            used: int
            total: int
            def __init__(self, used: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...
        class VolumeUsage(_message.Message):
            __slots__ = ("volume", "used", "total")
            VOLUME_FIELD_NUMBER: _ClassVar[int]
            USED_FIELD_NUMBER: _ClassVar[int]
            TOTAL_FIELD_NUMBER: _ClassVar[int]
            volume: str
            used: int
            total: int
            def __init__(self, volume: _Optional[str] = ..., used: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...
        COLLECTED_AT_FIELD_NUMBER: _ClassVar[int]
        MEMORY_FIELD_NUMBER: _ClassVar[int]
        VOLUMES_FIELD_NUMBER: _ClassVar[int]
        collected_at: _timestamp_pb2.Timestamp
        memory: PushResourcesMonitoringUsageRequest.Datapoint.MemoryUsage
        volumes: _containers.RepeatedCompositeFieldContainer[PushResourcesMonitoringUsageRequest.Datapoint.VolumeUsage]
        def __init__(self, collected_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., memory: _Optional[_Union[PushResourcesMonitoringUsageRequest.Datapoint.MemoryUsage, _Mapping]] = ..., volumes: _Optional[_Iterable[_Union[PushResourcesMonitoringUsageRequest.Datapoint.VolumeUsage, _Mapping]]] = ...) -> None: ...
    DATAPOINTS_FIELD_NUMBER: _ClassVar[int]
    datapoints: _containers.RepeatedCompositeFieldContainer[PushResourcesMonitoringUsageRequest.Datapoint]
    def __init__(self, datapoints: _Optional[_Iterable[_Union[PushResourcesMonitoringUsageRequest.Datapoint, _Mapping]]] = ...) -> None: ...

class PushResourcesMonitoringUsageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Connection(_message.Message):
    __slots__ = ("id", "action", "type", "timestamp", "ip", "status_code", "reason")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Connection.Action]
        CONNECT: _ClassVar[Connection.Action]
        DISCONNECT: _ClassVar[Connection.Action]
    ACTION_UNSPECIFIED: Connection.Action
    CONNECT: Connection.Action
    DISCONNECT: Connection.Action
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Connection.Type]
        SSH: _ClassVar[Connection.Type]
        VSCODE: _ClassVar[Connection.Type]
        JETBRAINS: _ClassVar[Connection.Type]
        RECONNECTING_PTY: _ClassVar[Connection.Type]
    TYPE_UNSPECIFIED: Connection.Type
    SSH: Connection.Type
    VSCODE: Connection.Type
    JETBRAINS: Connection.Type
    RECONNECTING_PTY: Connection.Type
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    action: Connection.Action
    type: Connection.Type
    timestamp: _timestamp_pb2.Timestamp
    ip: str
    status_code: int
    reason: str
    def __init__(self, id: _Optional[bytes] = ..., action: _Optional[_Union[Connection.Action, str]] = ..., type: _Optional[_Union[Connection.Type, str]] = ..., timestamp: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., ip: _Optional[str] = ..., status_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportConnectionRequest(_message.Message):
    __slots__ = ("connection",)
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    connection: Connection
    def __init__(self, connection: _Optional[_Union[Connection, _Mapping]] = ...) -> None: ...

class SubAgent(_message.Message):
    __slots__ = ("name", "id", "auth_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: bytes
    auth_token: bytes
    def __init__(self, name: _Optional[str] = ..., id: _Optional[bytes] = ..., auth_token: _Optional[bytes] = ...) -> None: ...

class CreateSubAgentRequest(_message.Message):
    __slots__ = ("name", "directory", "architecture", "operating_system", "apps", "display_apps", "id")
    class DisplayApp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VSCODE: _ClassVar[CreateSubAgentRequest.DisplayApp]
        VSCODE_INSIDERS: _ClassVar[CreateSubAgentRequest.DisplayApp]
        WEB_TERMINAL: _ClassVar[CreateSubAgentRequest.DisplayApp]
        SSH_HELPER: _ClassVar[CreateSubAgentRequest.DisplayApp]
        PORT_FORWARDING_HELPER: _ClassVar[CreateSubAgentRequest.DisplayApp]
    VSCODE: CreateSubAgentRequest.DisplayApp
    VSCODE_INSIDERS: CreateSubAgentRequest.DisplayApp
    WEB_TERMINAL: CreateSubAgentRequest.DisplayApp
    SSH_HELPER: CreateSubAgentRequest.DisplayApp
    PORT_FORWARDING_HELPER: CreateSubAgentRequest.DisplayApp
    class App(_message.Message):
        __slots__ = ("slug", "command", "display_name", "external", "group", "healthcheck", "hidden", "icon", "open_in", "order", "share", "subdomain", "url")
        class OpenIn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            SLIM_WINDOW: _ClassVar[CreateSubAgentRequest.App.OpenIn]
            TAB: _ClassVar[CreateSubAgentRequest.App.OpenIn]
        SLIM_WINDOW: CreateSubAgentRequest.App.OpenIn
        TAB: CreateSubAgentRequest.App.OpenIn
        class SharingLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
            __slots__ = ()
            OWNER: _ClassVar[CreateSubAgentRequest.App.SharingLevel]
            AUTHENTICATED: _ClassVar[CreateSubAgentRequest.App.SharingLevel]
            PUBLIC: _ClassVar[CreateSubAgentRequest.App.SharingLevel]
            ORGANIZATION: _ClassVar[CreateSubAgentRequest.App.SharingLevel]
        OWNER: CreateSubAgentRequest.App.SharingLevel
        AUTHENTICATED: CreateSubAgentRequest.App.SharingLevel
        PUBLIC: CreateSubAgentRequest.App.SharingLevel
        ORGANIZATION: CreateSubAgentRequest.App.SharingLevel
        class Healthcheck(_message.Message):
            __slots__ = ("interval", "threshold", "url")
            INTERVAL_FIELD_NUMBER: _ClassVar[int]
            THRESHOLD_FIELD_NUMBER: _ClassVar[int]
            URL_FIELD_NUMBER: _ClassVar[int]
            interval: int
            threshold: int
            url: str
            def __init__(self, interval: _Optional[int] = ..., threshold: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...
        SLUG_FIELD_NUMBER: _ClassVar[int]
        COMMAND_FIELD_NUMBER: _ClassVar[int]
        DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
        EXTERNAL_FIELD_NUMBER: _ClassVar[int]
        GROUP_FIELD_NUMBER: _ClassVar[int]
        HEALTHCHECK_FIELD_NUMBER: _ClassVar[int]
        HIDDEN_FIELD_NUMBER: _ClassVar[int]
        ICON_FIELD_NUMBER: _ClassVar[int]
        OPEN_IN_FIELD_NUMBER: _ClassVar[int]
        ORDER_FIELD_NUMBER: _ClassVar[int]
        SHARE_FIELD_NUMBER: _ClassVar[int]
        SUBDOMAIN_FIELD_NUMBER: _ClassVar[int]
        URL_FIELD_NUMBER: _ClassVar[int]
        slug: str
        command: str
        display_name: str
        external: bool
        group: str
        healthcheck: CreateSubAgentRequest.App.Healthcheck
        hidden: bool
        icon: str
        open_in: CreateSubAgentRequest.App.OpenIn
        order: int
        share: CreateSubAgentRequest.App.SharingLevel
        subdomain: bool
        url: str
        def __init__(self, slug: _Optional[str] = ..., command: _Optional[str] = ..., display_name: _Optional[str] = ..., external: bool = ..., group: _Optional[str] = ..., healthcheck: _Optional[_Union[CreateSubAgentRequest.App.Healthcheck, _Mapping]] = ..., hidden: bool = ..., icon: _Optional[str] = ..., open_in: _Optional[_Union[CreateSubAgentRequest.App.OpenIn, str]] = ..., order: _Optional[int] = ..., share: _Optional[_Union[CreateSubAgentRequest.App.SharingLevel, str]] = ..., subdomain: bool = ..., url: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    OPERATING_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_APPS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    directory: str
    architecture: str
    operating_system: str
    apps: _containers.RepeatedCompositeFieldContainer[CreateSubAgentRequest.App]
    display_apps: _containers.RepeatedScalarFieldContainer[CreateSubAgentRequest.DisplayApp]
    id: bytes
    def __init__(self, name: _Optional[str] = ..., directory: _Optional[str] = ..., architecture: _Optional[str] = ..., operating_system: _Optional[str] = ..., apps: _Optional[_Iterable[_Union[CreateSubAgentRequest.App, _Mapping]]] = ..., display_apps: _Optional[_Iterable[_Union[CreateSubAgentRequest.DisplayApp, str]]] = ..., id: _Optional[bytes] = ...) -> None: ...

class CreateSubAgentResponse(_message.Message):
    __slots__ = ("agent", "app_creation_errors")
    class AppCreationError(_message.Message):
        __slots__ = ("index", "field", "error")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        FIELD_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        index: int
        field: str
        error: str
        def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    APP_CREATION_ERRORS_FIELD_NUMBER: _ClassVar[int]
    agent: SubAgent
    app_creation_errors: _containers.RepeatedCompositeFieldContainer[CreateSubAgentResponse.AppCreationError]
    def __init__(self, agent: _Optional[_Union[SubAgent, _Mapping]] = ..., app_creation_errors: _Optional[_Iterable[_Union[CreateSubAgentResponse.AppCreationError, _Mapping]]] = ...) -> None: ...

class DeleteSubAgentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    def __init__(self, id: _Optional[bytes] = ...) -> None: ...

class DeleteSubAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSubAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSubAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[SubAgent]
    def __init__(self, agents: _Optional[_Iterable[_Union[SubAgent, _Mapping]]] = ...) -> None: ...

class BoundaryLog(_message.Message):
    __slots__ = ("allowed", "time", "http_request", "sequence_number")
    class HttpRequest(_message.Message):
        __slots__ = ("method", "url", "matched_rule")
        METHOD_FIELD_NUMBER: _ClassVar[int]
        URL_FIELD_NUMBER: _ClassVar[int]
        MATCHED_RULE_FIELD_NUMBER: _ClassVar[int]
        method: str
        url: str
        matched_rule: str
        def __init__(self, method: _Optional[str] = ..., url: _Optional[str] = ..., matched_rule: _Optional[str] = ...) -> None: ...
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    HTTP_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    time: _timestamp_pb2.Timestamp
    http_request: BoundaryLog.HttpRequest
    sequence_number: int
    def __init__(self, allowed: bool = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., http_request: _Optional[_Union[BoundaryLog.HttpRequest, _Mapping]] = ..., sequence_number: _Optional[int] = ...) -> None: ...

class ReportBoundaryLogsRequest(_message.Message):
    __slots__ = ("logs", "session_id", "confined_process_name")
    LOGS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFINED_PROCESS_NAME_FIELD_NUMBER: _ClassVar[int]
    logs: _containers.RepeatedCompositeFieldContainer[BoundaryLog]
    session_id: str
    confined_process_name: str
    def __init__(self, logs: _Optional[_Iterable[_Union[BoundaryLog, _Mapping]]] = ..., session_id: _Optional[str] = ..., confined_process_name: _Optional[str] = ...) -> None: ...

class ReportBoundaryLogsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateAppStatusRequest(_message.Message):
    __slots__ = ("slug", "state", "message", "uri")
    class AppStatusState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WORKING: _ClassVar[UpdateAppStatusRequest.AppStatusState]
        IDLE: _ClassVar[UpdateAppStatusRequest.AppStatusState]
        COMPLETE: _ClassVar[UpdateAppStatusRequest.AppStatusState]
        FAILURE: _ClassVar[UpdateAppStatusRequest.AppStatusState]
    WORKING: UpdateAppStatusRequest.AppStatusState
    IDLE: UpdateAppStatusRequest.AppStatusState
    COMPLETE: UpdateAppStatusRequest.AppStatusState
    FAILURE: UpdateAppStatusRequest.AppStatusState
    SLUG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    slug: str
    state: UpdateAppStatusRequest.AppStatusState
    message: str
    uri: str
    def __init__(self, slug: _Optional[str] = ..., state: _Optional[_Union[UpdateAppStatusRequest.AppStatusState, str]] = ..., message: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class UpdateAppStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
