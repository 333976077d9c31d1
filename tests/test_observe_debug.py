# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The debug and profiling sites over real HTTP on an ephemeral loopback port.

Time in the profiler is a ``task.Clock`` that also reports what was
scheduled and cancelled on it, so a test waits for "the profile has started"
instead of sleeping.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogPublisher
from twisted.web.client import ResponseNeverReceived

from coderagent import __version__
from coderagent.listening import ListeningService
from coderagent.observe.debug import (
    REDACTED,
    debugSite,
    profilingSite,
    redactedManifest,
)
from coderagent.observe.logs import RecentLines
from coderagent.observe.metrics import AgentMetrics
from coderagent.observe.servers import httpServers
from coderagent.observe.status import AgentStatus
from coderagent.observe.status import serving as servingCheck
from coderagent.pb import agent_pb2
from tests.webclient import TIMEOUT, Response, get, request, serving

# -- the debug server ----------------------------------------------------------------


class Agent:
    """What the debug site reads: status, the current manifest, the connections, the log."""

    def __init__(self) -> None:
        self.now = 100.0
        self.status = AgentStatus(clock=lambda: self.now)
        self.status.add("ssh", lambda: {"connections": len(self.connections)})
        self.manifest: agent_pb2.Manifest | None = None
        self.connections: list[dict[str, Any]] = []
        self.recent = RecentLines(3)

    def site(self) -> Any:
        return debugSite(
            status=self.status,
            manifest=lambda: self.manifest,
            connections=lambda: self.connections,
            recent=self.recent,
        )


def assertJSON(response: Response, code: int, value: Any) -> None:
    assert response.code == code
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.text == json.dumps(value, indent=2, sort_keys=True) + "\n"


@pytest_twisted.ensureDeferred
async def test_the_index_lists_the_pages() -> None:
    async with serving(Agent().site()) as base:
        response = await get(base + "/")
        assert (await get(base)).body == response.body
        assert (await get(base + "/nope")).code == 404
    assert response.code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "/health\n/manifest\n/ssh\n/logs\n"


@pytest_twisted.ensureDeferred
async def test_health_is_the_status_report_read_at_each_request() -> None:
    agent = Agent()
    async with serving(agent.site()) as base:
        agent.now = 102.5
        first = await get(base + "/health")
        agent.connections.append({"peer": "127.0.0.1:5000"})
        second = await get(base + "/health")
        posted = await get(base + "/health", b"POST")
    head = {"status": "ok", "version": __version__, "pid": os.getpid(), "uptime_seconds": 2.5}
    assertJSON(first, 200, {**head, "ssh": {"connections": 0}})
    assertJSON(second, 200, {**head, "ssh": {"connections": 1}})
    assert posted.code == 405


@pytest_twisted.ensureDeferred
async def test_health_is_503_while_ssh_is_not_served() -> None:
    agent = Agent()
    ssh = ListeningService(
        reactor=reactor,
        description="tcp:0:interface=127.0.0.1",
        factory=Factory.forProtocol(Protocol),
        what="SSH server",
        required=True,
    )
    agent.status.check(servingCheck(ssh, "SSH"))
    async with serving(agent.site()) as base:
        ssh.startService()
        up = await get(base + "/health")
        await ssh.stopService()
        down = await get(base + "/health")
    assert up.code == 200 and json.loads(up.text)["status"] == "ok"
    assert down.code == 503
    assert down.headers["content-type"] == "application/json"
    report = json.loads(down.text)
    assert (report["status"], report["problems"]) == ("unhealthy", ["not serving SSH"])


@pytest_twisted.ensureDeferred
async def test_ssh_lists_the_live_connections() -> None:
    agent = Agent()
    async with serving(agent.site()) as base:
        empty = await get(base + "/ssh")
        agent.connections.append({"peer": "192.0.2.7:50000", "user": "coder"})
        one = await get(base + "/ssh")
    assertJSON(empty, 200, {"connections": []})
    assertJSON(one, 200, {"connections": [{"peer": "192.0.2.7:50000", "user": "coder"}]})


