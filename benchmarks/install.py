"""Install the agent as a workspace has it: a venv of its own, outside anyone's home.

A workspace runs an installed agent as an unprivileged user, so the
benchmark does the same: a virtualenv (default ``/var/tmp/coderagent-bench-venv``)
made with a Python the login user can execute, holding a regular (not
editable) install of the working tree: what ``git ls-files`` lists, tracked
or new, copied to a temporary directory first, so neither setuptools'
stale ``build/`` nor anything else untracked gets in.  Dependencies are
installed once; the agent itself again at every run, so edits are measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.servers import BenchSetupError

DEFAULT_VENV = Path("/var/tmp/coderagent-bench-venv")
REPO = Path(__file__).resolve().parent.parent


def _worldExecutable(path: Path) -> bool:
    """Whether every directory above ``path`` and ``path`` itself can be run by others."""
    try:
        real = path.resolve()
        for part in [*reversed(real.parents), real]:
            if not os.stat(part).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def basePython() -> str:
    """A Python >= 3.11 that any user can execute (pyenv's under /root is not)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        path = Path(candidate)
        if not path.exists() or not _worldExecutable(path):
            continue
        r = subprocess.run(
            [candidate, "-c", "import sys, venv; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.stdout.strip() == "True":
            return candidate
    raise BenchSetupError(
        "no Python >= 3.11 with venv that other users can execute: "
        "apt-get install python3 python3-venv"
    )


def _sourceCopy(into: Path) -> Path:
    """The working tree's files that git knows or would add, copied under ``into``."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    source = into / "coderagent-src"
    for name in filter(None, listing.decode().split("\0")):
        src = REPO / name
        if not src.is_file():  # deleted but not yet committed
            continue
        dest = source / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    return source


def describeTree() -> str:
    """The commit the install comes from, and whether the tree differs from it."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head or '?'}{' with uncommitted changes' if dirty else ''}"


def installAgent(venv: Path) -> Path:
    """Install the working tree's agent into ``venv``; returns its ``twistd``."""
    pip = venv / "bin" / "pip"
    if not pip.exists():
        subprocess.run([basePython(), "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(pip), "install", "-q", "--disable-pip-version-check", "--upgrade", "pip"],
            check=True,
            timeout=600,
        )
    with tempfile.TemporaryDirectory(prefix="coderagent-bench-src-") as tmp:
        source = _sourceCopy(Path(tmp))
        quiet = ["-q", "--disable-pip-version-check"]
        # Dependencies (a no-op once they are there), then the agent itself anew.
        subprocess.run([str(pip), "install", *quiet, str(source)], check=True, timeout=900)
        subprocess.run(
            [str(pip), "install", *quiet, "--no-deps", "--force-reinstall", str(source)],
            check=True,
            timeout=600,
        )
    venv.chmod(0o755)
    twistd = venv / "bin" / "twistd"
    if not twistd.exists():
        raise BenchSetupError(f"{venv} has no twistd after installing the agent")
    return twistd
