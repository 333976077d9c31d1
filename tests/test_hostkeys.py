"""Host keys: generated once with safe modes, then reused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coderagent.ssh.hostkeys import HostKeyError, loadHostKeys


def test_generated_then_reused(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = loadHostKeys(str(directory))
    assert sorted(first) == [b"ssh-ed25519", b"ssh-rsa"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = loadHostKeys(str(directory))
    for kind in first:
        assert first[kind].fingerprint() == second[kind].fingerprint()


def test_loose_mode_is_tightened(tmp_path: Path) -> None:
    loadHostKeys(str(tmp_path))
    path = tmp_path / "ssh_host_ed25519_key"
    os.chmod(path, 0o644)
    loadHostKeys(str(tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_key_is_a_clear_error(tmp_path: Path) -> None:
    loadHostKeys(str(tmp_path))
    (tmp_path / "ssh_host_rsa_key").write_text("garbage")
    with pytest.raises(HostKeyError, match=r"cannot read SSH host key .*ssh_host_rsa_key"):
        loadHostKeys(str(tmp_path))


def test_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HostKeyError, match="cannot use SSH host key directory"):
        loadHostKeys(str(blocker / "keys"))