@pytest_twisted.ensureDeferred
async def test_logs_are_the_recent_lines_as_text() -> None:
    agent = Agent()
    log = Logger(namespace="coderagent.test", observer=LogPublisher(agent.recent))
    for n in range(4):
        log.info("line {n} é", n=n)
    async with serving(agent.site()) as base:
        response = await get(base + "/logs")
    assert response.code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == "".join(agent.recent.lines)
    assert [line.split("coderagent.test: ")[1] for line in response.text.splitlines()] == [
        "line 1 é",
        "line 2 é",
        "line 3 é",
    ]


SECRET_VALUES = [b"sk-live-0123", b"file-secret-4567"]


def manifest() -> agent_pb2.Manifest:
    return agent_pb2.Manifest(
        agent_name="main",
        directory="/src",
        environment_variables={
            "PATH": "/usr/bin",
            "EDITOR": "vim",
            "GITHUB_TOKEN": "hidden-1",
            "aws_secret_access_key": "hidden-2",
            "DB_PASSWORD": "hidden-3",
            "LDAP_PASSWD": "hidden-4",
            "GCP_CREDENTIALS": "hidden-5",
            "SSH_PRIVATE": "hidden-6",
            "API_KEY": "hidden-7",
            "PROXY_AUTHORIZATION": "hidden-8",
        },
        secrets=[
            agent_pb2.WorkspaceSecret(env_name="OPENAI_API_KEY", value=SECRET_VALUES[0]),
            agent_pb2.WorkspaceSecret(file_path="/run/secrets/db", value=SECRET_VALUES[1]),
            agent_pb2.WorkspaceSecret(env_name="EMPTY"),
        ],
    )


def test_the_manifest_is_redacted_and_otherwise_whole() -> None:
    assert redactedManifest(manifest()) == {
        "agent_name": "main",
        "directory": "/src",
        "environment_variables": {
            "PATH": "/usr/bin",
            "EDITOR": "vim",
            "GITHUB_TOKEN": REDACTED,
            "aws_secret_access_key": REDACTED,
            "DB_PASSWORD": REDACTED,
            "LDAP_PASSWD": REDACTED,
            "GCP_CREDENTIALS": REDACTED,
            "SSH_PRIVATE": REDACTED,
            "API_KEY": REDACTED,
            "PROXY_AUTHORIZATION": REDACTED,
        },
        "secrets": [
            {"env_name": "OPENAI_API_KEY", "value": REDACTED},
            {"file_path": "/run/secrets/db", "value": REDACTED},
            {"env_name": "EMPTY"},
        ],
    }


@pytest_twisted.ensureDeferred
async def test_manifest_is_404_until_coderd_sent_one_then_redacted() -> None:
    agent = Agent()
    async with serving(agent.site()) as base:
        before = await get(base + "/manifest")
        agent.manifest = manifest()
        after = await get(base + "/manifest")
    assertJSON(before, 404, {"error": "no manifest from coderd yet"})
    assertJSON(after, 200, redactedManifest(manifest()))
    for value in SECRET_VALUES:
        assert value not in after.body
        assert base64.b64encode(value) not in after.body
    assert b"hidden-" not in after.body


# -- the profiling server -------------------------------------------------------------


