# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The lifecycle against coderd-dev's server side: what is reported, when, and in what order."""

from __future__ import annotations

import io
from typing import Any

import pytest_twisted
from twisted.application.service import Service
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher

from coderagent.agentlifecycle import DRAIN_TIMEOUT, AgentLifecycle
from coderagent.coderd.client import CoderdClient
from coderagent.coderd.lifecycle import Reporter
from coderagent.devcoderd.api import DevAgentAPI
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from tests.localcoderd import TOKEN, Coderd, Loopback

TIMEOUT = 15
State = agent_pb2.Lifecycle.State


class Recording(Service):
    """A Twisted service that notes when it is stopped, in a shared list."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    def stopService(self) -> None:
        super().stopService()
        self.events.append(f"{self.name} stopped")


def agent(
    port: int, events: list[str], home: str = "/home/coder"
) -> tuple[CoderdClient, Reporter, AgentLifecycle]:
    c = CoderdClient(url=f"http://127.0.0.1:{port}", token=TOKEN, reactor=reactor)
    expand = {"~/project": f"{home}/project", "": ""}.get
    reporter = Reporter(c, lambda d: expand(d) or d, reactor)
    reporter.setServiceParent(c)
    life = AgentLifecycle(reporter=reporter, ssh=Recording("ssh", events), coderd=c, clock=reactor)
    return c, reporter, life


@pytest_twisted.ensureDeferred
async def test_every_connection_reports_startup_and_transitions_go_once_in_order() -> None:
    server = Coderd(Workspace(directory="~/project"))
    port = await server.start()
    events: list[str] = []
    c, reporter, life = agent(port, events)
    manifests: list[tuple[str, bool]] = []
    second: defer.Deferred[None] = defer.Deferred()

    def gotManifest(manifest: agent_pb2.Manifest, first: bool) -> None:
        manifests.append((manifest.agent_name, first))
        if len(manifests) == 2:
            second.callback(None)

    reporter.onManifest(gotManifest)
    life.startService()
    try:
        await server.api.when(lambda api: len(api.lifecycle) >= 2).addTimeout(TIMEOUT, reactor)
        await reporter.report()
        assert server.api.lifecycle == [State.STARTING, State.READY]
        assert [s.expanded_directory for s in server.api.startups] == ["/home/coder/project"]
        # coderd goes away and comes back: the manifest is fetched and the startup
        # reported again (as upstream's handleManifest does); the lifecycle is not.
        await server.stop()
        await server.start(port)
        await second.addTimeout(TIMEOUT, reactor)
        assert manifests == [("main", True), ("main", False)]
        assert len(server.api.startups) == 2
        assert server.api.lifecycle == [State.STARTING, State.READY]
    finally:
        await life.stopService()
        await server.stop()
    assert server.api.lifecycle == [State.STARTING, State.READY, State.SHUTTING_DOWN, State.OFF]
    assert events == ["ssh stopped"]
    assert not c.running and not c.connected


@pytest_twisted.ensureDeferred
async def test_an_empty_directory_is_reported_empty_as_upstream_does() -> None:
    server = Coderd(Workspace(directory=""))
    port = await server.start()
    _c, _reporter, life = agent(port, [])
    life.startService()
    try:
        await server.api.when(lambda api: api.startups).addTimeout(TIMEOUT, reactor)
        assert server.api.startups[0].expanded_directory == ""
    finally:
        await life.stopService()
        await server.stop()


def test_transitions_only_go_forward() -> None:
    c = CoderdClient(url="http://coderd.test", token=TOKEN, reactor=reactor)
    reporter = Reporter(c, str, reactor)  # never started: transitions are only queued
    assert reporter.transition(State.STARTING)
    assert reporter.transition(State.READY)
    assert not reporter.transition(State.START_ERROR)  # a start outcome after READY
    assert not reporter.transition(State.READY)
    assert reporter.transition(State.SHUTTING_DOWN)
    assert reporter.state == State.SHUTTING_DOWN


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_reached_coderd_stops_at_once() -> None:
    events: list[str] = []
    _c, reporter, life = agent(9, events)  # nothing listens on port 9
    life.startService()
    await life.stopService()
    assert events == ["ssh stopped"] and reporter.state == State.CREATED


def test_the_drain_gives_up_after_its_bound() -> None:
    """SIGTERM while coderd does not answer: the shutdown gives up after 5 s,
    not after the 30 s the report on its way was allowed."""
    clock = task.Clock()
    api = DevAgentAPI(Workspace(), out=io.StringIO())
    loopback = Loopback(DevCoderdFactory(api, TOKEN, clock), clock)
    c = CoderdClient(url="http://coderd.test", token=TOKEN, reactor=clock, transport=loopback)
    reporter = Reporter(c, str, clock)
    reporter.setServiceParent(c)
    events: list[str] = []
    life = AgentLifecycle(reporter=reporter, ssh=Recording("ssh", events), coderd=c, clock=clock)
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.agentlifecycle":
            warnings.append(formatEvent(event))

    life.startService()
    [pump] = loopback.pumps
    while api.startup is None:
        assert pump.pump()
    pump.pump()  # the agent learns its startup was taken and sends STARTING; coderd is silent
    assert api.lifecycle == [] and reporter.reportedState == "CREATED"
    globalLogPublisher.addObserver(observe)
    try:
        stopping = life.stopService()
        assert events == ["ssh stopped"]
        clock.advance(DRAIN_TIMEOUT - 1)
        assert not stopping.called
        clock.advance(1)
        assert warnings[-1] == (
            "shutting down: coderd did not take the final lifecycle state and the queued "
            "logs within 5s; disconnecting anyway"
        )
    finally:
        globalLogPublisher.removeObserver(observe)
    pump.flush()  # the connection closes
    assert stopping.called
