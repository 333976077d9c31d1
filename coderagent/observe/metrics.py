"""The agent's Prometheus metrics, on a registry of its own.

A private :class:`~prometheus_client.CollectorRegistry` (not the process-wide
default) keeps tests and several agents in one process independent, and lets
whoever serves ``--prometheus-address`` expose exactly the agent's metrics.

``prometheus_client.twisted`` is deliberately not imported here: it imports
the reactor, which must stay twistd's choice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

#: Label values of ``agent_ssh_forwarding_refused_total``.
FORWARD_DIRECTIONS = ("local", "reverse")
FORWARD_TRANSPORTS = ("tcp", "unix")


class AgentMetrics:
    """Every metric the agent exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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

    def forwardingRefused(self, direction: str, transport: str) -> None:
        """Count one forward refused by policy (``local|reverse``, ``tcp|unix``)."""
        self.forwardingRefusedTotal.labels(direction, transport).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (for tests and diagnostics), or ``None``."""
        value = self.registry.get_sample_value(name, labels)
        return None if value is None else float(value)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
