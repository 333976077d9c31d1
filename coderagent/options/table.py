"""The option table: every ``coder agent`` option of upstream's and ours, as data.

One row per option (:class:`OptionSpec`): its flag, its ``CODER_AGENT_*``
variable, its default as text, its kind and its help.  The command line,
the environment fallback, the help and the validation are all derived from
this table (:mod:`coderagent.options`), so an option cannot exist in one
place and be forgotten in another.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from coderagent.options.values import (
    ADDRESS,
    AUTH,
    AUTH_TYPES,
    BOOL,
    COUNT,
    DURATION,
    ENDPOINT,
    HEADERS,
    OPTIONAL_PATH,
    PATH,
    PORT,
    POSITIVE_DURATION,
    SIZE,
    TEXT,
    URL,
    Kind,
)
from coderagent.policy import BLOCKED_FILE_TRANSFER_COMMANDS


@dataclass(frozen=True)
class OptionSpec:
    """One row of the option table.

    ``default`` is the text a user could have typed, parsed like any other
    value, so a default can never be of a different type than a user's value.
    ``helpDefault`` replaces it in the help when the real default is derived
    (``--ssh-host-key-dir``).  A ``secret`` value is never shown anywhere;
    an ``ignored`` option is accepted for compatibility but has no effect.
    """

    name: str
    env: str
    default: str
    kind: Kind
    help: str
    secret: bool = False
    ignored: bool = False
    helpDefault: str | None = None


_TMP = tempfile.gettempdir()
_IGNORED = "Accepted for compatibility and ignored by this agent."
HOST_KEY_SUBDIR = "coder-agent-ssh-host-keys"
SPOOL_SUBDIR = "coder-agent-boundary-spool"
#: Where the control socket is when --socket-path is not given.
DEFAULT_SOCKET_PATH = os.path.join(_TMP, "coder-agent.sock")

#: Every option of ``twistd coder-agent``, upstream's first, then ours.
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "auth",
        "CODER_AGENT_AUTH",
        "token",
        AUTH,
        "How the agent proves its identity to coderd: " + ", ".join(AUTH_TYPES) + ".",
    ),
    OptionSpec(
        "agent-url",
        "CODER_AGENT_URL",
        "",
        URL,
        "Address of the Coder deployment the agent reports to (http or https).",
    ),
    OptionSpec(
        "agent-token",
        "CODER_AGENT_TOKEN",
        "",
        TEXT,
        "Token the agent authenticates with when --auth is token.",
        secret=True,
    ),
    OptionSpec(
        "agent-token-file",
        "CODER_AGENT_TOKEN_FILE",
        "",
        TEXT,
        "File to read the agent token from when no token is given directly.",
    ),
    OptionSpec(
        "agent-header",
        "CODER_AGENT_HEADER",
        "",
        HEADERS,
        "Extra HTTP header sent with every request to coderd, as key=value; repeat the "
        "flag or separate items with commas to send several.",
    ),
    OptionSpec(
        "agent-header-command",
        "CODER_AGENT_HEADER_COMMAND",
        "",
        TEXT,
        "Command whose output, one key=value per line, adds HTTP headers to every "
        "request to coderd.",
    ),
    OptionSpec(
        "log-dir",
        "CODER_AGENT_LOG_DIR",
        _TMP,
        PATH,
        "Directory for the agent's own log files.",
    ),
    OptionSpec(
        "script-data-dir",
        "CODER_AGENT_SCRIPT_DATA_DIR",
        _TMP,
        PATH,
        "Directory where scripts keep their data; the SSH host keys live under it "
        "unless --ssh-host-key-dir says otherwise.",
    ),
    OptionSpec(
        "log-human",
        "CODER_AGENT_LOGGING_HUMAN",
        "/dev/stderr",
        TEXT,
        "File to write human-readable logs to; empty for none.",
    ),
    OptionSpec(
        "log-json",
        "CODER_AGENT_LOGGING_JSON",
        "",
        TEXT,
        "File to write JSON logs to; empty for none.",
    ),
    OptionSpec(
        "log-stackdriver",
        "CODER_AGENT_LOGGING_STACKDRIVER",
        "",
        TEXT,
        "File to write Stackdriver-formatted logs to; empty for none.",
    ),
    OptionSpec(
        "block-file-transfer",
        "CODER_AGENT_BLOCK_FILE_TRANSFER",
        "false",
        BOOL,
        "Refuse file transfers made with well-known tools: "
        + ", ".join(sorted(BLOCKED_FILE_TRANSFER_COMMANDS))
        + ".",
    ),
    OptionSpec(
        "block-local-port-forwarding",
        "CODER_AGENT_BLOCK_LOCAL_PORT_FORWARDING",
        "false",
        BOOL,
        "Refuse local port forwarding (ssh -L), so clients cannot reach other hosts "
        "through the workspace.",
    ),
    OptionSpec(
        "block-reverse-port-forwarding",
        "CODER_AGENT_BLOCK_REVERSE_PORT_FORWARDING",
        "false",
        BOOL,
        "Refuse reverse port forwarding (ssh -R), so clients cannot make the workspace "
        "listen for them.",
    ),
    OptionSpec(
        "ssh-max-timeout",
        "CODER_AGENT_SSH_MAX_TIMEOUT",
        "72h",
        DURATION,
        "Longest an unresponsive SSH connection is kept; best between 60s and 72h, 0 for no limit.",
    ),
    OptionSpec(
        "pprof-address",
        "CODER_AGENT_PPROF_ADDRESS",
        "127.0.0.1:6060",
        ADDRESS,
        "host:port to serve profiling data on; empty to turn it off.",
    ),
    OptionSpec(
        "prometheus-address",
        "CODER_AGENT_PROMETHEUS_ADDRESS",
        "127.0.0.1:2112",
        ADDRESS,
        "host:port to serve Prometheus metrics on; empty to turn it off.",
    ),
    OptionSpec(
        "debug-address",
        "CODER_AGENT_DEBUG_ADDRESS",
        "127.0.0.1:2113",
        ADDRESS,
        "host:port of the debugging HTTP server; empty to turn it off.",
    ),
    OptionSpec(
        "no-reap",
        "CODER_AGENT_NO_REAP",
        "false",
        BOOL,
        "Do not reap orphaned child processes, even when running as PID 1.",
    ),
    OptionSpec(
        "socket-server-enabled",
        "CODER_AGENT_SOCKET_SERVER_ENABLED",
        "false",
        BOOL,
        "Serve the agent's local control socket.",
    ),
    OptionSpec(
        "socket-path",
        "CODER_AGENT_SOCKET_PATH",
        DEFAULT_SOCKET_PATH,
        TEXT,
        "Path of the agent's local control socket (ask it with: coder-agent status).",
    ),
    OptionSpec(
        "boundary-log-proxy-socket-path",
        "CODER_AGENT_BOUNDARY_LOG_PROXY_SOCKET_PATH",
        os.path.join(_TMP, "boundary-audit.sock"),
        TEXT,
        "Unix socket on which Boundary delivers its audit logs to the agent.",
    ),
    OptionSpec(
        "tailnet-listen-port",
        "CODER_AGENT_TAILNET_LISTEN_PORT",
        "0",
        PORT,
        "Fixed port for the tailnet to listen on (0 picks one). " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-enable",
        "CODER_AGENT_DEVCONTAINERS_ENABLE",
        "true",
        BOOL,
        "Notice dev containers running in the workspace. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-project-discovery-enable",
        "CODER_AGENT_DEVCONTAINERS_PROJECT_DISCOVERY_ENABLE",
        "true",
        BOOL,
        "Search the filesystem for dev container projects. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "devcontainers-discovery-autostart-enable",
        "CODER_AGENT_DEVCONTAINERS_DISCOVERY_AUTOSTART_ENABLE",
        "false",
        BOOL,
        "Start discovered dev container projects whose configuration asks for it. " + _IGNORED,
        ignored=True,
    ),
    OptionSpec(
        "ssh-endpoint",
        "CODER_AGENT_SSH_ENDPOINT",
        "tcp:2222:interface=127.0.0.1",
        ENDPOINT,
        "Where the SSH server listens, as a Twisted endpoint description "
        "(tcp:PORT:interface=ADDRESS, unix:PATH, ...).",
    ),
    OptionSpec(
        "ssh-authorized-keys",
        "CODER_AGENT_SSH_AUTHORIZED_KEYS",
        os.path.expanduser("~/.ssh/authorized_keys"),
        PATH,
        "authorized_keys file listing the public keys that may log in over SSH.",
    ),
    OptionSpec(
        "ssh-host-key-dir",
        "CODER_AGENT_SSH_HOST_KEY_DIR",
        "",
        OPTIONAL_PATH,
        "Directory of the SSH host keys, generated there on first start.",
        helpDefault=f"<script-data-dir>/{HOST_KEY_SUBDIR}",
    ),
    OptionSpec(
        "boundary-log-spool-dir",
        "CODER_AGENT_BOUNDARY_LOG_SPOOL_DIR",
        "",
        OPTIONAL_PATH,
        "Directory where boundary audit logs wait until coderd has them (created 0700).",
        helpDefault=f"<script-data-dir>/{SPOOL_SUBDIR}",
    ),
    OptionSpec(
        "boundary-log-spool-max-bytes",
        "CODER_AGENT_BOUNDARY_LOG_SPOOL_MAX_BYTES",
        "256MiB",
        SIZE,
        "Most boundary audit logs kept waiting for coderd; beyond it the oldest are dropped "
        "and counted.",
    ),
    OptionSpec(
        "boundary-log-commit-interval",
        "CODER_AGENT_BOUNDARY_LOG_COMMIT_INTERVAL",
        "50ms",
        POSITIVE_DURATION,
        "Longest a received boundary audit log waits before it is written to the spool; "
        "what was received earlier survives a crash.",
    ),
    OptionSpec(
        "forwarding-policy-file",
        "CODER_AGENT_FORWARDING_POLICY_FILE",
        "",
        OPTIONAL_PATH,
        "A TOML file of forwarding and file-transfer rules (see the README); reloaded on "
        "SIGHUP or when it changes. The --block-* flags still apply on top of it.",
    ),
    OptionSpec(
        "ssh-login-grace-time",
        "CODER_AGENT_SSH_LOGIN_GRACE_TIME",
        "2m",
        POSITIVE_DURATION,
        "Close SSH connections that have not authenticated within this time.",
    ),
    OptionSpec(
        "ssh-max-auth-tries",
        "CODER_AGENT_SSH_MAX_AUTH_TRIES",
        "6",
        COUNT,
        "Failed authentication attempts allowed per SSH connection before it is closed.",
    ),
    OptionSpec(
        "ssh-max-sessions",
        "CODER_AGENT_SSH_MAX_SESSIONS",
        "10",
        COUNT,
        "Open sessions (shell, exec, sftp) allowed per SSH connection, as sshd's MaxSessions.",
    ),
    OptionSpec(
        "ssh-max-channels",
        "CODER_AGENT_SSH_MAX_CHANNELS",
        "1024",
        COUNT,
        "Open channels (sessions and forwarded connections) allowed per SSH connection.",
    ),
    OptionSpec(
        "ssh-max-reverse-forwards",
        "CODER_AGENT_SSH_MAX_REVERSE_FORWARDS",
        "256",
        COUNT,
        "Reverse forwarding listeners (TCP and Unix socket) allowed per SSH connection.",
    ),
    OptionSpec(
        "ssh-max-env-bytes",
        "CODER_AGENT_SSH_MAX_ENV_BYTES",
        "256KiB",
        SIZE,
        "Total size of the env requests (names and values) one SSH session accepts.",
    ),
)

SPECS: Mapping[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}

#: Flags accepted so that upstream templates keep working, but acted on by
#: nothing here; the service names those in use once at start-up.
IGNORED_OPTIONS: tuple[str, ...] = tuple(spec.name for spec in OPTIONS if spec.ignored)

