# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""The control socket and ``coder-agent status``, over a real Unix socket in the test's reactor.

The server is built as the agent builds it (``control.server.controlSocket``: mode 0600,
a stale socket replaced); the CLI's ``main`` runs in a thread, as the
separate process it normally is would, while the reactor answers.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from coderagent import __version__
from coderagent.control import cli
from coderagent.control.server import controlSocket
from coderagent.files import PRIVATE_SOCKET_MODE
from coderagent.listening import ListeningService
from coderagent.observe.status import AgentStatus
from coderagent.unixsocket import ServedSockets

TIMEOUT = 10


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def agentStatus() -> AgentStatus:
    clock = Clock()
    status = AgentStatus(clock=clock)
    status.add("ssh", lambda: {"connections": 2})
    status.add("coderd", lambda: {"url": "http://127.0.0.1:9", "connected": False})
    clock.now += 12.3456
    return status


def expectedReport() -> dict[str, Any]:
    return {
        "status": "ok",
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": 12.346,
        "ssh": {"connections": 2},
        "coderd": {"url": "http://127.0.0.1:9", "connected": False},
    }


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    short = Path(os.path.realpath(tmp_path)) / "s"
    short.mkdir()
    return short


@pytest_twisted.async_yield_fixture
async def control(sockdir: Path) -> AsyncIterator[Path]:
    """The agent's control socket, serving ``agentStatus()``."""
    path = sockdir / "control.sock"
    service = controlSocket(str(path), reactor, agentStatus(), served=ServedSockets())
    service.startService()
    assert service.port is not None
    yield path
    await service.stopService()


class Exchange(Protocol):
    """Sends ``request`` and collects everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.received)


async def exchange(path: Path, request: bytes) -> bytes:
    """The server's whole answer to ``request``; the server must close the connection."""
    proto = Exchange(request)
    endpoint = endpoints.UNIXClientEndpoint(reactor, str(path))
    await endpoints.connectProtocol(endpoint, proto).addTimeout(TIMEOUT, reactor)
    return await proto.closed.addTimeout(TIMEOUT, reactor)


# -- the server -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_is_one_json_line_then_the_connection_closes(control: Path) -> None:
    answer = await exchange(control, b"status\n")
    assert answer == json.dumps(expectedReport(), sort_keys=True).encode() + b"\n"


@pytest_twisted.ensureDeferred
async def test_ping_also_with_crlf(control: Path) -> None:
    assert await exchange(control, b"ping\n") == b'{"ok": true}\n'
    assert await exchange(control, b"ping\r\n") == b'{"ok": true}\n'


@pytest_twisted.ensureDeferred
async def test_an_unknown_command_is_named_in_the_error(control: Path) -> None:
    answer = await exchange(control, b"stats\n")
    assert json.loads(answer) == {"error": "unknown command 'stats'; try status or ping"}


@pytest_twisted.ensureDeferred
async def test_one_request_per_connection(control: Path) -> None:
    assert await exchange(control, b"ping\nstatus\n") == b'{"ok": true}\n'


@pytest_twisted.ensureDeferred
async def test_a_request_line_is_at_most_1_kib(control: Path) -> None:
    longest = b"x" * 1024
    answer = json.loads(await exchange(control, longest + b"\n"))
    assert answer == {"error": f"unknown command {'x' * 1024!r}; try status or ping"}
    # Longer is refused without waiting for a newline that may never come.
    assert await exchange(control, longest + b"x") == b'{"error": "request too long"}\n'


@pytest_twisted.ensureDeferred
async def test_the_socket_is_0600(control: Path) -> None:
    assert control.stat().st_mode & 0o777 == PRIVATE_SOCKET_MODE == 0o600


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") in ("coderagent.unixsocket", "coderagent.listening"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_stale_control_socket_is_replaced(sockdir: Path, logged: list[str]) -> None:
    path = sockdir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))
    service = controlSocket(str(path), reactor, agentStatus(), served=ServedSockets())
    service.startService()
    try:
        assert logged == [f"control socket listening on {path}"]
        assert await exchange(path, b"ping\n") == b'{"ok": true}\n'
    finally:
        await service.stopService()


