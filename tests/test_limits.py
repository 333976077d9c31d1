# Twisted is partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False
"""Per-connection limits and the descriptor reserve: decided in one place, refused once in the log.

The decisions are checked here against plain counts; that every path that
opens something asks them is checked with the real handlers (forwarding
below, sessions and channels in ``tests/integration/test_limits.py``).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.conch.ssh.common import NS
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

from coderagent.descriptors import (
    DESCRIPTOR_RESERVE,
    DescriptorReserve,
    OpenFileLimit,
    openDescriptors,
)
from coderagent.observe.metrics import SSH_LIMITS, AgentMetrics
from coderagent.policy import Policy
from coderagent.ssh.forwarding.sockets import ForwardedFactory
from coderagent.ssh.limits import (
    MAX_CHANNELS,
    MAX_ENV_BYTES,
    MAX_ENV_VARIABLE,
    MAX_REVERSE_FORWARDS,
    MAX_SESSIONS,
    ConnectionLimits,
    SSHLimits,
)
from tests.fakes import FakeAvatar, u32


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def warningsText(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["log_format"].format(**e) for e in events if e.get("log_level") == LogLevel.warn
    ]


def limitsFor(
    metrics: AgentMetrics, descriptors: DescriptorReserve | None = None, **caps: int
) -> ConnectionLimits:
    return ConnectionLimits(
        SSHLimits(**caps), peer=lambda: "192.0.2.7:50000", metrics=metrics, descriptors=descriptors
    )


def refusedCount(metrics: AgentMetrics, limit: str) -> float | None:
    return metrics.value("agent_ssh_limit_refused_total", limit=limit)


def test_defaults_are_sshd_like() -> None:
    assert SSHLimits() == SSHLimits(
        maxSessions=10, maxChannels=1024, maxReverseForwards=256, maxEnvBytes=256 * 1024
    )
    assert (MAX_SESSIONS, MAX_CHANNELS, MAX_REVERSE_FORWARDS, MAX_ENV_BYTES) == (
        10,
        1024,
        256,
        262144,
    )


def test_sessions_and_channels(logged: list[dict[str, Any]]) -> None:
    metrics = AgentMetrics()
    limits = limitsFor(metrics, maxSessions=2, maxChannels=3)
    assert limits.session(channels=0, sessions=0) is None
    assert limits.session(channels=1, sessions=1) is None
    for _ in range(5):  # a client hammering at the cap
        assert limits.session(channels=2, sessions=2) == "too many sessions on this connection"
    assert limits.forwardChannel(channels=2) is None
    assert limits.forwardChannel(channels=3) == "too many channels on this connection"
    assert limits.session(channels=3, sessions=0) == "too many channels on this connection"
    assert warningsText(logged) == [
        "192.0.2.7:50000 reached its limit of 2 open sessions (--ssh-max-sessions); "
        "refusing more (logged once per connection)",
        "192.0.2.7:50000 reached its limit of 3 open channels (--ssh-max-channels); "
        "refusing more (logged once per connection)",
    ]
    assert refusedCount(metrics, "sessions") == 5
    assert refusedCount(metrics, "channels") == 2


def test_reverse_forwards_and_env(logged: list[dict[str, Any]]) -> None:
    metrics = AgentMetrics()
    limits = limitsFor(metrics, maxReverseForwards=2, maxEnvBytes=100)
    assert limits.reverseForward(listeners=1) is None
    assert limits.reverseForward(listeners=2) == "too many reverse forwards on this connection"
    assert limits.env(variables=0, used=60, adding=40) is None  # exactly the cap
    assert limits.env(variables=0, used=60, adding=41) == "too much environment for this session"
    assert limits.env(variables=0, used=0, adding=101) is not None
    assert len(warningsText(logged)) == 2
    assert refusedCount(metrics, "reverse_forwards") == 1
    assert refusedCount(metrics, "env_bytes") == 2


def test_env_variables_are_counted_too(logged: list[dict[str, Any]]) -> None:
    metrics = AgentMetrics()
    limits = limitsFor(metrics)
    assert limits.env(variables=1023, used=0, adding=1) is None
    assert limits.env(variables=1024, used=0, adding=1) == "too much environment for this session"
    assert warningsText(logged) == [
        "192.0.2.7:50000 reached its limit of 1024 env variables in a session (fixed); "
        "refusing more (logged once per connection)"
    ]
    assert refusedCount(metrics, "env_bytes") == 1


def test_one_env_variable_must_fit_execve(logged: list[dict[str, Any]]) -> None:
    """A longer NAME=value would make the session's process fail to start (E2BIG)."""
    metrics = AgentMetrics()
    limits = limitsFor(metrics, maxEnvBytes=1 << 20)
    assert MAX_ENV_VARIABLE == 131071
    assert limits.env(variables=0, used=0, adding=MAX_ENV_VARIABLE - 1) is None  # with "=": 131071
    for _ in range(3):
        assert limits.env(variables=0, used=0, adding=MAX_ENV_VARIABLE) == (
            "too much environment for this session"
        )
    assert warningsText(logged) == [
        "192.0.2.7:50000 reached its limit of 131071 bytes in one env variable (execve's); "
        "refusing more (logged once per connection)"
    ]
    assert refusedCount(metrics, "env_bytes") == 3


def test_each_connection_logs_its_own_refusals(logged: list[dict[str, Any]]) -> None:
    metrics = AgentMetrics()
    first, second = (limitsFor(metrics, maxSessions=1) for _ in range(2))
    for limits in (first, second, first, second):
        assert limits.session(channels=1, sessions=1) is not None
    assert len(warningsText(logged)) == 2
    assert refusedCount(metrics, "sessions") == 4


def test_the_descriptor_reserve_holds_forwards_not_sessions(logged: list[dict[str, Any]]) -> None:
    metrics = AgentMetrics()
    inUse = [900]
    reserve = DescriptorReserve(64, limit=lambda: 1000, inUse=lambda: inUse[0])
    limits = limitsFor(metrics, reserve)
    assert limits.forwardChannel(channels=0) is None  # 100 free
    inUse[0] = 936
    assert reserve.free() == 64 and not reserve.allows()
    assert limits.forwardChannel(channels=0) == "the agent is short of file descriptors"
    assert limits.reverseForward(listeners=0) == "the agent is short of file descriptors"
    assert limits.session(channels=0, sessions=0) is None  # what the reserve is for
    assert warningsText(logged) == [
        "192.0.2.7:50000: only 64 file descriptors are left and 64 are kept for logins, "
        "sessions and coderd; refusing new forwards and forwarded connections "
        "(logged once per connection)"
    ]
    assert refusedCount(metrics, "descriptors") == 2
    # Where the system cannot say how many are open, nothing is refused.
    assert DescriptorReserve(64, limit=lambda: 10, inUse=lambda: None).allows()


def test_every_limit_is_exported_from_zero() -> None:
    text = AgentMetrics().exposition().decode()
    for limit in SSH_LIMITS:
        assert f'agent_ssh_limit_refused_total{{limit="{limit}"}} 0.0' in text


def test_open_descriptors_counts_this_process() -> None:
    before = openDescriptors()
    assert before is not None and before > 0
    with open(__file__) as _, open(__file__) as _:
        assert openDescriptors() == before + 2
    assert openDescriptors() == before
    assert DescriptorReserve().reserve == DESCRIPTOR_RESERVE == 64


# -- the open file limit ---------------------------------------------------------


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process, whose limit is ours to change."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = textwrap.dedent(
        """
        import resource
        from coderagent.descriptors import raiseOpenFileLimit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raiseOpenFileLimit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        print(raiseOpenFileLimit())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = done.stdout.splitlines()
    assert first == f"(256, {hard}, {hard}) ({hard}, {hard})"
    assert second == f"({hard}, {hard}, {hard})"  # already there: nothing to do


@pytest.mark.parametrize(
    ("result", "level", "text"),
    [
        ((1024, 524288, 524288), LogLevel.info, "raised the open file limit from 1024 to 524288 "
         "(the hard limit)"),
        ((4096, 4096, 4096), LogLevel.info, "open file limit: 4096 (the hard limit)"),
        ((1024, 1024, resource.RLIM_INFINITY), LogLevel.warn,
         "open file limit: 1024; it could not be raised to the hard limit unlimited"),
    ],
)
def test_the_limit_is_logged_once_at_start_up(
    logged: list[dict[str, Any]], result: tuple[int, int, int], level: LogLevel, text: str
) -> None:
    calls: list[None] = []

    def raiseLimit() -> tuple[int, int, int]:
        calls.append(None)
        return result

    service = OpenFileLimit(raiseLimit)
    service.privilegedStartService()  # twistd: privileged first, then start
    service.startService()
    assert len(calls) == 1
    [event] = [e for e in logged if e.get("log_namespace") == "coderagent.descriptors"]
    assert (event["log_level"], event["log_format"].format(**event)) == (level, text)


# -- forwarding asks the limits ----------------------------------------------------


def test_reverse_forwards_beyond_the_cap_bind_nothing(
    logged: list[dict[str, Any]], tmp_path: Path
) -> None:
    reactor = MemoryReactor()
    metrics = AgentMetrics()
    avatar = FakeAvatar(Policy(), reactor, limitsFor(metrics, maxReverseForwards=2))
    forward = avatar.globalRequests[b"tcpip-forward"]
    assert forward(NS(b"127.0.0.1") + u32(0)) == (1, u32(0))
    assert forward(NS(b"127.0.0.1") + u32(2222)) == 1
    for port in range(10):
        assert forward(NS(b"127.0.0.1") + u32(3000 + port)) == 0
    unix = tmp_path / "new" / "r.sock"
    assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(bytes(unix))) == 0
    assert not unix.parent.exists()  # refused before anything is created
    assert len(reactor.tcpServers) == 2 and reactor.unixServers == []
    assert warningsText(logged) == [
        "192.0.2.7:50000 reached its limit of 2 reverse forwards (--ssh-max-reverse-forwards); "
        "refusing more (logged once per connection)"
    ]
    assert refusedCount(metrics, "reverse_forwards") == 11


def test_a_reverse_listener_closes_connections_beyond_the_channel_cap() -> None:
    metrics = AgentMetrics()
    avatar = FakeAvatar(Policy(), MemoryReactor(), limitsFor(metrics, maxChannels=1))
    factory = ForwardedFactory(avatar.forwards, cast(Any, None), "127.0.0.1")
    avatar.conn.opened.append(cast(Any, ("channel", b"")))  # one channel open
    assert factory.buildProtocol(None) is None  # refused: Twisted closes the socket
    assert refusedCount(metrics, "channels") == 1
