"""Socket files the agent serves: a stale one is replaced, a live one and a non-socket are not."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from coderagent.unixsocket import answers, removeStaleSocket


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
