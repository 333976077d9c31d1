"""Resource monitoring: what coderd's out-of-memory and out-of-disk notifications read.

On each connection, as upstream, the agent asks coderd for the configuration
(``GetResourcesMonitoringConfiguration``: an interval, how many datapoints
to send at once, whether memory is watched, which volumes), then every
``collection_interval_seconds`` takes a datapoint (:mod:`.usage`: memory and
each enabled volume, in bytes) into a window of the last ``num_datapoints``;
once the window is full, every new datapoint sends the whole window with
``PushResourcesMonitoringUsage`` (coderd judges a resource over the last N
datapoints).  A push that fails is logged; the window slides on, as upstream.

Reading usage may block (a hung network mount), so each datapoint is taken in
a thread, and a tick finding the last one still being taken is skipped.
When nothing is watched, nothing is sampled or sent.  Unlike upstream, a
configuration coderd cannot give does not drop the connection: monitoring is
off until the next one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient
from coderagent.pb import agent_pb2
from coderagent.reporting.usage import Usage, UsageError, memory, volume

log = Logger()

Config = agent_pb2.GetResourcesMonitoringConfigurationResponse
Datapoint = agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint

#: Bound on one call.
CALL_TIMEOUT = 30.0
#: Bound on the window, whatever coderd asks.
MAX_DATAPOINTS = 1000


@dataclass
class Sample:
    """One reading: memory (if watched) and each watched volume; and what failed."""

    memory: Usage | None = None
    volumes: list[tuple[str, Usage]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def takeSample(watchMemory: bool, volumes: Sequence[str], root: str = "/") -> Sample:
    """Read usage now (blocking: run it in a thread)."""
    sample = Sample()
    if watchMemory:
        try:
            sample.memory = memory(root)
        except UsageError as e:
            sample.errors.append(f"failed to fetch memory: {e}")
    for path in volumes:
        try:
            sample.volumes.append((path, volume(path)))
        except UsageError as e:
            sample.errors.append(f"failed to fetch volume: {e}")
    return sample


def _deferToThread(f: Callable[[], Sample]) -> Deferred[Sample]:
    from twisted.internet.threads import deferToThread

    return deferToThread(f)


class ResourcesMonitor(Service):
    """Samples at coderd's interval and pushes its window of datapoints."""

    def __init__(
        self,
        client: CoderdClient,
        *,
        clock: Any,
        sampler: Callable[[bool, Sequence[str]], Sample] = takeSample,
        inThread: Callable[[Callable[[], Sample]], Deferred[Sample]] = _deferToThread,
    ) -> None:
        self.client = client
        self.clock = clock
        self.sampler = sampler
        self.inThread = inThread
        #: The configuration of the current connection, once known.
        self.config: Config | None = None
        self.window: deque[Datapoint] = deque()
        self.pushes = 0
        self._loop: LoopingCall | None = None
        self._connection = 0
        self._sampling = False
        self._pushing = False
        self._failing = False

    def status(self) -> dict[str, Any]:
        config = self.config
        return {
            "memory": bool(config is not None and self._watchMemory(config)),
            "volumes": self._volumes(config) if config is not None else [],
            "datapoints": len(self.window),
            "pushes": self.pushes,
        }

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)

    def stopService(self) -> None:
        # As upstream: monitoring stops as soon as the agent shuts down.
        super().stopService()
        self._connection += 1
        self._stopLoop()

    def _stopLoop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- one connection ------------------------------------------------------------

    def _connected(self, client: CoderdClient) -> None:
        self._connection += 1
        connection = self._connection
        self._stopLoop()
        d: Deferred[Config] = client.call(
            "GetResourcesMonitoringConfiguration",
            agent_pb2.GetResourcesMonitoringConfigurationRequest(),
            timeout=CALL_TIMEOUT,
        )
        d.addCallbacks(self._configured, self._noConfiguration, callbackArgs=(connection,))

    def _noConfiguration(self, reason: Failure) -> None:
        log.warn(
            "cannot get the resources monitoring configuration from coderd: {error}; "
            "not monitoring until the next connection",
            error=reason.getErrorMessage(),
        )

    def _configured(self, config: Config, connection: int) -> None:
        if connection != self._connection or not self.running:
            return
        self.config = config
        interval = config.config.collection_interval_seconds
        size = config.config.num_datapoints
        if interval <= 0 or size <= 0:
            log.warn(
                "resources monitoring configuration unusable (interval {interval}s, "
                "{size} datapoints): not monitoring",
                interval=interval,
                size=size,
            )
            return
        if not self._watchMemory(config) and not self._volumes(config):
            log.info("resources monitoring: nothing to watch")
            return
        self.window = deque(maxlen=min(size, MAX_DATAPOINTS))
        self._loop = LoopingCall(self._tick, connection)
        self._loop.clock = self.clock
        self._loop.start(interval, now=False)

    @staticmethod
    def _watchMemory(config: Config) -> bool:
        return config.HasField("memory") and config.memory.enabled

    @staticmethod
    def _volumes(config: Config) -> list[str]:
        return [v.path for v in config.volumes if v.enabled]

    # -- every interval ----------------------------------------------------------

    def _tick(self, connection: int) -> None:
        if connection != self._connection or not self.client.connected:
            self._stopLoop()  # the next connection starts over
            return
        if self._sampling or self.config is None:
            return
        config = self.config
        watchMemory, volumes = self._watchMemory(config), self._volumes(config)
        collected = timestamp_pb2.Timestamp()
        collected.FromNanoseconds(int(self.clock.seconds() * 1e9))
        self._sampling = True
        d = self.inThread(lambda: self.sampler(watchMemory, volumes))
        d.addCallback(self._sampled, collected, connection)
        d.addErrback(self._samplingFailed)

    def _samplingFailed(self, reason: Failure) -> None:
        self._sampling = False
        log.failure("taking a resources datapoint failed", reason)

    def _sampled(self, sample: Sample, collected: Any, connection: int) -> None:
        self._sampling = False
        for error in sample.errors:
            log.error("resources monitoring: {error}", error=error)
        if connection != self._connection:
            return
        point = Datapoint(collected_at=collected)
        if sample.memory is not None:
            point.memory.used = sample.memory.used
            point.memory.total = sample.memory.total
        for path, usage in sample.volumes:
            point.volumes.add(volume=path, used=usage.used, total=usage.total)
        self.window.append(point)
        if len(self.window) == self.window.maxlen and not self._pushing:
            self._push()

    def _push(self) -> None:
        self._pushing = True
        request = agent_pb2.PushResourcesMonitoringUsageRequest(datapoints=list(self.window))
        d: Deferred[Any] = self.client.call(
            "PushResourcesMonitoringUsage", request, timeout=CALL_TIMEOUT
        )
        d.addCallbacks(self._pushed, self._pushFailed)

    def _pushed(self, _: object) -> None:
        self._pushing = False
        self.pushes += 1
        if self._failing:
            self._failing = False
            log.info("resources usage reported to coderd again")

    def _pushFailed(self, reason: Failure) -> None:
        self._pushing = False
        if not self._failing:
            self._failing = True
            log.warn(
                "failed to push resources monitoring usage: {error}",
                error=reason.getErrorMessage(),
            )
