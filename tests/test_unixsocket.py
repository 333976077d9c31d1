"""Socket files the agent serves: a stale one is replaced, a live one and a non-socket are not."""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from coderagent.unixsocket import (
    SUN_PATH_MAX,
    Occupant,
    PrivateUnixPort,
    ServedSockets,
    agentSocket,
    answers,
    fitsSunPath,
    occupant,
    removeStale,
    removeStaleSocket,
)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """What this module logs while the test runs."""
    lines: list[str] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_namespace") == "coderagent.unixsocket":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    """A directory short enough for sun_path (108 bytes), whatever tmp_path is."""
    short = Path(os.path.realpath(tmp_path)) / "s"
    short.mkdir()
    return short


def staleSocket(path: Path) -> None:
    """A socket file nobody listens on: what a crashed agent leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    assert path.is_socket()


@pytest.fixture
def live(sockdir: Path) -> Iterator[Path]:
    """A socket another process (here: this test) is listening on."""
    path = sockdir / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen()
        yield path


def test_answers_only_where_something_listens(sockdir: Path, live: Path) -> None:
    stale = sockdir / "stale.sock"
    staleSocket(stale)
    assert answers(str(live)) is True
    assert answers(str(stale)) is False
    assert answers(str(sockdir / "absent.sock")) is False


def test_a_stale_socket_is_removed_quietly(sockdir: Path, logged: list[str]) -> None:
    path = sockdir / "stale.sock"
    staleSocket(path)
    removeStaleSocket(str(path), "control socket")
    assert not os.path.lexists(path)
    assert logged == []
    # The path can be bound again, which is the point.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))


def test_a_live_socket_is_kept_and_the_refusal_logged(live: Path, logged: list[str]) -> None:
    removeStaleSocket(str(live), "control socket")
    assert live.is_socket()
    assert answers(str(live))
    assert logged == [f"control socket: {live} is in use by another process; not replacing it"]


@pytest.mark.parametrize("kind", ["file", "directory", "symlink to a stale socket"])
def test_what_is_not_a_socket_is_never_removed(
    sockdir: Path, logged: list[str], kind: str
) -> None:
    path = sockdir / "thing"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        target = sockdir / "target.sock"
        staleSocket(target)
        path.symlink_to(target)
    removeStaleSocket(str(path), "boundary socket")
    assert os.path.lexists(path)
    if kind == "file":
        assert path.read_text() == "precious"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink() and (sockdir / "target.sock").is_socket()
    assert logged == []


def test_nothing_at_the_path_is_nothing_to_do(sockdir: Path, logged: list[str]) -> None:
    removeStaleSocket(str(sockdir / "absent.sock"), "control socket")
    removeStaleSocket(str(sockdir / "no-dir" / "absent.sock"), "control socket")
    assert logged == []
    assert sorted(p.name for p in sockdir.iterdir()) == []


# -- what is at a path ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("absent", Occupant.NOTHING),
        ("stale", Occupant.STALE_SOCKET),
        ("live", Occupant.LIVE_SOCKET),
        ("file", Occupant.OTHER),
        ("fifo", Occupant.OTHER),
        ("directory", Occupant.DIRECTORY),
        ("symlink to a stale socket", Occupant.SYMLINK),
        ("dangling symlink", Occupant.SYMLINK),
    ],
)
def test_occupant_names_what_is_at_the_path(
    sockdir: Path, live: Path, kind: str, expected: Occupant
) -> None:
    path = sockdir / "thing"
    if kind == "stale":
        staleSocket(path)
    elif kind == "live":
        path = live
    elif kind == "file":
        path.write_text("precious")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink to a stale socket":
        staleSocket(sockdir / "target.sock")
        path.symlink_to(sockdir / "target.sock")
    elif kind == "dangling symlink":
        path.symlink_to(sockdir / "nowhere")
    assert occupant(str(path)) is expected
    assert expected.replaceable == (kind in ("absent", "stale"))


def test_remove_stale_removes_only_a_stale_socket(sockdir: Path, live: Path) -> None:
    stale = sockdir / "stale.sock"
    staleSocket(stale)
    assert removeStale(str(stale)) is Occupant.STALE_SOCKET
    assert not os.path.lexists(stale)
    assert removeStale(str(stale)) is Occupant.NOTHING
    assert removeStale(str(live)) is Occupant.LIVE_SOCKET and answers(str(live))
    regular = sockdir / "file"
    regular.write_text("precious")
    assert removeStale(str(regular)) is Occupant.OTHER and regular.read_text() == "precious"


