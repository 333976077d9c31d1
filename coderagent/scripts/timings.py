"""``ScriptCompleted``: one timing per script run, for the dashboard's build timeline.

Upstream sends each timing once, with a 30 s deadline, and forgets it if
coderd is not there.  Here timings wait in order (at most
:data:`MAX_PENDING`; beyond that the oldest is dropped and logged) and are
sent one after the other, again after a reconnection if the connection was
the problem (:mod:`coderagent.coderd.delivery` sends them).  A timing coderd
*refuses* (its checks failed) is logged and dropped: sending it again would
be refused again.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderagent.coderd.client import CoderdClient, retryDelay
from coderagent.coderd.delivery import OrderedDelivery
from coderagent.pb import agent_pb2

log = Logger()

MAX_PENDING = 1024


class TimingReporter(Service):
    """Timings to coderd, in order, at least once (bounded)."""

    def __init__(self, client: CoderdClient, clock: Any) -> None:
        self.client = client
        self.clock = clock
        self._delivery: OrderedDelivery[agent_pb2.Timing] = OrderedDelivery(
            lambda timing: client.call(
                "ScriptCompleted", agent_pb2.WorkspaceAgentScriptCompletedRequest(timing=timing)
            ),
            clock=clock,
            delay=retryDelay,
            onRejected=lambda _, reason: log.error(
                "reporting script completed: {error}", error=reason.getErrorMessage()
            ),
            onFailing=lambda reason: log.warn(
                "reporting script completed: {error}; retrying", error=reason.getErrorMessage()
            ),
        )
        #: The timings waiting for coderd, oldest first.
        self.pending: deque[agent_pb2.Timing] = self._delivery.pending

    @property
    def sent(self) -> int:
        """Timings coderd has."""
        return self._delivery.sent

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(lambda _: self._delivery.connected())

    def stopService(self) -> None:
        super().stopService()
        self._delivery.cancelRetry()

    def report(self, timing: agent_pb2.Timing) -> None:
        if len(self.pending) >= MAX_PENDING:
            lost = self.pending.popleft()
            log.warn(
                "too many script timings waiting for coderd: dropped the one of {start}",
                start=lost.start.ToJsonString(),
            )
        self.pending.append(timing)
        self._delivery.kick()

    def waitUntilEmpty(self) -> Deferred[None]:
        return self._delivery.waitUntilEmpty()
