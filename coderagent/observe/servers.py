"""The agent's HTTP servers: Prometheus metrics, debug, profiling, each on its own address.

Which of them run, where, and the rule that profiling data is only served on
loopback (a thread dump and a profile show what a user runs) live here, so
that ``tap`` only hands over the addresses and what the servers show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Site

from coderagent.listening import ListeningService
from coderagent.netaddr import isLoopbackHost, splitHostPort
from coderagent.observe.debug import debugSite, profilingSite
from coderagent.observe.http import metricsSite, strportsFor
from coderagent.observe.logs import RecentLines
from coderagent.observe.metrics import AgentMetrics
from coderagent.observe.status import AgentStatus

log = Logger()


def httpServers(
    *,
    reactor: Any,
    metricsAddress: str,
    debugAddress: str,
    pprofAddress: str,
    metrics: AgentMetrics,
    status: AgentStatus,
    manifest: Callable[[], Any],
    connections: Callable[[], Any],
    recent: RecentLines,
) -> list[ListeningService]:
    """A listening service for each address given (an empty address: that server is off)."""
    servers: list[tuple[str, str, Callable[[], Site]]] = [
        (metricsAddress, "Prometheus metrics", lambda: metricsSite(metrics)),
        (
            debugAddress,
            "debug server",
            lambda: debugSite(
                status=status, manifest=manifest, connections=connections, recent=recent
            ),
        ),
    ]
    if pprofAddress and not isLoopbackHost(splitHostPort(pprofAddress)[0]):
        log.error("not serving profiling data on {address}: loopback only", address=pprofAddress)
    else:
        servers.append((pprofAddress, "profiling server", lambda: profilingSite(reactor)))
    return [
        ListeningService(
            reactor=reactor,
            description=strportsFor(address),
            factory=site(),
            what=what,
            required=False,
        )
        for address, what, site in servers
        if address
    ]
