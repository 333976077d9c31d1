"""``ScriptCompleted``: one timing per script run, for the dashboard's build timeline.

Upstream sends each timing once, with a 30 s deadline, and forgets it if
coderd is not there.  Here timings wait in order (at most
:data:`MAX_PENDING`; beyond that the oldest is dropped and logged) and are
sent one after the other, again after a reconnection if the connection was
the problem.  A timing coderd *refuses* (its checks failed) is logged and
dropped: sending it again would be refused again.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient, retryDelay
from coderagent.coderd.drpc import DRPCError
from coderagent.deferreds import Waiters, cancelCall
from coderagent.pb import agent_pb2

log = Logger()

MAX_PENDING = 1024


class TimingReporter(Service):
    """Timings to coderd, in order, at least once (bounded)."""

    def __init__(self, client: CoderdClient, clock: Any) -> None:
        self.client = client
        self.clock = clock
        self.pending: deque[agent_pb2.Timing] = deque()
        self.sent = 0
        self._sending = False
        self._failures = 0
        self._timer: IDelayedCall | None = None
        self._empty: Waiters[None] = Waiters()

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)

    def stopService(self) -> None:
        super().stopService()
        cancelCall(self._timer)
        self._timer = None

    def _connected(self, client: CoderdClient) -> None:
        cancelCall(self._timer)
        self._timer = None
        self._failures = 0
        self._send()

    def report(self, timing: agent_pb2.Timing) -> None:
        if len(self.pending) >= MAX_PENDING:
            lost = self.pending.popleft()
            log.warn(
                "too many script timings waiting for coderd: dropped the one of {start}",
                start=lost.start.ToJsonString(),
            )
        self.pending.append(timing)
        self._send()

    def waitUntilEmpty(self) -> Deferred[None]:
        if not self.pending and not self._sending:
            return succeed(None)
        return self._empty.wait()

    def _send(self) -> None:
        if self._sending or self._timer is not None or not self.pending:
            if not self.pending and not self._sending:
                self._empty.fire(None)
            return
        self._sending = True
        head = self.pending[0]
        request = agent_pb2.WorkspaceAgentScriptCompletedRequest(timing=head)
        d: Deferred[Any] = self.client.call("ScriptCompleted", request)
        d.addCallbacks(self._sent, self._failed)

    def _sent(self, _: object) -> None:
        self._sending = False
        self._failures = 0
        self.pending.popleft()
        self.sent += 1
        self._send()

    def _failed(self, reason: Failure) -> None:
        self._sending = False
        if reason.check(DRPCError):
            log.error("reporting script completed: {error}", error=reason.getErrorMessage())
            self.pending.popleft()
            self._send()
            return
        self._failures += 1
        if self._failures == 1:
            log.warn(
                "reporting script completed: {error}; retrying", error=reason.getErrorMessage()
            )
        self._timer = self.clock.callLater(retryDelay(self._failures), self._retry)

    def _retry(self) -> None:
        self._timer = None
        self._send()
