"""Private files and directories, whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from coderagent.files import ensurePrivateDir, makePrivateDirs, openPrivate


@pytest.fixture
def openUmask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_directory_created_is_private(tmp_path: Path, openUmask: None) -> None:
    (tmp_path / "a").mkdir(mode=0o755)
    os.chmod(tmp_path / "a", 0o755)
    makePrivateDirs(tmp_path / "a" / "b" / "c")
    assert mode(tmp_path / "a") == 0o755  # it existed: left as it was
    assert mode(tmp_path / "a" / "b") == mode(tmp_path / "a" / "b" / "c") == 0o700
    ensurePrivateDir(tmp_path / "a")
    assert mode(tmp_path / "a") == 0o700


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError):
        makePrivateDirs(tmp_path / "f" / "d")


def test_open_private_sets_the_mode_of_new_and_existing_files(
    tmp_path: Path, openUmask: None
) -> None:
    os.close(openPrivate(tmp_path / "new", os.O_WRONLY))
    (tmp_path / "old").write_text("x")
    os.chmod(tmp_path / "old", 0o666)
    os.close(openPrivate(tmp_path / "old", os.O_WRONLY))
    assert mode(tmp_path / "new") == mode(tmp_path / "old") == 0o600
