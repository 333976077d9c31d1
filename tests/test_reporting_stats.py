# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""UpdateStats: the interval, the counts, the traffic carried over a failure, the metrics.

The reporter talks to coderd-dev's real API through the real client, joined
in memory on a ``task.Clock`` (``tests.localcoderd.InMemoryCoderd``), so
every report and its timing is exact.  The SSH side is what the reporter
reads from it: a real ``TrafficLedger`` over objects carrying a transport's
counters, and a real ``SSHActivity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.testing import StringTransport

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2
from coderagent.reporting.activity import SSHActivity, connectionsByProto
from coderagent.reporting.stats import (
    DEFAULT_INTERVAL,
    RETRY_INTERVAL,
    StatsReporter,
    StatsSources,
    collectMetrics,
)
from coderagent.ssh.traffic import Traffic, TrafficLedger
from tests.localcoderd import InMemoryCoderd

Metric = agent_pb2.Stats.Metric


@dataclass(eq=False)
class Connection:
    """The counters the ledger reads on an SSH transport."""

    rxBytes: int = 0
    txBytes: int = 0
    incomingPacketSequence: int = 0
    outgoingPacketSequence: int = 0


class Setup:
    def __init__(self, interval: float = 5.0) -> None:
        self.coderd = InMemoryCoderd(reportInterval=interval)
        self.ledger = TrafficLedger()
        self.activity = SSHActivity()
        self.connections: dict[str, int] = {}
        self.metrics = AgentMetrics()
        self.reporter = StatsReporter(
            self.coderd.client,
            StatsSources(
                traffic=self.ledger.totals,
                connections=lambda: self.connections,
                sessions=self.activity.sessionCounts,
                registry=self.metrics.registry,
            ),
            clock=self.coderd.clock,
        )
        self.reporter.setServiceParent(self.coderd.client)

    def start(self) -> None:
        self.coderd.client.startService()
        self.coderd.settle()

    def connection(self) -> Connection:
        c = Connection()
        self.ledger.connectionStarted(c, object())
        return c

    @property
    def stats(self) -> list[agent_pb2.Stats]:
        return list(self.coderd.api.stats)


def test_a_blank_report_learns_the_interval_then_one_report_per_interval() -> None:
    s = Setup(interval=5.0)
    s.start()
    assert s.stats == [] and s.reporter.interval == 5.0  # the blank report is not kept
    s.coderd.advance(4.9)
    assert s.stats == []
    s.coderd.advance(0.1)
    assert len(s.stats) == 1
    s.coderd.advance(5.0)
    assert len(s.stats) == 2
    assert s.reporter.lastReportAge() == 0.0
    s.coderd.advance(1.5)
    assert s.reporter.lastReportAge() == 1.5


def test_counts_are_current_and_traffic_is_per_period() -> None:
    s = Setup(interval=1.0)
    s.start()
    c = s.connection()
    s.connections = {"TCP": 2}
    ended = s.activity.sessionStarted("ssh", None)
    s.activity.sessionStarted("vscode", None)
    s.activity.sessionStarted("something-else", None)  # logged, not counted (upstream)
    c.rxBytes, c.txBytes, c.incomingPacketSequence, c.outgoingPacketSequence = 1000, 2000, 10, 20
    s.coderd.advance(1.0)
    c.rxBytes, c.txBytes, c.incomingPacketSequence, c.outgoingPacketSequence = 1500, 2100, 12, 25
    ended(0, "graceful")
    s.connections = {}
    s.coderd.advance(1.0)
    first, second = s.stats
    assert (first.connection_count, dict(first.connections_by_proto)) == (2, {"TCP": 2})
    assert (first.rx_bytes, first.tx_bytes, first.rx_packets, first.tx_packets) == (
        1000,
        2000,
        10,
        20,
    )
    assert (first.session_count_ssh, first.session_count_vscode) == (1, 1)
    assert dict(first.session_counts) == {"ssh": 1, "vscode": 1, "jetbrains": 0}
    assert first.connection_median_latency_ms == -1
    assert (second.rx_bytes, second.tx_bytes, second.rx_packets, second.tx_packets) == (
        500,
        100,
        2,
        5,
    )
    assert (second.connection_count, second.session_count_ssh) == (0, 0)
    assert dict(second.session_counts) == {"ssh": 0, "vscode": 1, "jetbrains": 0}


def test_an_ended_connection_still_counts_in_the_period_it_ended() -> None:
    s = Setup(interval=1.0)
    s.start()
    c = s.connection()
    c.rxBytes, c.incomingPacketSequence = 300, 3
    s.ledger.connectionEnded(c)
    s.coderd.advance(1.0)
    assert (s.stats[0].rx_bytes, s.stats[0].rx_packets) == (300, 3)


def test_a_restart_of_the_sequence_numbers_keeps_what_was_counted() -> None:
    ledger = TrafficLedger()
    c = Connection(incomingPacketSequence=7, outgoingPacketSequence=9)
    ledger.connectionStarted(c, object())
    assert ledger.totals() == Traffic(0, 0, 7, 9)
    c.incomingPacketSequence, c.outgoingPacketSequence = 2, 1  # a strict key exchange
    assert ledger.totals() == Traffic(0, 0, 9, 10)
    ledger.connectionEnded(c)
    assert ledger.totals() == Traffic(0, 0, 9, 10)


