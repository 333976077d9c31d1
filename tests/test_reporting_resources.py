# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Resources monitoring: usage read as upstream reads it, and the window pushed to coderd.

Usage is read from real files: a directory laid out like ``/proc`` and
``/sys/fs/cgroup`` for each case.  The monitor talks to coderd-dev's real API
through the real client, in memory on a ``task.Clock``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred

from coderagent.devcoderd.api import resourcesMonitoring
from coderagent.reporting.resources import ResourcesMonitor, Sample, takeSample
from coderagent.reporting.usage import (
    UNLIMITED_MEMORY,
    Usage,
    UsageError,
    isContainerized,
    memory,
    volume,
)
from tests.localcoderd import InMemoryCoderd

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    6000000 kB\n"


def layout(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_on_a_host_memory_is_meminfo(tmp_path: Path) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/init.scope\n", "/proc/meminfo": MEMINFO})
    assert not isContainerized(root)
    assert memory(root) == Usage(used=10_000_000 * 1024, total=16_000_000 * 1024)
    old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 30 kB\n"
    (tmp_path / "proc/meminfo").write_text(old)  # before Linux 3.14
    assert memory(root) == Usage(used=850 * 1024, total=1000 * 1024)


def test_in_a_cgroup_v2_container_memory_is_the_cgroups(tmp_path: Path) -> None:
    root = layout(
        tmp_path,
        {
            "/proc/1/cgroup": "0::/system.slice/docker-abc.scope\n",
            "/proc/meminfo": MEMINFO,
            "/sys/fs/cgroup/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/memory.max": "2147483648\n",
            "/sys/fs/cgroup/memory.current": "1000000000\n",
            "/sys/fs/cgroup/memory.stat": "anon 5\ninactive_anon 3\ninactive_file 200000000\n",
        },
    )
    assert isContainerized(root)
    assert memory(root) == Usage(used=800_000_000, total=2_147_483_648)
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")  # no limit: the host's
    assert memory(root) == Usage(used=800_000_000, total=16_000_000 * 1024)


def test_in_a_cgroup_v1_container_memory_is_the_cgroups(tmp_path: Path) -> None:
    v1 = "/sys/fs/cgroup/memory/"
    root = layout(
        tmp_path,
        {
            "/proc/1/cgroup": "12:memory:/kubepods/besteffort/pod1\n",
            "/proc/meminfo": MEMINFO,
            v1 + "memory.limit_in_bytes": "1073741824\n",
            v1 + "memory.usage_in_bytes": "500000000\n",
            v1 + "memory.stat": "cache 1\ntotal_inactive_file 100000000\n",
        },
    )
    assert memory(root) == Usage(used=400_000_000, total=1_073_741_824)
    (tmp_path / v1.lstrip("/") / "memory.limit_in_bytes").write_text(f"{UNLIMITED_MEMORY}\n")
    assert memory(root).total == 16_000_000 * 1024


@pytest.mark.parametrize(
    "files",
    [
        {"/var/run/secrets/kubernetes.io/serviceaccount/token": "t"},
        {"/proc/mounts": "sysboxfs /proc/swaps fuse rw 0 0\n"},
        {"/sys/fs/cgroup/cgroup.type": "domain\n"},
    ],
)
def test_the_other_signs_of_a_container_are_upstreams(
    tmp_path: Path, files: dict[str, str]
) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/\n", "/proc/mounts": "", **files})
    assert isContainerized(root)


def test_what_cannot_be_read_says_what_and_why(tmp_path: Path) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/\n", "/proc/meminfo": "MemFree: 1 kB\n"})
    with pytest.raises(UsageError, match=r"^parse /proc/meminfo: no MemTotal$"):
        memory(root)
    (tmp_path / "proc/1/cgroup").write_text("0::/docker/1\n")
    with pytest.raises(UsageError, match=r"^read /sys/fs/cgroup/memory/memory\.limit_in_bytes: "):
        memory(root)
    with pytest.raises(UsageError, match="statfs /nonexistent: No such file or directory"):
        volume("/nonexistent")


def test_a_volume_is_its_filesystems_blocks(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    usage = volume(str(tmp_path))
    assert usage.total == st.f_blocks * st.f_frsize > 0
    assert 0 <= usage.used <= usage.total


def test_a_sample_reads_only_what_is_watched_and_keeps_going_past_errors(
    tmp_path: Path,
) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/\n", "/proc/meminfo": MEMINFO})
    sample = takeSample(True, [str(tmp_path), "/nonexistent"], root=root)
    assert sample.memory == Usage(used=10_000_000 * 1024, total=16_000_000 * 1024)
    assert [path for path, _ in sample.volumes] == [str(tmp_path)]
    assert sample.errors == [
        "failed to fetch volume: statfs /nonexistent: No such file or directory"
    ]
    assert takeSample(False, [], root=root) == Sample()


# -- the monitor ------------------------------------------------------------------------


class Setup:
    def __init__(self, root: str, **monitoring: object) -> None:
        self.coderd = InMemoryCoderd(monitoring=resourcesMonitoring(**monitoring))  # type: ignore[arg-type]
        self.samples = 0

        def sampler(watchMemory: bool, volumes: Sequence[str]) -> Sample:
            self.samples += 1
            return takeSample(watchMemory, volumes, root=root)

        self.monitor = ResourcesMonitor(
            self.coderd.client, clock=self.coderd.clock, sampler=sampler, inThread=maybeDeferred
        )
        self.monitor.setServiceParent(self.coderd.client)

    def start(self) -> None:
        self.coderd.client.startService()
        self.coderd.settle()

    @property
    def pushes(self) -> list[list[float]]:
        """Each push's datapoints, by their time."""
        return [
            [p.collected_at.ToNanoseconds() / 1e9 for p in push.datapoints]
            for push in self.coderd.api.resourcePushes
        ]


def test_a_full_window_is_pushed_at_every_datapoint(tmp_path: Path) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/\n", "/proc/meminfo": MEMINFO})
    s = Setup(root, memory=True, volumes=[str(tmp_path)], interval=10, datapoints=3)
    s.start()
    s.coderd.advance(10)
    s.coderd.advance(10)
    assert s.samples == 2 and s.pushes == []
    s.coderd.advance(10)
    s.coderd.advance(10)
    assert s.pushes == [[10, 20, 30], [20, 30, 40]]
    [point] = s.coderd.api.resourcePushes[-1].datapoints[-1:]
    assert (point.memory.used, point.memory.total) == (10_000_000 * 1024, 16_000_000 * 1024)
    assert [v.volume for v in point.volumes] == [str(tmp_path)]
    assert point.volumes[0].total == volume(str(tmp_path)).total


def test_nothing_watched_is_nothing_sampled(tmp_path: Path) -> None:
    s = Setup(str(tmp_path), memory=False, volumes=[], interval=1, datapoints=1)
    s.start()
    for _ in range(5):
        s.coderd.advance(1)
    assert s.samples == 0 and s.pushes == []


def test_an_unusable_configuration_is_not_used(tmp_path: Path) -> None:
    s = Setup(str(tmp_path), memory=True, interval=0, datapoints=1)
    s.start()
    for _ in range(5):
        s.coderd.advance(1)
    assert s.samples == 0


def test_each_connection_asks_again_and_stopping_stops(tmp_path: Path) -> None:
    root = layout(tmp_path, {"/proc/1/cgroup": "0::/\n", "/proc/meminfo": MEMINFO})
    s = Setup(root, memory=True, interval=1, datapoints=1)
    s.start()
    s.coderd.advance(1)
    assert len(s.pushes) == 1
    s.coderd.disconnect()
    s.coderd.advance(1)
    assert len(s.pushes) == 1  # not connected: the loop stopped
    for _ in range(30):
        s.coderd.advance(0.5)
    assert len(s.pushes) > 1
    pushed = len(s.pushes)
    s.monitor.stopService()
    for _ in range(5):
        s.coderd.advance(1)
    assert len(s.pushes) == pushed
