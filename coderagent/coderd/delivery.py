"""Records coderd must get, in order: a FIFO sent one call at a time until delivered.

The connection log (an audit record) and the script timings (the build
timeline) hold records that coderd keeps and that mean something only in
order, so both are sent the same way: oldest first, one call in flight, the
head kept until coderd has answered it.

* A call that *fails* (no connection, a broken one, a timeout) is tried
  again after ``delay(n)`` seconds for the n-th failure in a row, and at once
  when a new connection to coderd comes up.
* A call coderd *answers with an error* (``DRPCError``: its checks failed)
  is dropped after ``maxRejections`` such answers in a row, so that one
  record coderd will not take cannot hold up the rest.

What is queued, what happens when the queue is full, and what is logged
belong to the users (:mod:`coderagent.reporting.connlog`,
:mod:`coderagent.scripts.timings`); this module only sends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from coderagent.coderd.drpc import DRPCError
from coderagent.deferreds import Waiters, cancelCall

T = TypeVar("T")


def _nothing(*_: object) -> None:
    pass


class OrderedDelivery(Generic[T]):
    """``pending`` sent with ``call``, oldest first, one at a time (see the module)."""

    def __init__(
        self,
        call: Callable[[T], Deferred[Any]],
        *,
        clock: Any,
        delay: Callable[[int], float],
        maxRejections: int = 1,
        onRejected: Callable[[T, Failure], None] = _nothing,
        onFailing: Callable[[Failure], None] = _nothing,
        onRecovered: Callable[[], None] = _nothing,
        onRemoved: Callable[[T], None] = _nothing,
        sending: bool = True,
    ) -> None:
        """``onRejected`` is told of a record dropped after its rejections,
        ``onFailing`` of the first failure in a row, ``onRecovered`` of the
        delivery that ends such a row, ``onRemoved`` of every record that
        leaves the queue (delivered or dropped).  Nothing is sent while
        ``sending`` is false."""
        self.pending: deque[T] = deque()
        #: Records delivered.
        self.sent = 0
        self.sending = sending
        self._call = call
        self._clock = clock
        self._delay = delay
        self._maxRejections = maxRejections
        self._onRejected = onRejected
        self._onFailing = onFailing
        self._onRecovered = onRecovered
        self._onRemoved = onRemoved
        self._inFlight = False
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._rejections = 0
        self._empty: Waiters[None] = Waiters()

    def idle(self) -> bool:
        """Nothing queued and nothing on its way."""
        return not self.pending and not self._inFlight

    def waitUntilEmpty(self) -> Deferred[None]:
        """Fires once everything queued has left the queue (see :meth:`giveUp`)."""
        if self.idle():
            return succeed(None)
        return self._empty.wait()

    def giveUp(self) -> None:
        """Fire :meth:`waitUntilEmpty`'s waiters now, whatever is still queued."""
        self._empty.fire(None)

    def connected(self) -> None:
        """A new connection to coderd: what waits for a retry goes now."""
        cancelCall(self._retry)
        self._retry = None
        self.kick()

    def cancelRetry(self) -> None:
        cancelCall(self._retry)
        self._retry = None

    def stop(self) -> None:
        """Send nothing more (a call on its way still completes)."""
        self.sending = False
        self.cancelRetry()

    def kick(self) -> None:
        """Send the head now, unless a call or a retry is already under way."""
        if self._inFlight or self._retry is not None or not self.sending:
            return
        if not self.pending:
            self._empty.fire(None)
            return
        self._inFlight = True
        head = self.pending[0]
        self._call(head).addCallbacks(
            self._delivered, self._failed, callbackArgs=(head,), errbackArgs=(head,)
        )

    def _delivered(self, _: object, head: T) -> None:
        self._inFlight = False
        self._rejections = 0
        if self._failures:
            self._failures = 0
            self._onRecovered()
        self.sent += 1
        self._remove(head)
        self.kick()

    def _failed(self, reason: Failure, head: T) -> None:
        self._inFlight = False
        if reason.check(DRPCError):
            self._rejections += 1
            if self._rejections >= self._maxRejections:
                self._rejections = 0
                self._remove(head)
                self._onRejected(head, reason)
                self.kick()
                return
        if not self.sending:
            return  # stopped: the call was cancelled on purpose
        self._failures += 1
        if self._failures == 1:
            self._onFailing(reason)
        self._retry = self._clock.callLater(self._delay(self._failures), self._retryNow)

    def _retryNow(self) -> None:
        self._retry = None
        self.kick()

    def _remove(self, head: T) -> None:
        if self.pending and self.pending[0] is head:
            self.pending.popleft()
            self._onRemoved(head)
