"""``--prometheus-address``: the agent's metrics over HTTP, rendered in the reactor thread.

``prometheus_client``'s own Twisted resource runs the collectors in a thread
pool, where reading the agent's live state (spool backlog, counters kept by
Twisted objects) would race the reactor; this resource renders in the reactor
thread instead, which for a registry of this size costs well under a
millisecond.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderagent.netaddr import splitHostPort
from coderagent.observe.metrics import AgentMetrics


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: AgentMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)


def metricsSite(metrics: AgentMetrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


def strportsFor(address: str) -> str:
    """A Go ``host:port`` as a Twisted endpoint description (all interfaces for an empty host)."""
    host, port = splitHostPort(address)
    if ":" in host:
        literal = host.replace(":", "\\:")
        return f"tcp6:{port}:interface={literal}"
    if not host:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={host}"
