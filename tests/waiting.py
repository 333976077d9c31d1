"""Waiting, in the reactor, for what a real child process or socket will do: polled, bounded.

Where nothing can notify the test (a child's output reaching a queue the
test only reads), it looks again every 10 ms and fails with what it waited
for once ``timeout`` has passed, rather than hanging the suite.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

TIMEOUT = 30.0


async def until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"still waiting after {timeout:g}s for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]


def untilDeferred(
    condition: Callable[[], object], what: str, timeout: float = TIMEOUT
) -> Deferred[None]:
    """:func:`until` for ``inlineCallbacks`` tests."""
    return Deferred.fromCoroutine(until(condition, what, timeout))
