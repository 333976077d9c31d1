"""``coder_script.cron``: upstream's schedule syntax, and when it fires next.

Upstream parses schedules with robfig/cron v3 configured for a leading
seconds field and an optional day of week (``Second | Minute | Hour | Dom |
Month | DowOptional``), so ``*/2 * * * * *`` is every two seconds and a
five-field ``0 */5 * * *`` means *second* 0 of every fifth minute, not the
crontab meaning.  This module reads exactly that syntax, with robfig's
rules and error texts: ``*`` and ``?``, ``a-b``, ``/step`` (``N/step`` is
``N-max/step``), comma lists, month and weekday names (``JAN``, ``sun``),
an optional ``CRON_TZ=`` or ``TZ=`` prefix, and the day rule of Vixie cron
(when both day of month and day of week are restricted, either may match).

Deliberately beyond upstream: the descriptors ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``), ``@hourly`` and
``@every <duration>``.  Upstream's parser is built without robfig's
``Descriptor`` option and refuses them.

Times are wall-clock times in the agent's local time zone (or the prefix's),
as robfig computes them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from coderagent.options.values import parseDuration


class CronError(ValueError):
    """A schedule upstream's parser would refuse (or this one cannot read)."""


class Schedule(Protocol):
    def next(self, after: float) -> float | None:
        """The first time (Unix seconds) strictly after ``after`` it fires; ``None``: never."""


@dataclass(frozen=True)
class _Bounds:
    low: int
    high: int
    names: Mapping[str, int] | None = None


_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_DAYS = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}

SECONDS = _Bounds(0, 59)
MINUTES = _Bounds(0, 59)
HOURS = _Bounds(0, 23)
DOM = _Bounds(1, 31)
MONTHS = _Bounds(1, 12, _MONTHS)
DOW = _Bounds(0, 6, _DAYS)

#: How far ahead a schedule is searched (robfig gives up after five years too).
_YEARS_AHEAD = 5

_INT = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Field:
    """The values one field allows, and whether it was written as ``*`` (or ``?``)."""

    values: frozenset[int]
    star: bool


