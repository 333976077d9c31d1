"""Login messages: the banners' and the MOTD's exact bytes, hushlogin, and the banners' refresh."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from twisted.internet import task

from coderagent.coderd.banners import REFRESH_INTERVAL, AnnouncementBanners
from coderagent.coderd.client import CoderdClient
from coderagent.devcoderd.api import DevAgentAPI
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.workspace import Workspace
from coderagent.pb import agent_pb2
from coderagent.ssh.motd import (
    MAX_MOTD_BYTES,
    LoginMessage,
    bannerText,
    motdText,
    withCarriageReturns,
)
from coderagent.workspaceenv import UserInfo, WorkspaceEnvironment
from tests.localcoderd import TOKEN, Loopback


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (b"", b""),
        (b"one", b"one\r\n"),
        (b"one\n", b"one\r\n"),
        (b"one\r\ntwo\n\n", b"one\r\ntwo\r\n\r\n"),
        (b"\n", b"\r\n"),
        (b"a\rb\n", b"a\rb\r\n"),  # only a \r before the newline goes
    ],
)
def test_lines_end_with_a_carriage_return_as_upstream_writes_them(
    text: bytes, shown: bytes
) -> None:
    assert withCarriageReturns(text) == shown


def test_only_enabled_banners_with_a_message_are_shown_trimmed() -> None:
    banners = [
        agent_pb2.BannerConfig(enabled=True, message="\n  Upgrade at 5pm \n"),
        agent_pb2.BannerConfig(enabled=False, message="hidden"),
        agent_pb2.BannerConfig(enabled=True, message=""),
        agent_pb2.BannerConfig(enabled=True, message="**Markdown** stays raw"),
    ]
    assert bannerText(banners) == b"Upgrade at 5pm\r\n\r\n**Markdown** stays raw\r\n\r\n"


def test_the_motd_is_skipped_with_hushlogin_missing_or_unset(tmp_path: Path) -> None:
    motd = tmp_path / "motd"
    motd.write_text("hello\n")
    home = tmp_path / "home"
    home.mkdir()
    assert motdText(str(motd), str(home)) == b"hello\r\n"
    assert motdText("", str(home)) == b""
    assert motdText(str(tmp_path / "missing"), str(home)) == b""
    (home / ".hushlogin").touch()
    assert motdText(str(motd), str(home)) == b""


def test_an_unreadable_or_huge_motd_does_not_stop_the_login(tmp_path: Path) -> None:
    assert motdText(str(tmp_path), str(tmp_path)) == b""  # a directory: logged, skipped
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (MAX_MOTD_BYTES * 2))
    assert len(motdText(str(huge), str(tmp_path))) == MAX_MOTD_BYTES + 2


def test_the_login_message_is_the_banners_then_the_motd(tmp_path: Path) -> None:
    motd = tmp_path / "motd"
    motd.write_text("motd")
    workspace = WorkspaceEnvironment({}, UserInfo("dev", str(tmp_path), "/bin/sh"))
    banners = [agent_pb2.BannerConfig(enabled=True, message="banner")]
    message = LoginMessage(workspace, lambda: banners)
    assert message() == b"banner\r\n\r\n"  # no manifest yet: no MOTD
    workspace.update(agent_pb2.Manifest(motd_path=str(motd)))
    assert message() == b"banner\r\n\r\nmotd\r\n"


def test_banners_are_fetched_on_connecting_and_every_two_minutes() -> None:
    clock = task.Clock()
    api = DevAgentAPI(Workspace(banners=["first"]), out=io.StringIO())
    loopback = Loopback(DevCoderdFactory(api, TOKEN, clock), clock)
    client = CoderdClient(url="http://coderd.test", token=TOKEN, reactor=clock, transport=loopback)
    banners = AnnouncementBanners(client, clock)
    banners.setServiceParent(client)
    client.startService()
    [pump] = loopback.pumps
    pump.flush()
    assert [b.message for b in banners.current] == ["first"]
    api.workspace.banners = ["second", "third"]
    clock.advance(REFRESH_INTERVAL - 1)
    pump.flush()
    assert [b.message for b in banners.current] == ["first"]
    clock.advance(1)
    pump.flush()
    assert [b.message for b in banners.current] == ["second", "third"]
    client.stopService()
    pump.flush()
