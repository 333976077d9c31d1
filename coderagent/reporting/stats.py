"""``UpdateStats``: the report that tells coderd a workspace is in use.

coderd bumps a workspace's activity (its autostop deadline and
``last_used_at``) only when a stats report has a session (or, on older
coderds, a connection) in it; without these reports a user working over SSH
sees the workspace stop under them.  As upstream, a first blank report on
each connection learns ``report_interval``, then one report per interval
carries:

* ``connection_count`` and ``connections_by_proto``: the authenticated SSH
  connections now;
* ``session_count_*`` (deprecated, what coderd reads today) and
  ``session_counts`` (API 2.11): the live sessions by kind;
* rx/tx bytes and packets of the SSH streams since the last report coderd
  accepted (a failed report's period is carried into the next: the baseline
  only moves when coderd answers);
* ``connection_median_latency_ms`` -1: there is no tailnet to ping;
* ``metrics``: every counter and gauge of the agent's Prometheus registry,
  converted as upstream's ``collectMetrics`` does (so the boundary proxy's
  drop counters reach coderd).

A report that fails is logged and retried at the next interval; no report is
queued.  Unlike upstream, a failed report does not drop the connection that
the other reporters share: if the connection really broke, the client
reconnects on its own and the next connection starts over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient
from coderagent.deferreds import cancelCall
from coderagent.pb import agent_pb2
from coderagent.ssh.traffic import Traffic

log = Logger()

Metric = agent_pb2.Stats.Metric

#: Until coderd says otherwise (its default ``--agent-stats-refresh-interval``).
DEFAULT_INTERVAL = 30.0
#: The shortest interval honoured, whatever coderd answers.
MIN_INTERVAL = 1.0
#: When the blank report that learns the interval failed, try again after this.
RETRY_INTERVAL = 10.0
#: Bound on one call.
CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class StatsSources:
    """Where a report's numbers come from (read at each report)."""

    #: Totals of the SSH streams so far (:class:`~coderagent.ssh.traffic.TrafficLedger`).
    traffic: Callable[[], Traffic]
    #: Authenticated SSH connections now, by protocol.
    connections: Callable[[], Mapping[str, int]]
    #: Live sessions by kind (``ssh``, ``vscode``, ``jetbrains``).
    sessions: Callable[[], Mapping[str, int]]
    #: The agent's Prometheus registry, or None.
    registry: Any = None


def collectMetrics(registry: Any) -> list[Metric]:
    """Every counter and gauge of ``registry``, as upstream's ``collectMetrics`` sends them.

    Names are the exposition's (a counter's with ``_total``, as Go's
    client names it), labels sorted by name, families in name order as
    Go's ``Gather`` returns them.  Histograms, summaries and info metrics
    are left out, as upstream leaves out what is neither.
    """
    if registry is None:
        return []
    collected: list[Metric] = []
    for family in sorted(registry.collect(), key=lambda f: str(f.name)):
        if family.type == "counter":
            name, kind = f"{family.name}_total", Metric.COUNTER
        elif family.type == "gauge":
            name, kind = family.name, Metric.GAUGE
        else:
            continue
        for sample in family.samples:
            if sample.name != name:
                continue  # a counter's _created
            labels = [Metric.Label(name=k, value=v) for k, v in sorted(sample.labels.items())]
            collected.append(Metric(name=name, type=kind, value=sample.value, labels=labels))
    return collected


def buildStats(
    period: Traffic,
    connections: Mapping[str, int],
    sessions: Mapping[str, int],
    metrics: list[Metric],
) -> agent_pb2.Stats:
    """One report: ``period`` is the traffic since the last accepted report."""
    stats = agent_pb2.Stats(
        connections_by_proto=connections,
        connection_count=sum(connections.values()),
        connection_median_latency_ms=-1,
        rx_bytes=period.rxBytes,
        tx_bytes=period.txBytes,
        rx_packets=period.rxPackets,
        tx_packets=period.txPackets,
        session_counts={kind: n for kind, n in sessions.items()},
        metrics=metrics,
    )
    stats.session_count_ssh = sessions.get("ssh", 0)
    stats.session_count_vscode = sessions.get("vscode", 0)
    stats.session_count_jetbrains = sessions.get("jetbrains", 0)
    return stats