def test_a_live_control_socket_is_left_alone_and_the_agent_runs_on(
    sockdir: Path, logged: list[str]
) -> None:
    path = sockdir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        service: ListeningService = controlSocket(
            str(path), reactor, agentStatus(), served=ServedSockets()
        )
        service.startService()  # optional: no SystemExit
        assert service.port is None
        assert logged[0] == f"control socket: {path} is in use by another process; not replacing it"
        assert logged[1].startswith(f"control socket: cannot listen on {path}: ")
        assert len(logged) == 2
        assert path.is_socket()


# -- the CLI --------------------------------------------------------------------------


async def runCLI(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``coder-agent <argv>`` in a thread, while this reactor serves: exit status, out, err."""
    code = await threads.deferToThread(cli.main, list(argv)).addTimeout(TIMEOUT, reactor)
    out, err = capsys.readouterr()
    return code, out, err


@pytest_twisted.ensureDeferred
async def test_cli_status_prints_the_report_indented(
    control: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await runCLI(capsys, "status", "--socket", str(control))
    assert (code, err) == (0, "")
    assert out == json.dumps(expectedReport(), indent=2, sort_keys=True) + "\n"


@pytest_twisted.ensureDeferred
async def test_cli_ping_finds_the_socket_in_the_environment(
    control: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODER_AGENT_SOCKET_PATH", str(control))
    assert await runCLI(capsys, "ping") == (0, '{\n  "ok": true\n}\n', "")


@pytest_twisted.ensureDeferred
async def test_cli_without_an_agent_exits_1(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = sockdir / "missing.sock"
    assert await runCLI(capsys, "ping", "--socket", str(missing)) == (
        1,
        "",
        f"coder-agent: no agent answered on {missing}: [Errno 2] No such file or directory\n",
    )
    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(stale))
    assert await runCLI(capsys, "status", "--socket", str(stale)) == (
        1,
        "",
        f"coder-agent: no agent answered on {stale}: [Errno 111] Connection refused\n",
    )


class Answer(Protocol):
    """A peer that reads the request line, answers ``factory.answer`` and closes.

    (Closing with the request unread would reset the connection instead.)
    """

    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"\n"):
            self.transport.write(self.factory.answer)
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("answer", "out", "err"),
    [
        (b'{"error": "busy"}\n', '{\n  "error": "busy"\n}\n', ""),
        (b"", "", "Expecting value: line 1 column 1 (char 0)"),
        (b"not json\n", "", "Expecting value: line 1 column 1 (char 0)"),
        (
            b'{"status": "unhealthy", "problems": ["not serving SSH"]}\n',
            '{\n  "problems": [\n    "not serving SSH"\n  ],\n  "status": "unhealthy"\n}\n',
            "",
        ),
    ],
    ids=["error answer", "closed without answering", "not JSON", "unhealthy"],
)
async def test_cli_exits_1_unless_the_answer_is_good(
    sockdir: Path, capsys: pytest.CaptureFixture[str], answer: bytes, out: str, err: str
) -> None:
    path = sockdir / "odd.sock"
    factory = Factory.forProtocol(Answer)
    factory.answer = answer  # type: ignore[attr-defined]
    port = reactor.listenUNIX(str(path), factory)
    try:
        code, printed, complaint = await runCLI(capsys, "status", "--socket", str(path))
    finally:
        await port.stopListening()
    assert (code, printed) == (1, out)
    assert complaint == (f"coder-agent: no agent answered on {path}: {err}\n" if err else "")


def test_cli_refuses_unknown_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["stop"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "argument command: invalid choice: 'stop' (choose from" in err


def test_ask_gives_up_after_its_timeout(sockdir: Path) -> None:
    path = sockdir / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()  # connects, never answers
        with pytest.raises(TimeoutError):
            cli.ask(str(path), "status", timeout=0.2)
