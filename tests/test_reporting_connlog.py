# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""ReportConnection: the order, the pairs, the bounds, reconnects and the drain when stopping.

The connection log talks to coderd-dev's real API through the real client,
joined in memory on a ``task.Clock`` (``tests.localcoderd.InMemoryCoderd``).
"""

from __future__ import annotations

import uuid

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.pb import agent_pb2
from coderagent.reporting.activity import SSHActivity
from coderagent.reporting.connlog import (
    MAX_EVENTS,
    MAX_REFUSALS,
    MAX_REJECTIONS,
    REFUSED_STATUS,
    SHUTDOWN_TIMEOUT,
    ConnectionLog,
)
from coderagent.ssh.events import forwardRefusal, sessionEnd
from tests.localcoderd import InMemoryCoderd

Connection = agent_pb2.Connection
PEER = IPv4Address("TCP", "192.0.2.7", 50022)


class Setup:
    def __init__(self) -> None:
        self.coderd = InMemoryCoderd()
        self.ids = (uuid.UUID(int=n) for n in range(1, 10_000))
        self.log = ConnectionLog(self.coderd.client, clock=self.coderd.clock, newID=self.next)
        self.log.setServiceParent(self.coderd.client)

    def next(self) -> uuid.UUID:
        return next(self.ids)

    def start(self) -> None:
        self.coderd.client.startService()
        self.coderd.settle()

    @property
    def received(self) -> list[tuple[int, str, int, str, int, str | None]]:
        return [
            (
                uuid.UUID(bytes=c.id).int,
                Connection.Action.Name(c.action),
                c.type,
                c.ip,
                c.status_code,
                c.reason if c.HasField("reason") else None,
            )
            for c in self.coderd.api.connections
        ]


def test_a_session_is_a_connect_then_a_disconnect_under_one_id() -> None:
    s = Setup()
    s.start()
    ended = s.log.sessionStarted("ssh", PEER)
    s.coderd.settle()
    ended(*sessionEnd(3))
    vscode = s.log.sessionStarted("vscode", IPv6Address("TCP", "::1", 2))
    vscode(*sessionEnd(("KILL", False)))
    s.coderd.settle()
    assert s.received == [
        (1, "CONNECT", Connection.SSH, "192.0.2.7", 0, None),
        (1, "DISCONNECT", Connection.SSH, "192.0.2.7", 3, "process exited with error status: 3"),
        (2, "CONNECT", Connection.VSCODE, "::1", 0, None),
        (2, "DISCONNECT", Connection.VSCODE, "::1", 255, "signal: killed"),
    ]
    first = s.coderd.api.connections[0]
    assert first.timestamp.ToNanoseconds() == 0  # the clock's time


def test_kinds_coderd_does_not_know_are_logged_as_ssh() -> None:
    s = Setup()
    s.start()
    s.log.sessionStarted("emacs", UNIXAddress(None))(*sessionEnd(0))
    s.log.sessionStarted("jetbrains", PEER)(*sessionEnd(None))
    s.coderd.settle()
    assert s.received == [
        (1, "CONNECT", Connection.SSH, "", 0, None),
        (1, "DISCONNECT", Connection.SSH, "", 0, "graceful"),
        (2, "CONNECT", Connection.JETBRAINS, "192.0.2.7", 0, None),
        (2, "DISCONNECT", Connection.JETBRAINS, "192.0.2.7", 1, "connection lost"),
    ]


def test_a_refusal_is_a_pair_of_its_own_naming_what_and_where() -> None:
    s = Setup()
    s.start()
    s.log.refused(PEER, forwardRefusal("reverse", "tcp", "0.0.0.0:8080"))
    s.coderd.settle()
    reason = "reverse port forwarding blocked: tcpip-forward 0.0.0.0:8080"
    assert s.received == [
        (1, "CONNECT", Connection.SSH, "192.0.2.7", 0, None),
        (1, "DISCONNECT", Connection.SSH, "192.0.2.7", REFUSED_STATUS, reason),
    ]


def test_events_wait_for_coderd_and_keep_their_order_across_reconnects() -> None:
    s = Setup()
    s.start()
    s.coderd.disconnect()
    ends = [s.log.sessionStarted("ssh", PEER) for _ in range(3)]
    for end in reversed(ends):
        end(0, "graceful")
    assert len(s.log.pending) == 6 and s.coderd.api.connections.maxlen
    for _ in range(30):  # the client reconnects with its backoff
        s.coderd.advance(0.5)
    assert [(r[0], r[1]) for r in s.received] == [
        (1, "CONNECT"),
        (2, "CONNECT"),
        (3, "CONNECT"),
        (3, "DISCONNECT"),
        (2, "DISCONNECT"),
        (1, "DISCONNECT"),
    ]
    assert not s.log.pending and s.log.dropped == 0


def test_the_fifo_holds_2048_events_and_drops_what_comes_beyond() -> None:
    s = Setup()  # never started: nothing is sent
    for _ in range(MAX_EVENTS + 10):
        s.log.sessionStarted("ssh", PEER)
    assert len(s.log.pending) == MAX_EVENTS and s.log.dropped == 10
    s.start()
    assert s.log.sent == MAX_EVENTS and not s.log.pending


def test_refusals_cannot_crowd_out_the_sessions() -> None:
    s = Setup()
    for _ in range(MAX_REFUSALS):
        s.log.refused(PEER, "local port forwarding blocked: direct-tcpip 127.0.0.1:22")
    assert len(s.log.pending) == MAX_REFUSALS and s.log.dropped == MAX_REFUSALS // 2
    for _ in range(MAX_EVENTS - MAX_REFUSALS):
        s.log.sessionStarted("ssh", PEER)
    assert len(s.log.pending) == MAX_EVENTS


def test_an_event_coderd_keeps_refusing_is_dropped_and_the_rest_go_on() -> None:
    s = Setup()
    path = RPCS["ReportConnection"].path
    accept = s.coderd.api.handlers[path]
    tries = []

    def refuseTheFirst(data: bytes) -> bytes:
        request = agent_pb2.ReportConnectionRequest.FromString(data)
        if uuid.UUID(bytes=request.connection.id).int == 1:
            tries.append(1)
            raise DRPCError(0, "no workspace for agent")
        return accept(data)

    s.coderd.api.handlers[path] = refuseTheFirst
    s.start()
    s.log.refused(PEER, "x")
    s.log.sessionStarted("ssh", PEER)
    s.coderd.settle()
    for _ in range(10):
        s.coderd.advance(1.0)
    assert len(tries) == 2 * MAX_REJECTIONS  # the refusal's CONNECT, then its DISCONNECT
    assert [(r[0], r[1]) for r in s.received] == [(2, "CONNECT")]
    assert s.log.dropped == 2


def test_stopping_sends_what_is_queued_first() -> None:
    s = Setup()
    s.start()
    ended = s.log.sessionStarted("ssh", PEER)
    s.coderd.settle()
    ended(0, "graceful")  # the SSH server drained: the last events arrive
    stopped = s.log.stopService()
    assert not stopped.called
    s.coderd.settle()
    assert stopped.called and [r[1] for r in s.received] == ["CONNECT", "DISCONNECT"]


def test_stopping_gives_up_after_the_shutdown_timeout() -> None:
    s = Setup()
    s.start()
    s.coderd.settle()
    s.log.sessionStarted("ssh", PEER)  # sent, and coderd never answers (nothing settles)
    stopped = s.log.stopService()
    s.coderd.clock.advance(SHUTDOWN_TIMEOUT - 0.1)
    assert not stopped.called
    s.coderd.clock.advance(0.1)
    assert stopped.called and len(s.log.pending) == 1


def test_stopping_without_a_connection_does_not_wait_for_one() -> None:
    s = Setup()
    s.start()
    s.coderd.disconnect()
    s.log.sessionStarted("ssh", PEER)
    stopped = s.log.stopService()
    assert stopped.called and len(s.log.pending) == 1


def test_the_activity_counts_sessions_and_passes_every_event_on() -> None:
    s = Setup()
    s.start()
    activity = SSHActivity(s.log)
    ended = activity.sessionStarted("jetbrains", PEER)
    assert activity.sessionCounts() == {"ssh": 0, "vscode": 0, "jetbrains": 1}
    ended(0, "graceful")
    ended(0, "graceful")  # once only
    activity.refused(PEER, "local port forwarding blocked: direct-tcpip 10.0.0.1:5432")
    s.coderd.settle()
    assert activity.sessionCounts() == {"ssh": 0, "vscode": 0, "jetbrains": 0}
    assert [r[1] for r in s.received] == ["CONNECT", "DISCONNECT", "CONNECT", "DISCONNECT"]
