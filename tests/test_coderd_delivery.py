"""OrderedDelivery: the FIFO the connection log and the script timings send through.

The call stands in for coderd: each test answers it as coderd would (a
result, a connection failure, a DRPC error) and checks what was sent when.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdUnavailable
from coderagent.coderd.delivery import OrderedDelivery
from coderagent.coderd.drpc import DRPCError


class Coderd:
    """Calls waiting for an answer, in the order they were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[Any]]] = []

    def call(self, record: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((record, d))
        return d

    def answer(self, result: object = None) -> str:
        record, d = self.calls.pop(0)
        if isinstance(result, Exception):
            d.errback(Failure(result))
        else:
            d.callback(result)
        return record


def _delivery(coderd: Coderd, clock: Clock, **kw: Any) -> OrderedDelivery[str]:
    return OrderedDelivery(coderd.call, clock=clock, delay=lambda n: float(n), **kw)


def test_one_call_at_a_time_oldest_first() -> None:
    coderd, clock = Coderd(), Clock()
    removed: list[str] = []
    d = _delivery(coderd, clock, onRemoved=removed.append)
    d.pending.extend(["a", "b", "c"])
    d.kick()
    d.kick()
    assert [r for r, _ in coderd.calls] == ["a"]
    assert [coderd.answer(), coderd.answer(), coderd.answer()] == ["a", "b", "c"]
    assert removed == ["a", "b", "c"] and d.sent == 3 and d.idle()


def test_a_failed_call_is_retried_after_the_delay_or_at_once_on_a_new_connection() -> None:
    coderd, clock = Coderd(), Clock()
    failing: list[str] = []
    recovered: list[bool] = []
    d = _delivery(
        coderd,
        clock,
        onFailing=lambda r: failing.append(r.getErrorMessage()),
        onRecovered=lambda: recovered.append(True),
    )
    d.pending.append("a")
    d.kick()
    coderd.answer(CoderdUnavailable("down"))
    assert not coderd.calls and failing == ["down"]
    clock.advance(0.9)
    assert not coderd.calls
    clock.advance(0.1)  # delay(1) == 1 s
    coderd.answer(CoderdUnavailable("down"))
    assert failing == ["down"]  # told once per row of failures
    d.connected()  # no waiting for delay(2)
    assert coderd.answer() == "a"
    assert recovered == [True] and list(d.pending) == [] and not clock.getDelayedCalls()


def test_a_record_coderd_keeps_refusing_is_dropped_and_the_next_goes() -> None:
    coderd, clock = Coderd(), Clock()
    rejected: list[str] = []
    d = _delivery(coderd, clock, maxRejections=2, onRejected=lambda r, _: rejected.append(r))
    d.pending.extend(["bad", "good"])
    d.kick()
    coderd.answer(DRPCError(0, "no"))
    clock.advance(1.0)  # one rejection counts as a failure: retried
    coderd.answer(DRPCError(0, "no"))
    assert rejected == ["bad"]
    assert coderd.answer() == "good" and d.sent == 1 and d.idle()


def test_waiters_fire_when_the_queue_empties_or_on_giving_up() -> None:
    coderd, clock = Coderd(), Clock()
    d = _delivery(coderd, clock)
    assert d.waitUntilEmpty().called
    d.pending.append("a")
    d.kick()
    emptied = d.waitUntilEmpty()
    assert not emptied.called
    coderd.answer()
    assert emptied.called
    d.pending.append("b")
    d.kick()
    abandoned = d.waitUntilEmpty()
    d.giveUp()
    assert abandoned.called and list(d.pending) == ["b"]


def test_nothing_is_sent_while_stopped_and_a_failure_then_schedules_nothing() -> None:
    coderd, clock = Coderd(), Clock()
    d = _delivery(coderd, clock, sending=False)
    d.pending.append("a")
    d.kick()
    assert not coderd.calls
    d.sending = True
    d.kick()
    d.stop()
    coderd.answer(CoderdUnavailable("cancelled"))
    assert not clock.getDelayedCalls() and list(d.pending) == ["a"]