@dataclass(frozen=True)
class SpecSchedule:
    """Six fields; fires at each second they all allow."""

    second: Field
    minute: Field
    hour: Field
    dom: Field
    month: Field
    dow: Field
    zone: ZoneInfo | None = None

    def _dayMatches(self, t: datetime) -> bool:
        domMatch = t.day in self.dom.values
        dowMatch = (t.isoweekday() % 7) in self.dow.values
        if self.dom.star or self.dow.star:
            return domMatch and dowMatch
        return domMatch or dowMatch

    def next(self, after: float) -> float | None:
        t = self._wallClock(math.floor(after) + 1)
        limit = t.year + _YEARS_AHEAD
        while t.year <= limit:
            if t.month not in self.month.values:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + timedelta(days=32)).replace(
                    day=1
                )
                continue
            if not self._dayMatches(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            if t.hour not in self.hour.values:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minute.values:
                t = t.replace(second=0) + timedelta(minutes=1)
                continue
            if t.second not in self.second.values:
                t += timedelta(seconds=1)
                continue
            return max(self._epoch(t), math.floor(after) + 1)
        return None

    def _wallClock(self, seconds: float) -> datetime:
        if self.zone is None:
            return datetime.fromtimestamp(seconds)
        return datetime.fromtimestamp(seconds, self.zone).replace(tzinfo=None)

    def _epoch(self, wall: datetime) -> float:
        if self.zone is None:
            return time.mktime((*wall.timetuple()[:8], -1))
        return wall.replace(tzinfo=self.zone).timestamp()


@dataclass(frozen=True)
class EverySchedule:
    """``@every <duration>``: a constant delay, in whole seconds (at least one)."""

    delay: int

    def next(self, after: float) -> float:
        return math.floor(after) + self.delay


def _number(text: str) -> int:
    if not _INT.fullmatch(text):
        raise CronError(
            f'failed to parse int from {text}: strconv.Atoi: parsing "{text}": invalid syntax'
        )
    value = int(text)
    if value < 0:
        raise CronError(f"negative number ({value}) not allowed: {text}")
    return value


def _numberOrName(text: str, bounds: _Bounds) -> int:
    if bounds.names is not None and text.lower() in bounds.names:
        return bounds.names[text.lower()]
    return _number(text)


def _range(expr: str, bounds: _Bounds) -> tuple[set[int], bool]:
    rangeAndStep = expr.split("/")
    lowAndHigh = rangeAndStep[0].split("-")
    single = len(lowAndHigh) == 1
    star = False
    if lowAndHigh[0] in ("*", "?"):
        start, end, star = bounds.low, bounds.high, True
    else:
        start = _numberOrName(lowAndHigh[0], bounds)
        if len(lowAndHigh) == 1:
            end = start
        elif len(lowAndHigh) == 2:
            end = _numberOrName(lowAndHigh[1], bounds)
        else:
            raise CronError(f"too many hyphens: {expr}")
    if len(rangeAndStep) == 1:
        step = 1
    elif len(rangeAndStep) == 2:
        step = _number(rangeAndStep[1])
        if single:
            end = bounds.high
        if step > 1:
            star = False
    else:
        raise CronError(f"too many slashes: {expr}")
    if start < bounds.low:
        raise CronError(f"beginning of range ({start}) below minimum ({bounds.low}): {expr}")
    if end > bounds.high:
        raise CronError(f"end of range ({end}) above maximum ({bounds.high}): {expr}")
    if start > end:
        raise CronError(f"beginning of range ({start}) beyond end of range ({end}): {expr}")
    if step == 0:
        raise CronError(f"step of range should be a positive number: {expr}")
    return set(range(start, end + 1, step)), star


def _field(text: str, bounds: _Bounds) -> Field:
    values: set[int] = set()
    star = False
    for expr in (part for part in text.split(",") if part):
        allowed, isStar = _range(expr, bounds)
        values |= allowed
        star = star or isStar
    return Field(frozenset(values), star)


def _all(bounds: _Bounds) -> Field:
    return Field(frozenset(range(bounds.low, bounds.high + 1)), True)


def _only(value: int) -> Field:
    return Field(frozenset({value}), False)


def _descriptor(spec: str, zone: ZoneInfo | None) -> Schedule:
    midnight = (_only(0), _only(0), _only(0))
    if spec in ("@yearly", "@annually"):
        return SpecSchedule(*midnight, _only(1), _only(1), _all(DOW), zone)
    if spec == "@monthly":
        return SpecSchedule(*midnight, _only(1), _all(MONTHS), _all(DOW), zone)
    if spec == "@weekly":
        return SpecSchedule(*midnight, _all(DOM), _all(MONTHS), _only(0), zone)
    if spec in ("@daily", "@midnight"):
        return SpecSchedule(*midnight, _all(DOM), _all(MONTHS), _all(DOW), zone)
    if spec == "@hourly":
        return SpecSchedule(
            _only(0), _only(0), _all(HOURS), _all(DOM), _all(MONTHS), _all(DOW), zone
        )
    if spec.startswith("@every "):
        text = spec[len("@every ") :]
        try:
            seconds = parseDuration(text)
        except ValueError as e:
            raise CronError(f"failed to parse duration {spec}: {e}") from e
        return EverySchedule(max(1, math.floor(seconds)))
    raise CronError(f"unrecognized descriptor: {spec}")


def parse(spec: str) -> Schedule:
    """Read ``spec`` as upstream's agent does (see the module docstring)."""
    if not spec:
        raise CronError("empty spec string")
    zone: ZoneInfo | None = None
    if spec.startswith(("TZ=", "CRON_TZ=")):
        space = spec.find(" ")
        if space == -1:
            raise CronError(f"invalid location descriptor: {spec}")
        name = spec[spec.index("=") + 1 : space]
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise CronError(f"provided bad location {name}: unknown time zone {name}") from e
        spec = spec[space:].strip()
    if spec.startswith("@"):
        return _descriptor(spec, zone)
    fields = spec.split()
    if len(fields) not in (5, 6):
        raise CronError(f"expected 5 to 6 fields, found {len(fields)}: [{' '.join(fields)}]")
    if len(fields) == 5:
        fields.append("*")
    return SpecSchedule(
        _field(fields[0], SECONDS),
        _field(fields[1], MINUTES),
        _field(fields[2], HOURS),
        _field(fields[3], DOM),
        _field(fields[4], MONTHS),
        _field(fields[5], DOW),
        zone,
    )
