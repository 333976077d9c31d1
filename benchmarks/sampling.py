"""CPU time and resident memory of a server's process tree, read from ``/proc``.

CPU is counted as utime+stime+cutime+cstime summed over the live tree, taken
at the start and at the end of a test.  A child that exits during the test
moves its time into its parent's cutime/cstime once reaped, so the difference
is the CPU the tree used during the test, including short-lived children
(per-connection sshd processes, the shells of an exec test).

Memory is sampled every 50 ms by a thread, summed over the tree, and the peak
is reported twice: RSS, which counts a shared page once per process (sshd's
tree has several processes; a child the agent forks shares the agent's pages
until it execs), and PSS from ``/proc/PID/smaps_rollup``, which splits each
shared page between its sharers (RSS is used for a process whose PSS cannot
be read).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    cpu: float  # utime + stime, seconds
    childCpu: float  # cutime + cstime (reaped children), seconds
    rss: int  # bytes


def procStat(pid: int) -> ProcStat | None:
    """Parse ``/proc/PID/stat``; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcStat(
            ppid=int(fields[1]),
            cpu=(int(fields[11]) + int(fields[12])) / CLK_TCK,
            childCpu=(int(fields[13]) + int(fields[14])) / CLK_TCK,
            rss=int(fields[21]) * PAGE_SIZE,
        )
    except (IndexError, ValueError):
        return None


def processTree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = procStat(int(name))
        if st is not None:
            children.setdefault(st.ppid, []).append(int(name))
    out: list[int] = []
    todo = [root]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def treeCpu(root: int) -> float:
    """Total CPU seconds of ``root``'s tree, reaped children included."""
    total = 0.0
    for pid in processTree(root):
        st = procStat(pid)
        if st is not None:
            total += st.cpu + st.childCpu
    return total


def treeMemory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pids``."""
    rss = pss = 0
    for pid in pids:
        st = procStat(pid)
        if st is None:
            continue
        rss += st.rss
        pss += _pss(pid, st.rss)
    return rss, pss


def _pss(pid: int, fallback: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return fallback


def processCpu(pid: int) -> float | None:
    st = procStat(pid)
    return None if st is None else st.cpu + st.childCpu


def machineTicks() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def machineBusy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds``."""
    t0, i0 = machineTicks()
    time.sleep(seconds)
    t1, i1 = machineTicks()
    return round(1 - (i1 - i0) / (t1 - t0), 2) if t1 > t0 else 0.0


class Measure:
    """Context manager: server-tree CPU, peak RSS, client CPU, machine busy.

    ``with Measure(serverPid, clientPid) as m: ...`` then ``m.result``.
    The sampling thread stops by itself after ``maxSeconds``.
    """

    def __init__(
        self,
        serverPid: int,
        clientPid: int | None = None,
        interval: float = 0.05,
        maxSeconds: float = 900.0,
    ) -> None:
        self.serverPid = serverPid
        self.clientPid = clientPid
        self.interval = interval
        self.maxSeconds = maxSeconds
        self.result: dict[str, float | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._pids: list[int] = []
        self._peak = 0
        self._peakPss = 0

    def __enter__(self) -> Measure:
        self._pids = processTree(self.serverPid)
        self._rss0, self._pss0 = treeMemory(self._pids)
        self._peak, self._peakPss = self._rss0, self._pss0
        self._cpu0 = treeCpu(self.serverPid)
        self._client0 = processCpu(self.clientPid) if self.clientPid else None
        self._ticks0 = machineTicks()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            if n % 5 == 0:  # new children (shells, sshd session processes)
                self._pids = processTree(self.serverPid)
            self._record(treeMemory(self._pids))
            if time.monotonic() - self._t0 > self.maxSeconds:
                return

    def _record(self, memory: tuple[int, int]) -> None:
        self._peak = max(self._peak, memory[0])
        self._peakPss = max(self._peakPss, memory[1])

    def __exit__(
        self,
        excType: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wall = max(time.monotonic() - self._t0, 1e-9)
        cpu1 = treeCpu(self.serverPid)
        client1 = processCpu(self.clientPid) if self.clientPid else None
        self._stop.set()
        self._thread.join(5)
        self._record(treeMemory(processTree(self.serverPid)))
        total, idle = machineTicks()
        dTotal, dIdle = total - self._ticks0[0], idle - self._ticks0[1]
        cpu = cpu1 - self._cpu0
        clientCores = None
        if self._client0 is not None and client1 is not None:
            clientCores = round((client1 - self._client0) / wall, 2)
        self.result = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(cpu, 2),
            "server_cores": round(cpu / wall, 2),
            "client_cores": clientCores,
            "machine_busy": round((dTotal - dIdle) / dTotal, 2) if dTotal else None,
            "rss_before_MiB": round(self._rss0 / MIB, 1),
            "rss_peak_MiB": round(self._peak / MIB, 1),
            "pss_before_MiB": round(self._pss0 / MIB, 1),
            "pss_peak_MiB": round(self._peakPss / MIB, 1),
        }