def test_a_failed_report_carries_its_traffic_into_the_next() -> None:
    s = Setup(interval=1.0)
    path = RPCS["UpdateStats"].path
    accept = s.coderd.api.handlers[path]
    refusing = [1]

    def sometimesRefused(data: bytes) -> bytes:
        if agent_pb2.UpdateStatsRequest.FromString(data).HasField("stats") and refusing[0]:
            refusing[0] -= 1
            raise DRPCError(0, "database is down")
        return accept(data)

    s.coderd.api.handlers[path] = sometimesRefused
    s.start()
    c = s.connection()
    c.rxBytes = 100
    s.coderd.advance(1.0)  # refused
    assert s.stats == [] and s.reporter.lastReported is None
    c.rxBytes = 150
    s.coderd.advance(1.0)
    assert [st.rx_bytes for st in s.stats] == [150]
    c.rxBytes = 160
    s.coderd.advance(1.0)
    assert [st.rx_bytes for st in s.stats] == [150, 10]


def test_traffic_while_coderd_is_away_goes_with_the_first_report_after() -> None:
    s = Setup(interval=1.0)
    s.start()
    c = s.connection()
    c.txBytes = 10
    s.coderd.advance(1.0)
    s.coderd.disconnect()
    c.txBytes = 40
    s.coderd.advance(1.0)  # not connected: nothing is sent
    assert [st.tx_bytes for st in s.stats] == [10]
    for _ in range(20):  # the client reconnects with its backoff; a blank report, then one
        s.coderd.advance(0.5)
    assert [st.tx_bytes for st in s.stats][:2] == [10, 30]


def test_an_interval_coderd_cannot_answer_is_asked_again() -> None:
    s = Setup(interval=2.0)
    path = RPCS["UpdateStats"].path
    accept = s.coderd.api.handlers[path]
    calls = []

    def refusedOnce(data: bytes) -> bytes:
        calls.append(data)
        if len(calls) == 1:
            raise DRPCError(0, "not now")
        return accept(data)

    s.coderd.api.handlers[path] = refusedOnce
    s.start()
    assert s.reporter.interval == DEFAULT_INTERVAL
    s.coderd.advance(RETRY_INTERVAL)
    assert s.reporter.interval == 2.0 and len(calls) == 2
    s.coderd.advance(2.0)
    assert len(s.stats) == 1


def test_stopping_stops_the_reports() -> None:
    s = Setup(interval=1.0)
    s.start()
    s.coderd.advance(1.0)
    s.reporter.stopService()
    s.coderd.advance(5.0)
    assert len(s.stats) == 1


def test_every_counter_and_gauge_reaches_coderd_as_upstream_names_them() -> None:
    metrics = AgentMetrics()
    metrics.boundaryDropped("spool_full", batches=2, logs=17)
    metrics.forwardingRefused("reverse", "tcp")
    collected = collectMetrics(metrics.registry)
    byKey = {(m.name, tuple((lab.name, lab.value) for lab in m.labels)): m for m in collected}
    logs = byKey["agent_boundary_log_proxy_logs_dropped_total", (("reason", "spool_full"),)]
    assert (logs.type, logs.value) == (Metric.COUNTER, 17.0)
    refused = byKey[
        "agent_ssh_forwarding_refused_total", (("direction", "reverse"), ("transport", "tcp"))
    ]
    assert refused.value == 1.0
    assert byKey["agent_ssh_server_failed_connections_total", ()].value == 0.0
    spooled = byKey["agent_boundary_log_proxy_spooled_logs", ()]
    assert spooled.type == Metric.GAUGE
    assert all(not m.name.endswith("_created") for m in collected)
    names = [m.name for m in collected]
    assert names == sorted(names)
    assert "process_cpu_seconds_total" in names and "process_open_fds" in names


def test_the_reports_carry_the_registry() -> None:
    s = Setup(interval=1.0)
    s.metrics.boundaryDropped("forward_failed", batches=1, logs=3)
    s.start()
    s.coderd.advance(1.0)
    [stats] = s.stats
    dropped = [
        m
        for m in stats.metrics
        if m.name == "agent_boundary_log_proxy_logs_dropped_total"
        and [(lab.name, lab.value) for lab in m.labels] == [("reason", "forward_failed")]
    ]
    assert [m.value for m in dropped] == [3.0]


def test_connections_are_the_authenticated_ones_by_protocol() -> None:
    class T:
        def __init__(self, peer: Any, authenticated: bool) -> None:
            self.transport = StringTransport(peerAddress=peer)
            self.authenticated = authenticated

    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    transports = [
        T(IPv4Address("TCP", "127.0.0.1", 1), True),
        T(IPv6Address("TCP", "::1", 2), True),
        T(IPv4Address("TCP", "127.0.0.1", 3), False),
        T(UNIXAddress(None), True),
    ]
    assert connectionsByProto(transports) == {"TCP": 2, "UNIX": 1}
