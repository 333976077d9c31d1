# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""App health: upstream's rule, the reports, and the HTTP probe against a real server.

The reporter talks to coderd-dev's real API through the real client, in
memory on a ``task.Clock``; its probes are answered by the test, so each
check's outcome and time is exact.  The HTTP probe is tested on its own
against a real ``twisted.web`` site on loopback.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from google.protobuf import duration_pb2
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.util import Redirect

from coderagent.coderd.api import RPCS
from coderagent.coderd.drpcwire import DRPCError
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from coderagent.reporting.apphealth import AppHealthReporter, httpProbe
from tests.localcoderd import InMemoryCoderd

App = agent_pb2.WorkspaceApp
Health = App.Health
WEB = uuid.UUID(int=1)
DOCS = uuid.UUID(int=2)
PLAIN = uuid.UUID(int=3)


def app(
    appID: uuid.UUID, slug: str, url: str = "", interval: int = 0, threshold: int = 0
) -> App:
    return App(
        id=appID.bytes,
        slug=slug,
        healthcheck=App.Healthcheck(
            url=url, interval=duration_pb2.Duration(seconds=interval), threshold=threshold
        ),
    )


class Probes:
    """Answers each probe as the test says: the next outcome of its URL."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[bool]] = {}
        self.calls: list[tuple[str, float]] = []

    def __call__(self, url: str, timeout: float) -> defer.Deferred[object]:
        self.calls.append((url, timeout))
        outcomes = self.outcomes.get(url) or [True]
        ok = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if ok:
            return defer.succeed(200)
        return defer.fail(ValueError("error status code: 503"))


class Setup:
    def __init__(self, *apps: App) -> None:
        self.coderd = InMemoryCoderd(Workspace(apps=list(apps)))
        self.probes = Probes()
        self.reporter = AppHealthReporter(
            self.coderd.client, clock=self.coderd.clock, probe=self.probes
        )
        self.reporter.setServiceParent(self.coderd.client)
        # As the lifecycle reporter does: each manifest received is handed over.
        self.coderd.client.onConnect(self._manifest)

    def _manifest(self, client: Any) -> defer.Deferred[Any]:
        d = client.call("GetManifest", agent_pb2.GetManifestRequest())
        return d.addCallback(self.reporter.manifestReceived)

    def start(self) -> None:
        self.coderd.client.startService()
        self.coderd.settle()

    def health(self) -> dict[uuid.UUID, str]:
        return {uuid.UUID(bytes=k): Health.Name(v) for k, v in self.coderd.api.appHealth.items()}

    def tick(self, seconds: float = 1.0) -> None:
        self.coderd.advance(seconds)


def test_a_healthy_app_is_reported_healthy_after_its_first_probe() -> None:
    s = Setup(app(WEB, "web", "http://web/", interval=2, threshold=1), app(PLAIN, "plain"))
    s.start()
    s.tick()
    assert s.probes.calls == [] and s.health() == {}  # nothing changed: INITIALIZING stands
    s.tick()
    assert s.probes.calls == [("http://web/", 1.999)]
    s.tick()
    assert s.health() == {WEB: "HEALTHY"}  # the disabled app is never reported


def test_the_threshold_plus_first_failure_in_a_row_makes_it_unhealthy() -> None:
    s = Setup(app(WEB, "web", "http://web/", interval=1, threshold=3))
    outcomes = [True, False, False, False, True, False, False, False, False]
    s.probes.outcomes["http://web/"] = list(outcomes)
    s.start()
    seen = []
    for _ in outcomes:
        s.tick()  # one probe, and the second's report of what changed
        seen.append(Health.Name(s.reporter.health[WEB.bytes]))
    assert seen == ["HEALTHY"] * 8 + ["UNHEALTHY"]  # three failures are counted, not judged
    assert len(s.probes.calls) == len(outcomes)
    s.tick()
    assert s.health() == {WEB: "UNHEALTHY"}


def test_every_app_is_sent_when_one_changes() -> None:
    s = Setup(
        app(WEB, "web", "http://web/", interval=1, threshold=1),
        app(DOCS, "docs", "http://docs/", interval=5, threshold=1),
    )
    s.start()
    s.tick()
    s.tick()
    assert s.health() == {WEB: "HEALTHY", DOCS: "INITIALIZING"}


def test_a_report_that_failed_is_sent_again() -> None:
    s = Setup(app(WEB, "web", "http://web/", interval=1, threshold=1))
    path = RPCS["BatchUpdateAppHealths"].path
    accept = s.coderd.api.handlers[path]
    calls = []

    def failOnce(data: bytes) -> bytes:
        calls.append(data)
        if len(calls) == 1:
            raise DRPCError(0, "database is down")
        return accept(data)

    s.coderd.api.handlers[path] = failOnce
    s.start()
    s.tick()  # the probe, then the change reported, and refused
    assert len(calls) == 1 and s.health() == {}
    s.tick()  # nothing changed since, but coderd does not know yet
    assert len(calls) == 2 and s.health() == {WEB: "HEALTHY"}
    s.tick()
    assert len(calls) == 2


def test_stopping_stops_the_probes() -> None:
    s = Setup(app(WEB, "web", "http://web/", interval=1, threshold=1))
    s.start()
    s.tick()
    s.reporter.stopService()
    for _ in range(5):
        s.tick()
    assert len(s.probes.calls) == 1


# -- the HTTP probe ---------------------------------------------------------------------


class Status(Resource):
    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return b"x" * 100_000


class Never(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        return NOT_DONE_YET


@pytest_twisted.async_yield_fixture
async def site() -> Any:
    root = Resource()
    root.putChild(b"ok", Status(200))
    root.putChild(b"missing", Status(404))
    root.putChild(b"broken", Status(503))
    root.putChild(b"moved", Redirect(b"/broken"))
    root.putChild(b"never", Never())
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    yield f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_any_answer_below_500_is_healthy(site: str) -> None:
    probe = httpProbe(reactor)
    assert await probe(site + "/ok", 5) == 200
    assert await probe(site + "/missing", 5) == 404


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("path", "error"),
    [("/broken", "error status code: 503"), ("/moved", "error status code: 503")],
)
async def test_a_5xx_even_after_a_redirect_is_a_failure(site: str, path: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await httpProbe(reactor)(site + path, 5)


@pytest_twisted.ensureDeferred
async def test_an_answer_later_than_the_timeout_is_a_failure(site: str) -> None:
    started = reactor.seconds()
    with pytest.raises(defer.TimeoutError, match=r"no answer within 0\.3s"):
        await httpProbe(reactor)(site + "/never", 0.3)
    assert reactor.seconds() - started < 5


@pytest_twisted.ensureDeferred
async def test_a_url_that_cannot_be_fetched_is_a_failure() -> None:
    with pytest.raises(Exception):  # noqa: B017 - whatever the client says, it is a failure
        await httpProbe(reactor)("gopher://nowhere/", 1)
