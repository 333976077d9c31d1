"""``BatchUpdateMetadata``: the manifest's metadata scripts, run and reported as upstream.

Every second (upstream's ``reportMetadataInterval``), while connected to
coderd:

* each metadata item whose last value is at least ``interval`` seconds old
  is collected again by running its script (an item with interval 0 runs
  once per connection), with its ``timeout``, or else the interval, or else
  3 s (three report intervals), as upstream defaults it; at most one run per
  key is under way, so a slow script never piles up;
* the values collected since the last batch (the newest per key) go to
  coderd in one call, if no batch is on its way.

Errors go in the result's ``error`` field, worded by
:mod:`~coderagent.reporting.command`.  A batch that could not reach coderd is
merged back (values collected meanwhile win) and sent with the next one; a
batch coderd answered with an error is not sent again, since coderd has
stored what it could of it.  Nothing grows beyond one value per key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient
from coderagent.coderd.drpc import DRPCError
from coderagent.pb import agent_pb2
from coderagent.reporting.command import CommandResult

log = Logger()

Result = agent_pb2.WorkspaceAgentMetadata.Result
Description = agent_pb2.WorkspaceAgentMetadata.Description

#: How often values are collected and reported (upstream's reportMetadataInterval).
TICK = 1.0
#: Bound on one BatchUpdateMetadata call (upstream's).
REPORT_TIMEOUT = 30.0


class ScriptRunner(Protocol):
    """What runs a metadata script (:class:`~coderagent.reporting.command.CommandRunner`)."""

    def run(self, script: str, timeout: float) -> Deferred[CommandResult]: ...


def scriptTimeout(description: Description) -> int:
    """Seconds a run may take: the item's timeout, else its interval, else three ticks."""
    timeout = int(description.timeout.ToSeconds())
    if timeout > 0:
        return timeout
    interval = int(description.interval.ToSeconds())
    if interval > 0:
        return interval
    return int(3 * TICK) or 5


class MetadataReporter(Service):
    """Collects the manifest's metadata and batches it to coderd."""

    def __init__(
        self,
        client: CoderdClient,
        *,
        manifest: Callable[[], agent_pb2.Manifest | None],
        runner: ScriptRunner,
        clock: Any,
    ) -> None:
        self.client = client
        self.manifest = manifest
        self.runner = runner
        self.clock = clock
        #: Values collected and not yet accepted by coderd, by key.
        self.updates: dict[str, Result] = {}
        self._collectedAt: dict[str, float] = {}
        self._running: dict[str, Deferred[CommandResult]] = {}
        self._inFlight = False
        self._failing = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def status(self) -> dict[str, Any]:
        return {"running": sorted(self._running), "waiting_for_coderd": sorted(self.updates)}

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)
        self._loop.start(TICK, now=False)

    def stopService(self) -> None:
        # As upstream: metadata stops as soon as the agent shuts down.
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for running in list(self._running.values()):
            running.cancel()

    def _connected(self, client: CoderdClient) -> None:
        # As upstream, each connection starts collecting afresh, at once.
        self._collectedAt.clear()
        self._collect()

    # -- every tick ------------------------------------------------------------------

    def _tick(self) -> None:
        self._collect()
        self._report()

    def _collect(self) -> None:
        manifest = self.manifest()
        if manifest is None or not self.client.connected or not self.running:
            return
        keys = {d.key for d in manifest.metadata}
        for gone in [k for k in self._collectedAt if k not in keys]:
            del self._collectedAt[gone]
        for gone in [k for k in self.updates if k not in keys]:
            del self.updates[gone]
        now = self.clock.seconds()
        for description in manifest.metadata:
            key = description.key
            if key in self._running:
                continue
            last = self._collectedAt.get(key)
            if last is not None:
                interval = description.interval.ToSeconds()
                if interval <= 0 or last + interval > now:
                    continue
            running = self.runner.run(description.script, scriptTimeout(description))
            self._running[key] = running
            running.addCallbacks(
                self._collected, self._cancelled, callbackArgs=(key, now), errbackArgs=(key,)
            )

    def _collected(self, result: CommandResult, key: str, startedAt: float) -> None:
        self._running.pop(key, None)
        self._collectedAt[key] = startedAt
        collected = timestamp_pb2.Timestamp()
        collected.FromNanoseconds(int(startedAt * 1e9))
        self.updates[key] = Result(collected_at=collected, value=result.value, error=result.error)

    def _cancelled(self, reason: Failure, key: str) -> None:
        self._running.pop(key, None)
        reason.trap(CancelledError)

    def _report(self) -> None:
        if not self.updates or self._inFlight or not self.client.connected:
            return
        batch, self.updates = self.updates, {}
        request = agent_pb2.BatchUpdateMetadataRequest(
            metadata=[agent_pb2.Metadata(key=k, result=r) for k, r in batch.items()]
        )
        self._inFlight = True
        d: Deferred[Any] = self.client.call(
            "BatchUpdateMetadata", request, timeout=REPORT_TIMEOUT
        )
        d.addCallbacks(self._reported, self._failed, errbackArgs=(batch,))

    def _reported(self, _: object) -> None:
        self._inFlight = False
        if self._failing:
            self._failing = False
            log.info("metadata reported to coderd again")

    def _failed(self, reason: Failure, batch: dict[str, Result]) -> None:
        self._inFlight = False
        if reason.check(DRPCError):
            log.error(
                "coderd refused a metadata batch ({keys}): {error}",
                keys=", ".join(sorted(batch)),
                error=reason.getErrorMessage(),
            )
            return
        for key, result in batch.items():
            self.updates.setdefault(key, result)  # what was collected meanwhile is newer
        if not self._failing:
            self._failing = True
            log.warn(
                "metadata not delivered to coderd: {error}; sent with the next batch",
                error=reason.getErrorMessage(),
            )
