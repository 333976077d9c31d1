"""What the agent tells coderd about itself: the manifest in, startup and lifecycle out.

On every connection, as upstream's ``handleManifest``: fetch the manifest,
report the startup (version and the expanded directory, ``""`` when the
manifest sets none), then hand the manifest to whoever listens (sessions'
environment, and on the first one the start of the workspace).  A failure
on the way drops the connection and the next one tries again.

Lifecycle states are reported by :meth:`Reporter.transition`, forward only
(as upstream's ``setLifecycle``: a state that is not after the last one is
refused and logged), each delivered once and in order however often the
connection drops in between: one interrupted by a disconnect is sent again
on the next connection, so coderd may see a state twice, never out of order.
*Which* state and when is decided by :mod:`coderagent.agentlifecycle`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent import __version__
from coderagent.coderd.client import CoderdClient, CoderdUnavailable
from coderagent.pb import agent_pb2

log = Logger()

State = agent_pb2.Lifecycle.State

#: ``listener(manifest, first)``: ``first`` is true for the agent's first manifest only.
ManifestListener = Callable[[agent_pb2.Manifest, bool], None]


class Reporter(Service):
    """Manifest in; startup and lifecycle out, each delivered once and in order."""

    def __init__(
        self,
        client: CoderdClient,
        expandDirectory: Callable[[str], str],
        clock: Any,
        wallClock: Callable[[], float] = time.time,
    ) -> None:
        """``expandDirectory`` turns the manifest's ``directory`` into what
        ``UpdateStartup`` reports; ``wallClock`` stamps the transitions."""
        self.client = client
        self.expandDirectory = expandDirectory
        self.clock = clock
        self.wallClock = wallClock
        self.manifest: agent_pb2.Manifest | None = None
        self._listeners: list[ManifestListener] = []
        self._pending: deque[agent_pb2.Lifecycle] = deque()
        self._sending = False
        self._waiters: list[Deferred[None]] = []
        #: The last state set (reported or not), and the last one coderd acknowledged.
        self.state: int = State.CREATED
        self.reportedState = "CREATED"

    def onManifest(self, listener: ManifestListener) -> None:
        """Call ``listener(manifest, first)`` with each manifest, once coderd has the startup."""
        self._listeners.append(listener)

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)

    # -- on every connection -----------------------------------------------------

    def _connected(self, client: CoderdClient) -> Deferred[None]:
        d: Deferred[Any] = client.call("GetManifest", agent_pb2.GetManifestRequest())
        d.addCallback(self._reportStartup)
        d.addCallback(lambda _: self.report())
        return d

    def _reportStartup(self, manifest: agent_pb2.Manifest) -> Deferred[Any]:
        startup = agent_pb2.Startup(
            version=__version__, expanded_directory=self.expandDirectory(manifest.directory)
        )
        d: Deferred[Any] = self.client.call(
            "UpdateStartup", agent_pb2.UpdateStartupRequest(startup=startup)
        )
        return d.addCallback(lambda _: self._gotManifest(manifest))

    def _gotManifest(self, manifest: agent_pb2.Manifest) -> None:
        first = self.manifest is None
        self.manifest = manifest
        if first:
            log.info(
                "manifest received: agent {agent} of workspace {owner}/{workspace}",
                agent=manifest.agent_name,
                owner=manifest.owner_username,
                workspace=manifest.workspace_name,
            )
        for listener in list(self._listeners):
            listener(manifest, first)

    # -- lifecycle: every transition, once, in order ------------------------------

    def transition(self, state: int) -> bool:
        """Move to ``state`` and report it; refused (``False``) unless it is after the last."""
        if state <= self.state:
            log.warn(
                "attempted to set lifecycle state to a previous state: {current} after {last}",
                current=State.Name(state),
                last=State.Name(self.state),
            )
            return False
        self.state = state
        changed = timestamp_pb2.Timestamp()
        changed.FromNanoseconds(int(self.wallClock() * 1e9))
        lifecycle = agent_pb2.Lifecycle(changed_at=changed)
        lifecycle.state = state  # type: ignore[assignment]
        self._pending.append(lifecycle)
        log.info("lifecycle: {state}", state=State.Name(state))
        if self.manifest is not None:
            self.report().addErrback(self._notReported)
        return True

    def _notReported(self, reason: Failure) -> None:
        log.info(
            "lifecycle not reported yet ({error}); it goes on the next connection",
            error=reason.getErrorMessage(),
        )

    def report(self, timeout: float | None = None) -> Deferred[None]:
        """Report what is pending, oldest first; fires when all went, fails at the first error.

        A call while reports are on their way waits for those (and for what
        was added meanwhile, which the same pass sends).  ``timeout`` bounds
        this caller's wait either way: a pass already on its way may have been
        started with a longer one (or none), and stopping must not wait for
        it.  Giving up does not stop the pass; what it does not deliver is
        sent again on the next connection.
        """
        waiter: Deferred[None] = Deferred(self._forget)
        if not self._pending and not self._sending:
            waiter.callback(None)
            return waiter
        self._waiters.append(waiter)
        if timeout is not None:

            def timedOut(result: object, seconds: float) -> Failure:
                return Failure(
                    CoderdUnavailable(f"UpdateLifecycle: no answer from coderd within {seconds:g}s")
                )

            waiter.addTimeout(timeout, self.clock, onTimeoutCancel=timedOut)
        if self._sending:
            return waiter
        self._sending = True

        def finish(outcome: Failure | None) -> None:
            self._sending = False
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if outcome is None:
                    w.callback(None)
                else:
                    w.errback(outcome)

        def sendHead() -> None:
            if not self._pending:
                finish(None)
                return
            head = self._pending[0]
            request = agent_pb2.UpdateLifecycleRequest(lifecycle=head)
            d: Deferred[Any] = self.client.call("UpdateLifecycle", request, timeout=timeout)
            d.addCallbacks(reported, finish, callbackArgs=(head,))

        def reported(_: object, head: agent_pb2.Lifecycle) -> None:
            self._pending.popleft()
            self.reportedState = State.Name(head.state)
            log.info("lifecycle reported to coderd: {state}", state=State.Name(head.state))
            sendHead()

        # A failed report stays at the head: the next connection sends it again.
        sendHead()
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        """A waiter was cancelled (its timeout, or its caller): the pass goes on without it."""
        self._waiters.remove(waiter)