class StatsReporter(Service):
    """One ``UpdateStats`` per interval, on whichever connection to coderd is current."""

    def __init__(self, client: CoderdClient, sources: StatsSources, *, clock: Any) -> None:
        self.client = client
        self.sources = sources
        self.clock = clock
        self.interval = DEFAULT_INTERVAL
        #: When coderd last accepted a report (clock seconds), or None.
        self.lastReported: float | None = None
        self.reports = 0
        self._baseline = Traffic()
        self._connection = 0
        self._next: IDelayedCall | None = None
        self._inFlight = False
        self._failing = False

    def status(self) -> dict[str, Any]:
        return {
            "interval_seconds": self.interval,
            "reports": self.reports,
            "last_report_seconds_ago": self.lastReportAge(),
            "failing": self._failing,
        }

    def lastReportAge(self) -> float | None:
        """Seconds since coderd last accepted a report (None: never)."""
        if self.lastReported is None:
            return None
        now: float = self.clock.seconds()
        return round(now - self.lastReported, 3)

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._baseline = self.sources.traffic()
        self.client.onConnect(self._connected)

    def stopService(self) -> None:
        # As upstream: stats stop as soon as the agent shuts down.
        super().stopService()
        self._connection += 1
        cancelCall(self._next)
        self._next = None

    # -- one connection ------------------------------------------------------------

    def _connected(self, client: CoderdClient) -> None:
        self._connection += 1
        cancelCall(self._next)
        self._next = None
        self._learnInterval(self._connection)

    def _current(self, connection: int) -> bool:
        return bool(self.running) and connection == self._connection and self.client.connected

    def _schedule(self, delay: float, f: Callable[[int], None], connection: int) -> None:
        cancelCall(self._next)
        self._next = self.clock.callLater(delay, f, connection)

    def _learnInterval(self, connection: int) -> None:
        # An empty request: coderd only answers the interval.
        d = self._call(agent_pb2.UpdateStatsRequest())

        def learned(response: agent_pb2.UpdateStatsResponse) -> None:
            if self._current(connection):
                self._setInterval(response)
                self._schedule(self.interval, self._report, connection)

        def failed(reason: Failure) -> None:
            log.warn(
                "cannot learn the stats report interval from coderd: {error}; "
                "trying again in {delay:g}s",
                error=reason.getErrorMessage(),
                delay=RETRY_INTERVAL,
            )
            if self._current(connection):
                self._schedule(RETRY_INTERVAL, self._learnInterval, connection)

        d.addCallbacks(learned, failed)

    def _report(self, connection: int) -> None:
        self._next = None
        if not self._current(connection):
            return  # the next connection starts over
        if self._inFlight:  # a report from before a reconnect is still on its way
            self._schedule(self.interval, self._report, connection)
            return
        totals = self.sources.traffic()
        stats = buildStats(
            totals - self._baseline,
            self.sources.connections(),
            self.sources.sessions(),
            collectMetrics(self.sources.registry),
        )
        self._inFlight = True
        d = self._call(agent_pb2.UpdateStatsRequest(stats=stats))

        def accepted(response: agent_pb2.UpdateStatsResponse) -> None:
            self._baseline = totals
            self.lastReported = self.clock.seconds()
            self.reports += 1
            if self._failing:
                self._failing = False
                log.info("stats reported to coderd again")
            self._setInterval(response)

        def failed(reason: Failure) -> None:
            # The baseline stays: this period's traffic goes with the next report.
            if not self._failing:
                self._failing = True
                log.warn(
                    "stats report to coderd failed: {error}; its traffic goes with the next",
                    error=reason.getErrorMessage(),
                )

        def settled(_: object) -> None:
            self._inFlight = False
            if self._current(connection):
                self._schedule(self.interval, self._report, connection)

        d.addCallbacks(accepted, failed).addBoth(settled)

    def _call(self, request: Message) -> Any:
        return self.client.call("UpdateStats", request, timeout=CALL_TIMEOUT)

    def _setInterval(self, response: agent_pb2.UpdateStatsResponse) -> None:
        seconds = response.report_interval.ToNanoseconds() / 1e9
        interval = max(MIN_INTERVAL, seconds) if seconds > 0 else DEFAULT_INTERVAL
        if interval != self.interval:
            log.info("stats report interval: {interval:g}s", interval=interval)
            self.interval = interval
