"""twistd finds the plugin, and the plugin only declares service makers."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

REPO = Path(__file__).resolve().parent.parent


def test_coder_agent_plugin_is_discoverable() -> None:
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "coder-agent" in makers
    assert makers["coder-agent"].module == "coderagent.tap"


def test_no_init_files_under_twisted() -> None:
    assert not list((REPO / "twisted").rglob("__init__.py"))
