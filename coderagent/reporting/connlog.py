"""``ReportConnection``: coderd's connection log (an audit record), fed in order.

As upstream, every SSH session is a ``CONNECT`` when it starts and a
``DISCONNECT`` when it ends, under one random id, with the session's type
(``SSH``, ``VSCODE``, ``JETBRAINS`` from ``CODER_SSH_SESSION_TYPE``), the
client's IP without its port, and at the end the status code and reason
(:mod:`coderagent.ssh.events` words them).  Beyond upstream, every request
the policy refuses is a ``CONNECT`` and a ``DISCONNECT`` of its own, type
``SSH``, status code :data:`REFUSED_STATUS`, the reason naming what was
refused and where to, so an administrator sees sandbox-escape attempts in
coderd and not only in the agent's log.

Events wait in one FIFO of at most :data:`MAX_EVENTS` (upstream's bound; an
event beyond it is dropped with a warning and counted), which outlives
connections to coderd and is sent one event at a time, oldest first.  A call
that fails is retried, after a delay that grows to 10 s, on whatever
connection there is by then; one that coderd *answers* with an error
:data:`MAX_REJECTIONS` times in a row is dropped with an error line, so one
event coderd will not take cannot hold up the log (upstream retries it
forever); :mod:`coderagent.coderd.delivery` does the sending.  Refusals may
fill at most :data:`MAX_REFUSALS` of the FIFO, so a client hammering a
blocked forward cannot crowd out the sessions' record.
When the agent stops, what is queued is still sent, for at most
:data:`SHUTDOWN_TIMEOUT`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient
from coderagent.coderd.delivery import OrderedDelivery
from coderagent.deferreds import cancelCall
from coderagent.pb import agent_pb2

log = Logger()

Connection = agent_pb2.Connection

#: Events waiting for coderd at most (upstream's bound).
MAX_EVENTS = 2048
#: Of which refusals may be at most this many.
MAX_REFUSALS = MAX_EVENTS // 2
#: The status code of a refusal's DISCONNECT: SSH's "administratively prohibited".
REFUSED_STATUS = 1
#: How often coderd may answer one event with an error before it is dropped.
MAX_REJECTIONS = 3
#: How long stopping may spend sending what is queued.
SHUTDOWN_TIMEOUT = 5.0
#: Bound on one call.
CALL_TIMEOUT = 30.0
RETRY_FLOOR = 0.5
RETRY_CAP = 10.0

#: Connection types by session kind; any other kind is logged as SSH (coderd
#: refuses TYPE_UNSPECIFIED, which upstream sends for unknown kinds).
TYPES = {"ssh": Connection.SSH, "vscode": Connection.VSCODE, "jetbrains": Connection.JETBRAINS}


def peerIP(peer: object) -> str:
    """The client's address without its port (empty for a Unix socket client)."""
    host = getattr(peer, "host", None)
    return str(host) if host else ""


