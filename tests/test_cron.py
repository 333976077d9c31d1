"""``coder_script.cron``: upstream's (robfig/cron v3) syntax and firing times, and the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from twisted.internet import defer, task

from coderagent.scripts import cron
from coderagent.scripts.scheduler import CronScheduler


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def nextAfter(spec: str, after: str) -> str | None:
    fired = cron.parse(spec).next(at(after))
    if fired is None:
        return None
    return datetime.fromtimestamp(fired, UTC).strftime("%Y-%m-%d %H:%M:%S %a")


@pytest.mark.parametrize(
    ("spec", "after", "fires"),
    [
        ("TZ=UTC */2 * * * * *", "2026-01-05 12:00:00.5", "2026-01-05 12:00:02 Mon"),
        ("TZ=UTC */2 * * * * *", "2026-01-05 12:00:02", "2026-01-05 12:00:04 Mon"),
        # Five fields are seconds to months: second 0 of every fifth minute.
        ("TZ=UTC 0 */5 * * *", "2026-01-05 12:01:00", "2026-01-05 12:05:00 Mon"),
        ("TZ=UTC 0 30 9 * * mon-fri", "2026-01-03 10:00:00", "2026-01-05 09:30:00 Mon"),
        ("TZ=UTC 0 30 9 * * MON-Fri", "2026-01-05 09:30:00", "2026-01-06 09:30:00 Tue"),
        ("TZ=UTC 5/20 * * * * *", "2026-01-05 12:00:26", "2026-01-05 12:00:45 Mon"),
        ("TZ=UTC 0 0 0 ? JAN *", "2026-03-01 00:00:00", "2027-01-01 00:00:00 Fri"),
        ("TZ=UTC 0 0 12 1,15 * *", "2026-01-02 00:00:00", "2026-01-15 12:00:00 Thu"),
        # Both days restricted: either one matches (the 13th, or a Friday).
        ("TZ=UTC 0 0 0 13 * 5", "2026-01-05 00:00:00", "2026-01-09 00:00:00 Fri"),
        ("TZ=UTC 0 0 0 13 * 5", "2026-01-09 00:00:00", "2026-01-13 00:00:00 Tue"),
        # One restricted: both must match (a Friday the 13th).
        ("TZ=UTC 0 0 0 13 * *", "2026-01-14 00:00:00", "2026-02-13 00:00:00 Fri"),
        ("TZ=UTC 0 0 0 30 2 *", "2026-01-01 00:00:00", None),  # never
        ("CRON_TZ=Asia/Tokyo 0 0 9 * * *", "2026-01-05 01:00:00", "2026-01-06 00:00:00 Tue"),
        ("TZ=UTC @hourly", "2026-01-05 12:00:00", "2026-01-05 13:00:00 Mon"),
        ("TZ=UTC @daily", "2026-01-05 12:00:00", "2026-01-06 00:00:00 Tue"),
        ("TZ=UTC @midnight", "2026-01-05 12:00:00", "2026-01-06 00:00:00 Tue"),
        ("TZ=UTC @weekly", "2026-01-05 12:00:00", "2026-01-11 00:00:00 Sun"),
        ("TZ=UTC @monthly", "2026-01-05 12:00:00", "2026-02-01 00:00:00 Sun"),
        ("TZ=UTC @yearly", "2026-01-05 12:00:00", "2027-01-01 00:00:00 Fri"),
        ("TZ=UTC @annually", "2026-01-05 12:00:00", "2027-01-01 00:00:00 Fri"),
        ("@every 1m30s", "2026-01-05 12:00:00.7", "2026-01-05 12:01:30 Mon"),
        ("@every 200ms", "2026-01-05 12:00:00.7", "2026-01-05 12:00:01 Mon"),  # at least 1 s
    ],
)
def test_next_firing_time(spec: str, after: str, fires: str | None) -> None:
    assert nextAfter(spec, after) == fires


def test_local_time_is_the_default() -> None:
    after = at("2026-01-05 12:00:00.5")
    fired = cron.parse("0 0 * * * *").next(after)
    assert fired is not None
    local = datetime.fromtimestamp(fired)
    assert (local.minute, local.second) == (0, 0) and 0 < fired - after <= 3600


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("", "empty spec string"),
        ("* * * *", "expected 5 to 6 fields, found 4: [* * * *]"),
        ("* * * * * * *", "expected 5 to 6 fields, found 7: [* * * * * * *]"),
        ("60 * * * * *", "end of range (60) above maximum (59): 60"),
        ("* * * 0 * *", "beginning of range (0) below minimum (1): 0"),
        ("* * * * * 7", "end of range (7) above maximum (6): 7"),
        ("5-2 * * * * *", "beginning of range (5) beyond end of range (2): 5-2"),
        ("*/0 * * * * *", "step of range should be a positive number: */0"),
        ("1-2-3 * * * * *", "too many hyphens: 1-2-3"),
        ("*/2/3 * * * * *", "too many slashes: */2/3"),
        ("x * * * * *", 'failed to parse int from x: strconv.Atoi: parsing "x": invalid syntax'),
        ("1_0 * * * * *", "failed to parse int from 1_0"),
        ("@fortnightly", "unrecognized descriptor: @fortnightly"),
        ("@every soon", 'failed to parse duration @every soon: invalid duration "soon"'),
        ("TZ=Nowhere/Land * * * * * *", "provided bad location Nowhere/Land"),
        ("TZ=UTC", "invalid location descriptor: TZ=UTC"),
    ],
)
def test_schedules_upstream_refuses_are_refused_with_its_words(spec: str, error: str) -> None:
    with pytest.raises(cron.CronError) as raised:
        cron.parse(spec)
    assert str(raised.value).startswith(error)


def test_the_scheduler_never_runs_two_runs_of_one_script_at_once() -> None:
    clock = task.Clock()
    clock.advance(at("2026-01-05 12:00:00"))
    runs: list[defer.Deferred[None]] = []

    def job() -> defer.Deferred[None]:
        runs.append(defer.Deferred())
        return runs[-1]

    scheduler = CronScheduler(clock)
    scheduler.add("tick", cron.parse("TZ=UTC */2 * * * * *"), job)
    clock.advance(10)
    assert runs == []  # nothing before start (the start scripts run first)
    scheduler.start()
    clock.advance(2)
    assert len(runs) == 1
    clock.advance(2)
    clock.advance(2)
    assert len(runs) == 1  # still going: those ticks are skipped
    runs[0].callback(None)
    clock.advance(2)
    assert len(runs) == 2
    runs[1].callback(None)
    scheduler.stop()
    clock.advance(60)
    assert len(runs) == 2 and clock.getDelayedCalls() == []


def test_a_job_that_fails_does_not_stop_the_schedule() -> None:
    clock = task.Clock()
    calls: list[float] = []

    def job() -> defer.Deferred[None]:
        calls.append(clock.seconds())
        return defer.fail(RuntimeError("boom"))

    scheduler = CronScheduler(clock)
    scheduler.add("boom", cron.parse("@every 5s"), job)
    scheduler.start()
    clock.pump([5, 5, 5])
    assert calls == [5, 10, 15]
