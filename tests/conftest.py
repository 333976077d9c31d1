"""Shared fixtures: client keys and a running agent for integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted

from tests.agentproc import Agent, ClientKeys, newTracebacks, runningAgent
from tests.localcoderd import Coderd


@pytest.fixture(autouse=True)
def noTracebackInOurLogs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which a process of ours (agent, coderd-dev) logged a traceback.

    Client input must never produce one, and a bug must not pass unseen.  A
    test that provokes one on purpose says why with
    ``@pytest.mark.allows_traceback("why")``.
    """
    yield
    found = newTracebacks()
    if found and request.node.get_closest_marker("allows_traceback") is None:
        pytest.fail("\n".join(found), pytrace=False)


@pytest.fixture(scope="session")
def clientKeys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    return ClientKeys.create(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="module")
def agent(clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent with default options, shared by a test module."""
    with runningAgent(clientKeys, tmp_path_factory.mktemp("agent")) as running:
        yield running


@pytest.fixture(scope="module")
def blockingAgent(
    clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    """An agent started with --block-file-transfer."""
    with runningAgent(
        clientKeys, tmp_path_factory.mktemp("agent-block"), ["--block-file-transfer"]
    ) as running:
        yield running


@pytest_twisted.async_yield_fixture
async def coderd() -> AsyncIterator[Coderd]:
    """coderd-dev's server side in the test's reactor, on an ephemeral port."""
    server = Coderd()
    await server.start()
    yield server
    await server.stop()
