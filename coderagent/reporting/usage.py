"""Memory and disk usage, read the way upstream's ``clistat`` reads them.

Memory, in upstream's order: inside a container (detected as upstream does:
``/proc/1/cgroup`` naming docker, a systemd slice, lxc or kubepods; a
Kubernetes service account token; a sysbox mount; a ``cgroup.type`` file),
the cgroup's: v2 (``memory.current`` less ``inactive_file``, limit
``memory.max``) when ``/sys/fs/cgroup/cpu.max`` exists, else v1
(``memory.usage_in_bytes`` less ``total_inactive_file``, limit
``memory.limit_in_bytes``), with the host's total when the cgroup has no
limit; outside a container the host's ``/proc/meminfo``: ``MemTotal``, and
``MemTotal - MemAvailable`` as used.  A volume is ``statvfs``: blocks times
the block size, and used is what is not free.  All in bytes.

Everything is read under ``root`` (``/`` in the agent, a directory of files
in tests).  These are blocking reads of kernel files, and ``statvfs`` of a
network mount can hang: the caller runs them in a thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: What Docker writes as "no limit" (the largest int64, rounded down to 4 KiB pages).
UNLIMITED_MEMORY = 9223372036854771712


class UsageError(Exception):
    """A value could not be read; the message says which and why."""


@dataclass(frozen=True)
class Usage:
    """Bytes used out of bytes in total."""

    used: int
    total: int


def _read(root: str, path: str) -> str:
    try:
        with open(os.path.join(root, path.lstrip("/")), encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"read {path}: {e.strerror or e}") from e


def _exists(root: str, path: str) -> bool:
    return os.path.exists(os.path.join(root, path.lstrip("/")))


def _int(root: str, path: str) -> int:
    text = _read(root, path).strip()
    try:
        return int(text)
    except ValueError as e:
        raise UsageError(f"parse {path}: {text!r} is not a number") from e


def _field(root: str, path: str, prefix: str) -> int:
    """The number after the first line of ``path`` that starts with ``prefix``."""
    for line in _read(root, path).splitlines():
        line = line.strip()
        if not line.startswith(prefix):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UsageError(f"parse {path}: expected two fields but got {line!r}")
        return int(parts[1])
    raise UsageError(f"parse {path}: did not find line with prefix {prefix}")


def isContainerized(root: str = "/") -> bool:
    """Whether the agent runs in a container, as upstream decides it."""
    try:
        cgroups = _read(root, "/proc/1/cgroup")
    except UsageError:
        return False
    for line in cgroups.splitlines():
        if any(mark in line for mark in ("docker", ".slice", "lxc", "kubepods")):
            return True
    if _exists(root, "/var/run/secrets/kubernetes.io/serviceaccount/token"):
        return True
    try:
        if "sysboxfs" in _read(root, "/proc/mounts"):
            return True
    except UsageError:
        return False
    return _exists(root, "/sys/fs/cgroup/cgroup.type")


def hostMemory(root: str = "/") -> Usage:
    """The host's memory: ``MemAvailable`` is what is not in use (before Linux 3.14,
    which lacks it, free memory, buffers and cache, as go-sysinfo counts)."""
    info: dict[str, int] = {}
    for line in _read(root, "/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            info[name.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    if "MemTotal" not in info:
        raise UsageError("parse /proc/meminfo: no MemTotal")
    total = info["MemTotal"]
    available = info.get("MemAvailable")
    if available is None:
        available = sum(info.get(name, 0) for name in ("MemFree", "Buffers", "Cached"))
    return Usage(used=total - available, total=total)


def _cgroupMemory(root: str) -> tuple[int, int | None]:
    """(used, limit or None) of this cgroup."""
    if _exists(root, "/sys/fs/cgroup/cpu.max"):  # cgroup v2, as upstream tells them apart
        text = _read(root, "/sys/fs/cgroup/memory.max").strip()
        limit = int(text) if text.isdigit() else None  # "max": no limit
        current = _int(root, "/sys/fs/cgroup/memory.current")
        inactive = _field(root, "/sys/fs/cgroup/memory.stat", "inactive_file")
        return current - inactive, limit
    text = _read(root, "/sys/fs/cgroup/memory/memory.limit_in_bytes").strip()
    limit = int(text) if text.isdigit() else None
    if limit == UNLIMITED_MEMORY or (limit is not None and limit <= 0):
        limit = None
    usage = _int(root, "/sys/fs/cgroup/memory/memory.usage_in_bytes")
    inactive = _field(root, "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")
    return usage - inactive, limit


def memory(root: str = "/") -> Usage:
    """The memory the workspace uses, out of what it may use."""
    if not isContainerized(root):
        return hostMemory(root)
    used, limit = _cgroupMemory(root)
    total = limit if limit is not None else hostMemory(root).total
    return Usage(used=used, total=total)


def volume(path: str) -> Usage:
    """Disk use of the filesystem holding ``path`` (``/`` when empty)."""
    try:
        st = os.statvfs(path or "/")
    except OSError as e:
        raise UsageError(f"statfs {path}: {e.strerror or e}") from e
    return Usage(used=(st.f_blocks - st.f_bfree) * st.f_frsize, total=st.f_blocks * st.f_frsize)
