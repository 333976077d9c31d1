"""Running cron scripts on their schedules: one timer per script, never two runs at once.

Upstream hands each schedule to robfig/cron, which starts a run at every
tick even while the previous run of the same script is still going, so a
script slower than its schedule piles up copies of itself.  Here a tick
that finds the previous run still going is skipped (logged at debug) and
the next tick is scheduled as usual; this is the one deliberate difference.

Ticks are computed from the clock's wall time after each tick, as robfig
does, so a tick missed while the agent was busy is not made up for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from coderagent.deferreds import cancelCall
from coderagent.scripts.cron import Schedule

log = Logger()

Job = Callable[[], "Deferred[Any]"]


@dataclass
class _Entry:
    name: str
    schedule: Schedule
    job: Job
    timer: IDelayedCall | None = None
    running: Deferred[Any] | None = None
    skipped: int = field(default=0)


class CronScheduler:
    """Ticks each added job on its schedule once :meth:`start` is called, until :meth:`stop`."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._entries: list[_Entry] = []
        self.running = False

    def add(self, name: str, schedule: Schedule, job: Job) -> None:
        entry = _Entry(name, schedule, job)
        self._entries.append(entry)
        if self.running:
            self._arm(entry)

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        for entry in self._entries:
            self._arm(entry)

    def stop(self) -> None:
        """No more ticks; runs already going are left to whoever started them."""
        self.running = False
        for entry in self._entries:
            cancelCall(entry.timer)
            entry.timer = None

    def _arm(self, entry: _Entry) -> None:
        now = self.clock.seconds()
        due = entry.schedule.next(now)
        if due is None:
            log.warn("cron schedule of {name} never fires again", name=entry.name)
            return
        entry.timer = self.clock.callLater(max(0.0, due - now), self._tick, entry)

    def _tick(self, entry: _Entry) -> None:
        entry.timer = None
        if not self.running:
            return
        if entry.running is not None:
            entry.skipped += 1
            log.debug(
                "cron run of {name} skipped: the previous run is still going", name=entry.name
            )
        else:
            d = entry.running = entry.job()

            def done(result: object) -> None:
                entry.running = None

            d.addBoth(done)
        self._arm(entry)
