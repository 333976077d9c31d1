"""When the workspace starts and stops, in upstream's order.

:mod:`coderagent.coderd.lifecycle` reports lifecycle states to coderd; this
module decides them, and orders what the agent does around them.

**Start** (the first manifest, as upstream's ``handleManifest``): ``STARTING``,
then the start scripts, in parallel; ``READY`` once every one has finished,
``START_TIMEOUT`` when the first one to fail timed out, ``START_ERROR`` when
it failed otherwise.  SSH is served all along (a client may connect before
``READY``); a reconnection to coderd starts nothing again.

**Shutdown** (upstream's ``Close``), an explicit sequence rather than
whatever order a ``MultiService`` stops its children in:

1. ``SHUTTING_DOWN``;
2. the SSH server stops accepting and says goodbye to its clients;
3. the stop scripts run (cron and unfinished start scripts are stopped first);
4. ``OFF``, or ``SHUTDOWN_TIMEOUT`` / ``SHUTDOWN_ERROR`` as the stop scripts ended;
5. the lifecycle reports and every queue that feeds coderd (script logs and
   timings) are drained, for at most :data:`DRAIN_TIMEOUT` together;
6. the connection to coderd is closed (its own children, such as the
   boundary forwarder, stop first).

An agent that never had a manifest (coderd never reached) has told coderd
nothing and runs no scripts: it stops at once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.lifecycle import Reporter
from coderagent.pb import agent_pb2

log = Logger()

State = agent_pb2.Lifecycle.State

#: Longest the shutdown waits, after the stop scripts, for coderd to have
#: the final state and the queued logs (upstream's 5 s).
DRAIN_TIMEOUT = 5.0


class Outcome(enum.Enum):
    """How a set of scripts ended: all fine, or how the first one to fail failed."""

    OK = "ok"
    TIMED_OUT = "timed out"
    FAILED = "failed"


_STARTED = {Outcome.OK: State.READY, Outcome.TIMED_OUT: State.START_TIMEOUT}
_STOPPED = {Outcome.OK: State.OFF, Outcome.TIMED_OUT: State.SHUTDOWN_TIMEOUT}


class Scripts(Protocol):
    """What the lifecycle needs of the script runner."""

    def start(self, manifest: agent_pb2.Manifest) -> Deferred[Outcome]:
        """Run the start scripts; fires once all ended (cron runs after that)."""

    def stop(self) -> Deferred[Outcome]:
        """Stop cron and unfinished start scripts, then run the stop scripts."""


#: Something that fires once a queue towards coderd is empty (or fails).
Drain = Callable[[], "Deferred[Any]"]


class AgentLifecycle(MultiService):
    """The SSH server and the coderd connection, started in order, stopped in upstream's."""

    def __init__(
        self,
        *,
        reporter: Reporter,
        ssh: IService,
        coderd: IService,
        clock: Any,
        scripts: Scripts | None = None,
        drains: Sequence[Drain] = (),
        drainTimeout: float = DRAIN_TIMEOUT,
    ) -> None:
        super().__init__()
        self.reporter = reporter
        self.ssh = ssh
        self.coderd = coderd
        self.scripts = scripts
        self.clock = clock
        self.drains = list(drains)
        self.drainTimeout = drainTimeout
        self.shuttingDown = False
        self._started: Deferred[Outcome] | None = None
        ssh.setServiceParent(self)
        coderd.setServiceParent(self)
        reporter.onManifest(self._manifest)

    # -- start ---------------------------------------------------------------------

    def _manifest(self, manifest: agent_pb2.Manifest, first: bool) -> None:
        if not first or self.shuttingDown:
            return
        self.reporter.transition(State.STARTING)
        if self.scripts is None:
            self._startFinished(Outcome.OK)
            return
        d = self._started = self.scripts.start(manifest)
        d.addCallback(self._startFinished)
        d.addErrback(self._unexpected, "running the start scripts")

    def _startFinished(self, outcome: Outcome) -> Outcome:
        if self.shuttingDown:
            return outcome
        self.reporter.transition(_STARTED.get(outcome, State.START_ERROR))
        return outcome

    def _unexpected(self, reason: Failure, what: str) -> None:
        log.failure("{what} failed", reason, what=what)

    # -- shutdown ------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        self.shuttingDown = True
        talked = self.reporter.manifest is not None
        if talked:
            log.info("shutting down: telling coderd, then stopping SSH and running stop scripts")
            self.reporter.transition(State.SHUTTING_DOWN)
        await self._step("stopping the SSH server", self.ssh.stopService)
        if talked:
            outcome = Outcome.OK
            if self.scripts is not None:
                outcome = await self._step("running the stop scripts", self.scripts.stop)
            self.reporter.transition(_STOPPED.get(outcome, State.SHUTDOWN_ERROR))
            await self._drain()
        await self._step("closing the connection to coderd", self.coderd.stopService)

    async def _step(self, what: str, step: Callable[[], Any]) -> Any:
        try:
            return await maybeDeferred(step)
        except Exception:
            log.failure("shutting down: {what} failed", what=what)
            return Outcome.FAILED

    async def _drain(self) -> None:
        """Wait (bounded) until coderd has the lifecycle and every queued log."""
        waits: list[Deferred[Any]] = [self.reporter.report()]
        for drain in self.drains:
            waits.append(maybeDeferred(drain))
        everything = DeferredList(waits, consumeErrors=True)
        timedOut: list[bool] = []

        def giveUp(result: object, seconds: float) -> None:
            timedOut.append(True)

        everything.addTimeout(self.drainTimeout, self.clock, onTimeoutCancel=giveUp)
        results = await everything
        if timedOut:
            log.warn(
                "shutting down: coderd did not take the final lifecycle state and the "
                "queued logs within {seconds:g}s; disconnecting anyway",
                seconds=self.drainTimeout,
            )
            return
        for ok, value in results or []:
            if not ok:
                log.warn(
                    "shutting down: could not deliver everything to coderd: {error}",
                    error=value.getErrorMessage(),
                )
