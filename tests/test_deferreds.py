"""Waiters and cancelCall."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from coderagent.deferreds import Waiters, cancelCall


def test_waiters_fire_once_and_skip_the_cancelled() -> None:
    waiters: Waiters[int] = Waiters()
    first, second, third = waiters.wait(), waiters.wait(), waiters.wait()
    second.cancel()
    second.addErrback(lambda f: f.trap(CancelledError))
    assert len(waiters) == 3
    waiters.fire(7)
    got: list[int] = []
    first.addCallback(got.append)
    third.addCallback(got.append)
    assert got == [7, 7] and len(waiters) == 0
    later = waiters.wait()
    assert not later.called  # the next event, not the last one
    waiters.fire(8)
    assert later.result == 8


def test_cancel_call_is_safe_on_none_spent_and_pending_calls() -> None:
    clock = Clock()
    fired: list[int] = []
    pending = clock.callLater(5, fired.append, 1)
    spent = clock.callLater(1, fired.append, 2)
    clock.advance(1)
    cancelCall(None)
    cancelCall(spent)
    cancelCall(pending)
    cancelCall(pending)
    clock.advance(10)
    assert fired == [2] and not pending.active()