class ConnectionLog(Service):
    """The FIFO of connection events and the loop that sends it to coderd."""

    def __init__(
        self,
        client: CoderdClient,
        *,
        clock: Any,
        newID: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        self.client = client
        self.clock = clock
        self.newID = newID
        self._delivery: OrderedDelivery[agent_pb2.ReportConnectionRequest] = OrderedDelivery(
            lambda request: client.call("ReportConnection", request, timeout=CALL_TIMEOUT),
            clock=clock,
            delay=_retryDelay,
            maxRejections=MAX_REJECTIONS,
            onRejected=self._rejected,
            onFailing=self._failing,
            onRecovered=lambda: log.info("connection log reaching coderd again"),
            onRemoved=lambda request: self._refusals.discard(id(request)),
            sending=False,  # until the service starts
        )
        #: The events waiting for coderd, oldest first.
        self.pending = self._delivery.pending
        #: Events dropped: the FIFO was full, or coderd kept refusing them.
        self.dropped = 0
        self._refusals: set[int] = set()  # ids of the refusal events in ``pending``
        self._overflowing = False

    @property
    def sent(self) -> int:
        """Events coderd has."""
        return self._delivery.sent

    def status(self) -> dict[str, Any]:
        return {"pending": len(self.pending), "sent": self.sent, "dropped": self.dropped}

    # -- what the SSH server tells (through SSHActivity) ------------------------------

    def sessionStarted(self, sessionType: str, peer: object) -> Callable[[int, str], None]:
        """Log the session's CONNECT now; the returned function logs its DISCONNECT."""
        connectionID = self.newID().bytes
        kind = TYPES.get(sessionType, Connection.SSH)
        ip = peerIP(peer)
        self._add(self._event(connectionID, Connection.CONNECT, kind, ip))

        def ended(code: int, reason: str) -> None:
            self._add(self._event(connectionID, Connection.DISCONNECT, kind, ip, code, reason))

        return ended

    def refused(self, peer: object, reason: str) -> None:
        """Log a refusal by policy: a CONNECT and a DISCONNECT of its own."""
        if len(self._refusals) + 2 > MAX_REFUSALS:
            self._overflow("refusal")
            return
        connectionID = self.newID().bytes
        ip = peerIP(peer)
        self._add(self._event(connectionID, Connection.CONNECT, Connection.SSH, ip), refusal=True)
        self._add(
            self._event(
                connectionID, Connection.DISCONNECT, Connection.SSH, ip, REFUSED_STATUS, reason
            ),
            refusal=True,
        )

    def _event(
        self,
        connectionID: bytes,
        action: int,
        kind: int,
        ip: str,
        code: int = 0,
        reason: str | None = None,
    ) -> agent_pb2.ReportConnectionRequest:
        when = timestamp_pb2.Timestamp()
        when.FromNanoseconds(int(self.clock.seconds() * 1e9))
        connection = Connection(id=connectionID, timestamp=when, ip=ip, status_code=code)
        connection.action = action  # type: ignore[assignment]
        connection.type = kind  # type: ignore[assignment]
        if reason is not None:
            connection.reason = reason
        return agent_pb2.ReportConnectionRequest(connection=connection)

    def _add(self, request: agent_pb2.ReportConnectionRequest, refusal: bool = False) -> None:
        if len(self.pending) >= MAX_EVENTS:
            self._overflow("connection")
            return
        self._overflowing = False
        self.pending.append(request)
        if refusal:
            self._refusals.add(id(request))
        self._delivery.kick()

    def _overflow(self, what: str) -> None:
        self.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            log.warn(
                "connection log full ({pending} events waiting for coderd): "
                "dropping {what} events until it drains",
                pending=len(self.pending),
                what=what,
            )

    # -- sending, oldest first ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._delivery.sending = True
        self.client.onConnect(lambda _: self._delivery.connected())
        self._delivery.kick()

    def _rejected(self, head: agent_pb2.ReportConnectionRequest, reason: Failure) -> None:
        self.dropped += 1
        c = head.connection
        log.error(
            "coderd refused a connection log event {times} times, dropped it: "
            "{action} {type} from {ip}: {error}",
            times=MAX_REJECTIONS,
            action=Connection.Action.Name(c.action),
            type=Connection.Type.Name(c.type),
            ip=c.ip or "?",
            error=reason.getErrorMessage(),
        )

    def _failing(self, reason: Failure) -> None:
        log.warn(
            "connection log event not delivered to coderd: {error}; "
            "{pending} events wait and are retried",
            error=reason.getErrorMessage(),
            pending=len(self.pending),
        )

    # -- stopping: drain, bounded ----------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Fires once coderd has every event held (the shutdown waits on it, bounded, with
        the scripts' logs, after the SSH server's goodbye has ended its sessions)."""
        done = self._delivery.waitUntilEmpty()
        self._delivery.kick()
        return done

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self.pending or not self.client.connected:
            # Nothing to send, or no connection to send it on: waiting for one would only
            # delay the exit (an agent that never reached coderd stops at once).
            self._undelivered()
            self._delivery.stop()
            return succeed(None)
        done = self._delivery.waitUntilEmpty()
        timer = self.clock.callLater(SHUTDOWN_TIMEOUT, self._delivery.giveUp)
        self._delivery.kick()

        def finished(_: object) -> None:
            cancelCall(timer)
            self._undelivered()
            self._delivery.stop()

        return done.addCallback(finished)

    def _undelivered(self) -> None:
        if self.pending:
            log.warn(
                "{count} connection log events not delivered to coderd before stopping",
                count=len(self.pending),
            )


def _retryDelay(failures: int) -> float:
    """0.5 s after the first failure in a row, doubling up to 10 s."""
    return float(min(RETRY_CAP, RETRY_FLOOR * 2 ** (failures - 1)))
