"""Two small Twisted habits, written once.

* :class:`Waiters`: "fire every Deferred waiting for this event", with each
  waiter free to have been cancelled meanwhile.
* :func:`cancelCall`: stop a delayed call if it is still pending, and forget it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

T = TypeVar("T")


class Waiters(Generic[T]):
    """Deferreds waiting for one kind of event."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self) -> Deferred[T]:
        """A Deferred that fires at the next :meth:`fire`."""
        d: Deferred[T] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result: T) -> None:
        """Fire every waiter (those already cancelled are skipped); later ones wait
        for the next event."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(result)


def cancelCall(call: IDelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending (``None`` and spent calls are fine).

    Callers write ``cancelCall(self._timer); self._timer = None``.
    """
    if call is not None and call.active():
        call.cancel()
