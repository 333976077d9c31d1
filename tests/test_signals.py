"""SIGTERM and SIGINT stop the reactor cleanly (so twistd exits 0), delivered as real signals.

Only the reactor is a stand-in: it records what the handlers ask of it.  The
signals are real, raised in this process; the handlers under test are the
ones :class:`GracefulSignals` installs.  The exit status of a real twistd is
checked in ``tests/integration/test_operability.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from coderagent.signals import GracefulSignals


class RecordingReactor:
    """The reactor surface the service uses, recording every call."""

    def __init__(self) -> None:
        self.running = True
        self.whenRunning: list[Callable[[], None]] = []
        self.fromThread: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.stops = 0

    def callWhenRunning(self, f: Callable[[], None]) -> None:
        self.whenRunning.append(f)

    def callFromThread(self, f: Callable[..., None], *args: Any) -> None:
        self.fromThread.append((f, args))

    def stop(self) -> None:
        if not self.running:
            raise AssertionError("stop() on a reactor that is not running")
        self.running = False
        self.stops += 1

    def run(self) -> None:
        """What the real reactor does with calls made from a signal handler: run them."""
        calls, self.fromThread = self.fromThread, []
        for f, args in calls:
            f(*args)


@pytest.fixture(autouse=True)
def restoreHandlers() -> Iterator[None]:
    saved = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "coderagent.signals":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def started() -> tuple[GracefulSignals, RecordingReactor]:
    reactor = RecordingReactor()
    service = GracefulSignals(reactor)
    service.startService()
    return service, reactor


def test_handlers_are_installed_once_the_reactor_runs() -> None:
    before = signal.getsignal(signal.SIGTERM)
    service, reactor = started()
    # Not yet: Twisted installs its own when the reactor starts, and ours must come after.
    assert signal.getsignal(signal.SIGTERM) is before
    [install] = reactor.whenRunning
    install()
    for number in (signal.SIGTERM, signal.SIGINT):
        assert signal.getsignal(number) == service._received


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_reactor_once_and_says_so(
    number: signal.Signals, logged: list[str]
) -> None:
    service, reactor = started()
    reactor.whenRunning[0]()
    assert signal.getsignal(number) == service._received  # else the signal would end pytest
    signal.raise_signal(number)
    # The handler only schedules the stop, as a signal handler must...
    assert reactor.stops == 0 and len(reactor.fromThread) == 1
    reactor.run()
    # ...and the reactor's next turn stops it, gracefully.
    assert reactor.stops == 1 and not reactor.running
    assert logged == [f"{number.name} received: shutting down"]


def test_a_second_signal_while_stopping_is_harmless(logged: list[str]) -> None:
    _, reactor = started()
    reactor.whenRunning[0]()
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)
    reactor.run()
    assert reactor.stops == 1
    assert logged == ["SIGTERM received: shutting down"]
    signal.raise_signal(signal.SIGTERM)  # after the reactor stopped
    reactor.run()
    assert reactor.stops == 1 and len(logged) == 1
