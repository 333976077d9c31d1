"""The agent's Prometheus metrics, on a registry of its own.

A private :class:`~prometheus_client.CollectorRegistry` (not the process-wide
default) keeps tests and several agents in one process independent, and lets
whoever serves ``--prometheus-address`` expose exactly the agent's metrics.

``prometheus_client.twisted`` is deliberately not imported here: it imports
the reactor, which must stay twistd's choice.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)

#: Label values of ``agent_ssh_forwarding_refused_total``.
FORWARD_DIRECTIONS = ("local", "reverse")
FORWARD_TRANSPORTS = ("tcp", "unix")

#: ``limit`` values of ``agent_ssh_limit_refused_total`` (ours): see coderagent.ssh.limits.
SSH_LIMITS = ("sessions", "channels", "reverse_forwards", "env_bytes", "descriptors")

#: ``magic_type`` values of the session metrics (upstream's).
SESSION_TYPES = ("ssh", "vscode", "jetbrains", "unknown")

#: ``reason`` values of the boundary drop counters: upstream's (``buffer_full``: the
#: agent's own buffer, here the memory the spool holds while the disk cannot take it;
#: ``forward_failed``), then ours.
BOUNDARY_BATCH_DROP_REASONS = (
    "buffer_full",
    "forward_failed",
    "spool_full",
    "spool_unreadable",
)
BOUNDARY_LOG_DROP_REASONS = (
    *BOUNDARY_BATCH_DROP_REASONS,
    "boundary_channel_full",
    "boundary_batch_full",
)
#: ``reason`` values of ``agent_scripts_log_lines_dropped_total`` (ours).
SCRIPT_LOG_DROP_REASONS = ("queue_full", "too_long", "limit_exceeded", "rejected")
#: ``reason`` values of ``agent_boundary_log_proxy_frames_rejected_total`` (ours).
BOUNDARY_FRAME_REJECT_REASONS = ("unsupported_tag", "too_large", "undecodable", "stalled")


class AgentMetrics:
    """Every metric the agent exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The process's CPU, memory and file descriptors, as Go's collector gives.
        ProcessCollector(registry=self.registry)
        self.forwardingRefusedTotal = Counter(
            "agent_ssh_forwarding_refused",
            "Port and Unix-socket forwards refused by policy.",
            ["direction", "transport"],
            registry=self.registry,
        )
        # Export zeroes from the start, so a rate() sees the first refusal.
        for direction in FORWARD_DIRECTIONS:
            for transport in FORWARD_TRANSPORTS:
                self.forwardingRefusedTotal.labels(direction, transport)
        self.forwardingRefusedByRule = Counter(
            "agent_ssh_forwarding_refused_by_rule",
            "The same refusals, by what decided: a --block-* flag, a policy-file rule or "
            "default, the key's options.",
            ["direction", "transport", "rule"],
            registry=self.registry,
        )
        self.forwardingWouldRefuse = Counter(
            "agent_ssh_forwarding_would_refuse",
            "Forwards a policy file in audit mode let through but would refuse, by rule.",
            ["direction", "transport", "rule"],
            registry=self.registry,
        )
        self.policyReloadErrors = Counter(
            "agent_policy_reload_errors",
            "Reloads of --forwarding-policy-file refused because the file was invalid.",
            registry=self.registry,
        )
        self.policyInfo = Gauge(
            "agent_policy_info",
            "The forwarding policy in force: its file's sha256 and mode (the value is 1).",
            ["sha256", "mode"],
            registry=self.registry,
        )
        self.policyLoaded = Gauge(
            "agent_policy_loaded_timestamp_seconds",
            "When the forwarding policy in force was loaded (Unix time).",
            registry=self.registry,
        )

        self.limitRefusedTotal = Counter(
            "agent_ssh_limit_refused",
            "SSH channel opens and requests refused at a per-connection limit or to keep "
            "the descriptor reserve, by limit.",
            ["limit"],
            registry=self.registry,
        )
        for limit in SSH_LIMITS:
            self.limitRefusedTotal.labels(limit)

        self.sshFailedConnections = Counter(
            "agent_ssh_server_failed_connections",
            "SSH connections that ended before authenticating (handshake or auth failed).",
            registry=self.registry,
        )
        self.sftpConnections = Counter(
            "agent_ssh_server_sftp_connections",
            "SFTP sessions started.",
            registry=self.registry,
        )
        self.sftpErrors = Counter(
            "agent_ssh_server_sftp_server_errors",
            "SFTP sessions that ended with an error.",
            registry=self.registry,
        )
        self.sessions = Counter(
            "agent_sessions",
            "SSH sessions started, by session type and whether they have a terminal.",
            ["magic_type", "pty"],
            registry=self.registry,
        )
        self.sessionErrors = Counter(
            "agent_sessions_errors",
            "SSH sessions that failed, by session type, terminal and what failed.",
            ["magic_type", "pty", "error_type"],
            registry=self.registry,
        )
        self.fileTransfersBlocked = Counter(
            "agent_ssh_file_transfers_blocked",
            "File transfers refused by --block-file-transfer, by kind (exec or sftp).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("exec", "sftp"):
            self.fileTransfersBlocked.labels(kind)
        self.boundaryBatchesForwarded = Counter(
            "agent_boundary_log_proxy_batches_forwarded",
            "Boundary log batches delivered to coderd.",
            registry=self.registry,
        )
        self.boundaryBatchesDropped = Counter(
            "agent_boundary_log_proxy_batches_dropped",
            "Boundary log batches dropped, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.boundaryLogsDropped = Counter(
            "agent_boundary_log_proxy_logs_dropped",
            "Boundary logs dropped (here or, as boundary reports, by boundary), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.boundaryFramesRejected = Counter(
            "agent_boundary_log_proxy_frames_rejected",
            "Frames on the boundary socket that were not audit logs, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in BOUNDARY_BATCH_DROP_REASONS:
            self.boundaryBatchesDropped.labels(reason)
        for reason in BOUNDARY_LOG_DROP_REASONS:
            self.boundaryLogsDropped.labels(reason)
        for reason in BOUNDARY_FRAME_REJECT_REASONS:
            self.boundaryFramesRejected.labels(reason)
        self.scriptsExecuted = Counter(
            "agent_scripts_executed",
            "Runs of the workspace's scripts (start, stop and cron), by whether they succeeded.",
            ["success"],
            registry=self.registry,
        )
        self.startupScriptSeconds = Gauge(
            "agent_startup_script_seconds",
            "How long the start scripts took, by whether they all succeeded.",
            ["success"],
            registry=self.registry,
        )
        self.scriptLogLinesDropped = Counter(
            "agent_scripts_log_lines_dropped",
            "Lines of script output not sent to coderd, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in SCRIPT_LOG_DROP_REASONS:
            self.scriptLogLinesDropped.labels(reason)
        self._spooled = {
            name: Gauge(
                f"agent_boundary_log_proxy_spooled_{name}",
                f"Boundary log {name} waiting for coderd (in the spool).",
                registry=self.registry,
            )
            for name in ("batches", "logs", "bytes")
        }

    def sessionStarted(self, sessionType: str, pty: bool) -> None:
        self.sessions.labels(_sessionType(sessionType), "yes" if pty else "no").inc()

    def sessionFailed(self, sessionType: str, pty: bool, errorType: str) -> None:
        self.sessionErrors.labels(
            _sessionType(sessionType), "yes" if pty else "no", errorType
        ).inc()

    def boundaryDropped(self, reason: str, batches: int, logs: int) -> None:
        """Count batches (and their logs) the boundary proxy had to drop."""
        if batches:
            self.boundaryBatchesDropped.labels(reason).inc(batches)
        if logs:
            self.boundaryLogsDropped.labels(reason).inc(logs)

    def scriptLogLinesDroppedBy(self, reason: str, lines: int) -> None:
        """Count lines of script output coderd will not get."""
        self.scriptLogLinesDropped.labels(reason).inc(lines)

    def watchSpool(
        self, batches: Callable[[], int], logs: Callable[[], int], size: Callable[[], int]
    ) -> None:
        """Read the spool's backlog whenever the metrics are collected."""
        self._spooled["batches"].set_function(batches)
        self._spooled["logs"].set_function(logs)
        self._spooled["bytes"].set_function(size)

    def forwardingRefused(self, direction: str, transport: str, rule: str = "") -> None:
        """Count one forward refused by policy (``local|reverse``, ``tcp|unix``), and by
        ``rule`` when it is known."""
        self.forwardingRefusedTotal.labels(direction, transport).inc()
        if rule:
            self.forwardingRefusedByRule.labels(direction, transport, rule).inc()

    def forwardingWouldBeRefused(self, direction: str, transport: str, rule: str) -> None:
        """Count one forward an audit-mode policy let through but would refuse."""
        self.forwardingWouldRefuse.labels(direction, transport, rule).inc()

    def policyLoadedNow(self, digest: str, mode: str, when: float) -> None:
        """The forwarding policy ``digest`` is in force since ``when``."""
        self.policyInfo.clear()
        self.policyInfo.labels(digest, mode).set(1)
        self.policyLoaded.set(when)

    def limitRefused(self, limit: str) -> None:
        """Count one refusal at ``limit`` (one of :data:`SSH_LIMITS`)."""
        self.limitRefusedTotal.labels(limit).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (for tests and diagnostics), or ``None``."""
        value = self.registry.get_sample_value(name, labels)
        return None if value is None else float(value)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _sessionType(name: str) -> str:
    return name if name in SESSION_TYPES else "unknown"
