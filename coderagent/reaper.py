"""Reaping orphans when the agent is PID 1 (``--no-reap`` turns it off).

In a container whose entrypoint is the agent, every process a session leaves
behind (``cmd &`` in a shell that then exits) is re-parented to PID 1 and,
once it exits, stays a zombie until PID 1 waits for it.  Upstream re-execs
itself under go-reap for this.  Here the agent itself waits for them, but
only for children Twisted did not start: ``waitpid(-1)`` would also reap a
session's own process and lose its exit status, which the SSH client must
get.  So the orphans are found in ``/proc`` (zombies whose parent is us),
every second, and waited for one by one.

That PID 1 has handlers for SIGTERM and SIGINT matters too, since the kernel
drops the signals PID 1 has no handler for; :mod:`coderagent.signals`
installs them (a graceful stop, exit status 0), not this module.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from coderagent.compat import reactorChildren

log = Logger()

INTERVAL = 1.0


def orphanZombies(parent: int, known: set[int]) -> list[int]:
    """Zombie children of ``parent`` that are not in ``known``."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in known:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == parent:
            found.append(pid)
    return found


def reapOrphans() -> int:
    """Wait for every orphaned zombie; returns how many were reaped."""
    reaped = 0
    for pid in orphanZombies(os.getpid(), reactorChildren()):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
        except ChildProcessError:
            pass
    return reaped


class Reaper(Service):
    """Reaps orphans while the agent is PID 1 (and ``enabled``)."""

    def __init__(self, *, enabled: bool, clock: Any, pid: int | None = None) -> None:
        self.enabled = enabled
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.pid != 1:
            return
        if not self.enabled:
            log.info("running as PID 1 with --no-reap: orphaned processes are not reaped")
            return
        log.info("running as PID 1: reaping orphaned processes")
        self._loop = LoopingCall(reapOrphans)
        self._loop.clock = self.clock
        self._loop.start(INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