def test_a_listener_with_a_full_backlog_is_in_use_and_the_probe_does_not_wait(
    sockdir: Path,
) -> None:
    path = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(0)  # never accepts: the backlog fills at once
        queued = []
        try:
            while True:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                queued.append(client)
                client.connect(str(path))
        except BlockingIOError:
            pass
        started = time.monotonic()
        assert answers(str(path)) is True
        assert occupant(str(path)) is Occupant.LIVE_SOCKET
        assert time.monotonic() - started < 0.5  # the old probe waited a second
        for client in queued:
            client.close()


def test_a_socket_this_process_may_not_connect_to_is_not_stale(sockdir: Path) -> None:
    """Only a refused connect proves a socket stale; EACCES (or any other error) does not."""
    path = sockdir / "locked.sock"
    staleSocket(path)
    os.chmod(path, 0)
    if os.geteuid() == 0:
        # root ignores the mode: a refused connect, so stale, which is right for root.
        assert answers(str(path)) is False
    else:
        assert answers(str(path)) is True
        assert occupant(str(path)) is Occupant.LIVE_SOCKET


# -- sun_path ---------------------------------------------------------------------------


def test_the_longest_socket_path_leaves_room_for_the_nul(sockdir: Path) -> None:
    assert SUN_PATH_MAX == (107 if sys.platform.startswith("linux") else 103)
    assert fitsSunPath("/" + "x" * (SUN_PATH_MAX - 1))
    assert not fitsSunPath("/" + "x" * SUN_PATH_MAX)
    assert not fitsSunPath("")
    # Bytes, not characters: é is two.
    assert fitsSunPath("/" + "é" * ((SUN_PATH_MAX - 1) // 2))
    assert not fitsSunPath("/" + "é" * (SUN_PATH_MAX // 2 + 1))
    longest = sockdir / ("x" * (SUN_PATH_MAX - len(os.fsencode(sockdir)) - 1))
    assert len(os.fsencode(longest)) == SUN_PATH_MAX and fitsSunPath(str(longest))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(longest))


# -- the agent's own sockets ----------------------------------------------------------


def test_served_sockets_match_however_the_path_is_spelled(sockdir: Path) -> None:
    served = ServedSockets()
    path = sockdir / "boundary-audit.sock"
    served.add(str(path), "boundary log proxy")
    link = sockdir / "link"
    link.symlink_to(sockdir)
    for spelling in (
        str(path),
        f"{sockdir}/./boundary-audit.sock",
        f"{sockdir}//boundary-audit.sock",
        f"{sockdir}/sub/../boundary-audit.sock",
        str(link / "boundary-audit.sock"),
    ):
        assert served.servedAs(spelling) == "boundary log proxy", spelling
    assert served.servedAs(str(sockdir / "other.sock")) is None
    # A hard link to the socket file is the same socket.
    staleSocket(path)
    os.link(path, sockdir / "hard.sock")
    assert served.servedAs(str(sockdir / "hard.sock")) == "boundary log proxy"


def test_the_socket_file_is_born_private_whatever_the_umask(sockdir: Path) -> None:
    """The mode is on the socket before bind creates the file, not chmod'ed after."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    path = sockdir / "private.sock"
    port = PrivateUnixPort(os.fsencode(path), Factory(), mode=0o600, reactor=reactor)
    old = os.umask(0)
    try:
        skt = port.createInternetSocket()
        try:
            skt.bind(str(path))  # what unix.Port does next; its chmod comes after
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        finally:
            skt.close()
    finally:
        os.umask(old)


@pytest_twisted.ensureDeferred
async def test_agent_socket_registers_its_path_and_serves_it_0600(sockdir: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    served = ServedSockets()
    path = sockdir / "agent.sock"
    staleSocket(path)
    service = agentSocket(
        reactor=reactor,
        path=str(path),
        factory=Factory.forProtocol(Protocol),
        what="control socket",
        served=served,
    )
    # Registered when built, before anything is bound.
    assert served.servedAs(str(path)) == "control socket"
    old = os.umask(0)
    try:
        service.startService()
    finally:
        os.umask(old)
    try:
        assert service.port is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert answers(str(path))
    finally:
        await service.stopService()