class WatchedClock(task.Clock):
    """A ``task.Clock`` that reports each call scheduled and cancelled on it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: defer.DeferredQueue[str] = defer.DeferredQueue()

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        call = super().callLater(delay, f, *args, **kw)
        self.events.put(f"scheduled {delay:g}")
        canceller = call.canceller

        def cancelled(c: Any) -> None:
            canceller(c)
            self.events.put("cancelled")

        call.canceller = cancelled
        return call

    async def next(self) -> str:
        return await self.events.get().addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_the_profiling_index() -> None:
    async with serving(profilingSite(WatchedClock())) as base:
        response = await get(base + "/")
    assert response.code == 200
    assert response.text == "/debug/pprof/threads\n/debug/pprof/profile?seconds=5\n"


def parkedInTheProbe(release: threading.Event) -> None:
    release.wait(TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_threads_dumps_every_threads_stack() -> None:
    release = threading.Event()
    probe = threading.Thread(target=parkedInTheProbe, args=(release,), name="probe")
    probe.start()
    try:
        async with serving(profilingSite(WatchedClock())) as base:
            response = await get(base + "/debug/pprof/threads")
    finally:
        release.set()
        probe.join(TIMEOUT)
    assert response.code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    stacks = response.text.split("\n\n")
    [parked] = [s for s in stacks if s.startswith(f"thread probe ({probe.ident}):\n")]
    assert "in parkedInTheProbe\n" in parked
    reactorThread = f"thread MainThread ({threading.main_thread().ident}):\n"
    [main] = [s for s in stacks if s.startswith(reactorThread)]
    assert "in render_GET\n" in main  # the reactor thread, caught rendering this very page


@pytest_twisted.ensureDeferred
async def test_a_profile_covers_the_reactor_thread_for_the_seconds_asked() -> None:
    clock = WatchedClock()
    async with serving(profilingSite(clock)) as base:
        profiling = request(base + "/debug/pprof/profile?seconds=2")
        assert await clock.next() == "scheduled 2"
        # One at a time.
        busy = await get(base + "/debug/pprof/profile?seconds=1")
        assertJSON(busy, 409, {"error": "a profile is already being taken"})
        clock.advance(2)
        response = await profiling.addTimeout(TIMEOUT, reactor)
        # Finished: the next one may start (default: 5 seconds).
        again = request(base + "/debug/pprof/profile")
        assert await clock.next() == "scheduled 5"
        clock.advance(5)
        assert (await again.addTimeout(TIMEOUT, reactor)).code == 200
    assert response.code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.startswith("cProfile of the reactor thread for 2s\n\n")
    assert "Ordered by: cumulative time" in response.text
    # The profiler sees only the thread it was enabled in; the reactor's did the work.
    calls = re.search(r"^ +(\d+) function calls", response.text, re.M)
    assert calls is not None and int(calls.group(1)) > 0


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_ends_its_profile() -> None:
    clock = WatchedClock()
    async with serving(profilingSite(clock)) as base:
        abandoned = request(base + "/debug/pprof/profile?seconds=30")
        assert await clock.next() == "scheduled 30"
        outcome: list[type[BaseException]] = []
        abandoned.addErrback(lambda f: outcome.append(f.type))
        abandoned.cancel()
        assert await clock.next() == "cancelled"
        assert outcome == [ResponseNeverReceived]
        assert clock.getDelayedCalls() == []
        # Nothing is left running: a new profile starts at once.
        fresh = request(base + "/debug/pprof/profile?seconds=1")
        assert await clock.next() == "scheduled 1"
        clock.advance(1)
        assert (await fresh.addTimeout(TIMEOUT, reactor)).code == 200


@pytest.mark.parametrize("seconds", ["abc", "", "0", "-1", "60.5", "61", "nan", "inf"])
@pytest_twisted.ensureDeferred
async def test_seconds_must_be_a_number_in_0_to_60(seconds: str) -> None:
    clock = WatchedClock()
    async with serving(profilingSite(clock)) as base:
        response = await get(f"{base}/debug/pprof/profile?seconds={seconds}")
    try:
        float(seconds)
    except ValueError:
        assertJSON(response, 400, {"error": "seconds must be a number"})
    else:
        assertJSON(response, 400, {"error": "seconds must be in (0, 60]"})
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_sixty_seconds_is_the_longest_profile() -> None:
    clock = WatchedClock()
    async with serving(profilingSite(clock)) as base:
        longest = request(base + "/debug/pprof/profile?seconds=60")
        assert await clock.next() == "scheduled 60"
        clock.advance(60)
        response = await longest.addTimeout(TIMEOUT, reactor)
    assert response.text.startswith("cProfile of the reactor thread for 60s\n")


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:6060", True),
        ("127.9.8.7:0", True),
        ("localhost:6060", True),
        ("[::1]:6060", True),
        (":6060", False),  # Go: every interface
        ("0.0.0.0:6060", False),
        ("[::]:6060", False),
        ("10.0.0.1:6060", False),
        ("192.168.1.10:6060", False),
        ("example.com:6060", False),
        ("localhost.example.com:6060", False),
        ("[fe80::1%lo]:6060", False),
    ],
)
def test_the_profiler_serves_loopback_addresses_only(address: str, loopback: bool) -> None:
    servers = httpServers(
        reactor=reactor,
        metricsAddress="",
        debugAddress="",
        pprofAddress=address,
        metrics=AgentMetrics(),
        status=AgentStatus(clock=reactor.seconds),
        manifest=lambda: None,
        connections=lambda: [],
        recent=RecentLines(),
    )
    assert [s.what for s in servers] == (["profiling server"] if loopback else [])
