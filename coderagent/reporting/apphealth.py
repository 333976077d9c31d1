"""``BatchUpdateAppHealths``: each workspace app's health check, as upstream runs it.

For each manifest received (every connection brings one), as upstream's
``apphealth.go``:

* the apps whose health is not ``DISABLED`` are tracked, starting from the
  health coderd gave them;
* an app with a health check URL, an interval and a threshold is probed every
  ``interval`` seconds (the first probe one interval in): a ``GET`` that may
  take the interval less a millisecond, following redirects.  Any answer
  below 500 makes it ``HEALTHY`` at once and clears its failures; an error or
  a 5xx adds a failure, and a failure once ``threshold`` failures have been
  counted makes it ``UNHEALTHY`` (so the (threshold+1)-th failure in a row,
  exactly as upstream's code counts, though its documentation says
  threshold);
* every second, if any health changed since the last report, all of them are
  sent.  Unlike upstream, a report that fails is sent again at the next
  second instead of waiting for the next change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RedirectAgent

from coderagent.coderd.client import CoderdClient
from coderagent.deferreds import cancelCall
from coderagent.pb import agent_pb2

log = Logger()

App = agent_pb2.WorkspaceApp
Health = agent_pb2.WorkspaceApp.Health

#: How often changes are looked for and reported (upstream's).
REPORT_INTERVAL = 1.0
CALL_TIMEOUT = 30.0

#: A probe: fires (with anything) when the app answered below 500, fails otherwise.
Probe = Callable[[str, float], "Deferred[object]"]


class AppHealthReporter(Service):
    """Probes the manifest's apps and reports their health."""

    def __init__(self, client: CoderdClient, *, clock: Any, probe: Probe) -> None:
        """``probe`` checks one URL (:func:`httpProbe` in the agent)."""
        self.client = client
        self.clock = clock
        self.probe = probe
        #: Health by app id (16 bytes), for the apps of the current manifest.
        self.health: dict[bytes, int] = {}
        self.names: dict[bytes, str] = {}
        self._failures: dict[bytes, int] = {}
        self._reported: dict[bytes, int] = {}
        self._loops: list[LoopingCall] = []
        self._inFlight = False
        self._failing = False
        self._manifest: agent_pb2.Manifest | None = None

    def status(self) -> dict[str, str]:
        """Each tracked app's health, by slug."""
        return {self.names.get(app, "?"): Health.Name(h) for app, h in self.health.items()}

    def startService(self) -> None:
        super().startService()
        if self._manifest is not None:
            self.manifestReceived(self._manifest)

    def manifestReceived(self, manifest: agent_pb2.Manifest) -> None:
        """Start over with ``manifest``'s apps (the lifecycle reporter calls this)."""
        self._manifest = manifest
        self._stopLoops()
        self.health = {a.id: a.health for a in manifest.apps if a.health != Health.DISABLED}
        self.names = {a.id: a.slug for a in manifest.apps}
        self._failures = dict.fromkeys(self.health, 0)
        self._reported = dict(self.health)
        if not self.running or not self.health:
            return
        for app in manifest.apps:
            check = app.healthcheck
            interval = int(check.interval.ToSeconds())
            if app.id not in self.health or not check.url or interval <= 0 or check.threshold <= 0:
                continue
            loop = LoopingCall(self._check, app.id, check.url, interval, check.threshold)
            loop.clock = self.clock
            loop.start(interval, now=False)
            self._loops.append(loop)
        report = LoopingCall(self._report)
        report.clock = self.clock
        report.start(REPORT_INTERVAL, now=False)
        self._loops.append(report)

    def stopService(self) -> None:
        # As upstream: health checks stop as soon as the agent shuts down.
        super().stopService()
        self._stopLoops()

    def _stopLoops(self) -> None:
        loops, self._loops = self._loops, []
        for loop in loops:
            if loop.running:
                loop.stop()

    # -- probing ---------------------------------------------------------------------

    def _check(self, app: bytes, url: str, interval: int, threshold: int) -> Deferred[object]:
        d = self.probe(url, interval - 0.001)
        d.addCallbacks(
            self._healthy, self._failed, callbackArgs=(app,), errbackArgs=(app, threshold)
        )
        return d  # the next probe waits for this one

    def _healthy(self, _: object, app: bytes) -> None:
        if app in self.health:
            self.health[app] = Health.HEALTHY
            self._failures[app] = 0

    def _failed(self, reason: Failure, app: bytes, threshold: int) -> None:
        if app not in self.health:
            return
        if self._failures[app] < threshold:
            self._failures[app] += 1
        else:
            self.health[app] = Health.UNHEALTHY
        log.debug(
            "app {slug} health check failed: {error}",
            slug=self.names.get(app, "?"),
            error=reason.getErrorMessage(),
        )

    # -- reporting ---------------------------------------------------------------

    def _report(self) -> None:
        if self._inFlight or self.health == self._reported or not self.client.connected:
            return
        sending = dict(self.health)
        request = agent_pb2.BatchUpdateAppHealthRequest()
        for app, health in sending.items():
            update = request.updates.add(id=app)
            update.health = health
        self._inFlight = True
        d: Deferred[Any] = self.client.call("BatchUpdateAppHealths", request, timeout=CALL_TIMEOUT)
        d.addCallbacks(self._sent, self._notSent, callbackArgs=(sending,))

    def _sent(self, _: object, sending: dict[bytes, int]) -> None:
        self._inFlight = False
        self._reported = sending
        self._failing = False
        for app, health in sending.items():
            slug = self.names.get(app, "?")
            log.info("app {slug}: {health}", slug=slug, health=Health.Name(health))

    def _notSent(self, reason: Failure) -> None:
        self._inFlight = False
        if not self._failing:
            self._failing = True
            log.warn(
                "failed to report workspace app health: {error}", error=reason.getErrorMessage()
            )


def httpProbe(reactor: Any) -> Probe:
    """``GET url`` with Twisted's HTTP client, following redirects (at most 10, as Go's
    client): fires for any status below 500, fails on an error, a 5xx or the timeout."""

    def probe(url: str, timeout: float) -> Deferred[object]:
        agent = RedirectAgent(
            Agent(
                reactor,
                connectTimeout=timeout,
                pool=HTTPConnectionPool(reactor, persistent=False),
            ),
            redirectLimit=10,
        )
        d: Deferred[Any] = maybeDeferred(agent.request, b"GET", url.encode("utf-8"))

        def answered(response: Any) -> object:
            response.deliverBody(_Ignore())
            if response.code >= 500:
                raise ValueError(f"error status code: {response.code}")
            return response.code

        d.addCallback(answered)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = reactor.callLater(timeout, expire)

        def settled(result: object) -> object:
            cancelCall(timer)
            if expired and isinstance(result, Failure):
                return Failure(TimeoutError(f"no answer within {timeout:g}s"))
            return result

        return d.addBoth(settled)

    return probe


class _Ignore:
    """Takes a response body and stops it at once: only the status matters."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass
