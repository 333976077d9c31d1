# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""ListeningService on real sockets: where it says it listens, bind failures, prepare and drain."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from coderagent.listening import ListeningService, describeAddress
from coderagent.unixsocket import removeStaleSocket

TIMEOUT = 10


class Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\n")
        self.transport.loseConnection()


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


async def greeting(endpoint: Any) -> bytes:
    """What the served protocol says to a real client, read in the test's reactor."""
    proto = Collect()
    await endpoints.connectProtocol(endpoint, proto).addTimeout(TIMEOUT, reactor)
    return await proto.done.addTimeout(TIMEOUT, reactor)


def refused(family: int, address: Any) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


def service(description: str, **kw: Any) -> ListeningService:
    return ListeningService(
        reactor=reactor,
        description=description,
        factory=Factory.forProtocol(Hello),
        what=kw.pop("what", "test server"),
        required=kw.pop("required", True),
        **kw,
    )


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.listening":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def busyPort() -> Iterator[int]:
    """A loopback port something else already listens on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    short = Path(os.path.realpath(tmp_path)) / "s"
    short.mkdir()
    return short


# -- the address in the log line ------------------------------------------------------


def test_describe_address() -> None:
    assert describeAddress(IPv4Address("TCP", "127.0.0.1", 2222)) == "127.0.0.1:2222"
    assert describeAddress(IPv6Address("TCP", "::1", 6060)) == "[::1]:6060"
    assert describeAddress(IPv6Address("TCP", "fe80::1%lo", 1)) == "[fe80::1%lo]:1"
    assert describeAddress(UNIXAddress(b"/run/agent.sock")) == "/run/agent.sock"
    assert describeAddress(UNIXAddress("/run/agent.sock")) == "/run/agent.sock"


@pytest_twisted.ensureDeferred
async def test_tcp_serves_logs_its_port_and_stops(logged: list[str]) -> None:
    s = service("tcp:0:interface=127.0.0.1", what="debug server")
    s.startService()
    assert s.port is not None
    port = s.port.getHost().port
    assert logged == [f"debug server listening on 127.0.0.1:{port}"]
    assert await greeting(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)) == b"hello\n"
    await s.stopService()
    assert s.port is None
    assert refused(socket.AF_INET, ("127.0.0.1", port))


@pytest_twisted.ensureDeferred
async def test_ipv6_is_logged_in_brackets(logged: list[str]) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError as e:
            pytest.skip(f"this machine has no IPv6 loopback to bind (::1: {e.strerror})")
    s = service(r"tcp6:0:interface=\:\:1", what="profiling server")
    s.startService()
    assert s.port is not None
    port = s.port.getHost().port
    assert logged == [f"profiling server listening on [::1]:{port}"]
    assert await greeting(endpoints.TCP6ClientEndpoint(reactor, "::1", port)) == b"hello\n"
    await s.stopService()


@pytest_twisted.ensureDeferred
async def test_unix_socket_is_logged_by_its_path(sockdir: Path, logged: list[str]) -> None:
    path = sockdir / "control.sock"
    s = service(f"unix:{path}", what="control socket")
    s.startService()
    assert logged == [f"control socket listening on {path}"]
    assert await greeting(endpoints.UNIXClientEndpoint(reactor, str(path))) == b"hello\n"
    await s.stopService()
    assert refused(socket.AF_UNIX, str(path))


# -- bind failures ------------------------------------------------------------------


def addressInUse(port: int) -> str:
    return (
        f"cannot listen on tcp:{port}:interface=127.0.0.1: Couldn't listen on "
        f"127.0.0.1:{port}: [Errno {errno.EADDRINUSE}] {os.strerror(errno.EADDRINUSE)}."
    )


def test_a_required_listener_that_cannot_bind_stops_start_up(
    busyPort: int, logged: list[str]
) -> None:
    s = service(f"tcp:{busyPort}:interface=127.0.0.1", what="SSH server", required=True)
    with pytest.raises(SystemExit) as stopped:
        s.privilegedStartService()
    assert stopped.value.code == f"coder-agent: SSH server: {addressInUse(busyPort)}"
    assert s.port is None
    assert logged == []


@pytest_twisted.ensureDeferred
async def test_an_optional_listener_that_cannot_bind_is_logged_and_the_rest_runs(
    busyPort: int, logged: list[str]
) -> None:
    drained: list[str] = []

    def drain() -> defer.Deferred[None]:
        drained.append("drained")
        return defer.succeed(None)

    s = service(
        f"tcp:{busyPort}:interface=127.0.0.1",
        what="Prometheus metrics",
        required=False,
        drain=drain,
    )
    s.startService()  # no exception
    assert s.running and s.port is None
    assert logged == [f"Prometheus metrics: {addressInUse(busyPort)}"]
    await s.stopService()
    assert drained == ["drained"]  # a drain runs whether or not the port was bound
    bare = service(f"tcp:{busyPort}:interface=127.0.0.1", required=False)
    bare.startService()
    assert bare.stopService() is None


def test_an_endpoint_that_does_not_bind_at_once_is_an_error() -> None:
    class Pending:
        def listen(self, factory: Any) -> defer.Deferred[Any]:
            return defer.Deferred()

    s = service("pending:", what="SSH server", endpoint=Pending())  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as stopped:
        s.startService()
    assert stopped.value.code == "coder-agent: SSH server: listening on pending: did not complete"


# -- once, prepare, drain -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_binds_once_per_start_as_twistd_and_as_a_plain_multiservice(
    logged: list[str],
) -> None:
    s = service("tcp:0:interface=127.0.0.1")
    s.privilegedStartService()  # twistd: privileged first, then start
    first = s.port
    s.startService()
    assert s.port is first and len(logged) == 1
    await s.stopService()
    s.startService()  # started again: a new port
    assert s.port is not None and s.port is not first and len(logged) == 2
    await s.stopService()


@pytest_twisted.ensureDeferred
async def test_prepare_runs_once_just_before_binding(sockdir: Path, logged: list[str]) -> None:
    path = sockdir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))  # the stale file a crash leaves; binding over it fails
    calls: list[bool] = []

    def prepare() -> None:
        calls.append(os.path.exists(path))
        removeStaleSocket(str(path), "control socket")

    s = service(
        str(path),
        what="control socket",
        endpoint=endpoints.UNIXServerEndpoint(reactor, str(path)),
        prepare=prepare,
    )
    s.privilegedStartService()
    s.startService()
    assert calls == [True]
    assert logged == [f"control socket listening on {path}"]
    assert await greeting(endpoints.UNIXClientEndpoint(reactor, str(path))) == b"hello\n"
    await s.stopService()


@pytest_twisted.ensureDeferred
async def test_drain_runs_once_the_port_is_closed_and_stopping_waits_for_it() -> None:
    drainCalled: defer.Deferred[bool] = defer.Deferred()
    goodbye: defer.Deferred[None] = defer.Deferred()

    def drain() -> defer.Deferred[None]:
        # Reported on the next turn, once this drain's result is in the stop chain.
        reactor.callLater(0, drainCalled.callback, refused(socket.AF_INET, ("127.0.0.1", port)))
        return goodbye

    s = service("tcp:0:interface=127.0.0.1", drain=drain)
    s.startService()
    assert s.port is not None
    port = s.port.getHost().port
    stopping = s.stopService()
    assert stopping is not None
    stopped: list[object] = []
    stopping.addCallback(stopped.append)
    # No new connection is accepted by the time the drain starts...
    assert await drainCalled.addTimeout(TIMEOUT, reactor) is True
    # ...and stopping waits for the drain to finish.
    assert stopped == []
    goodbye.callback(None)
    assert stopped == [None]
