# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""StopInOrder: each child stops once the one added after it has finished stopping."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from coderagent.services import StopInOrder


class Recorded(Service):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events
        self.stopping: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self.events.append(f"start {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append(f"stop {self.name}")
        self.stopping = Deferred()
        return self.stopping


class Broken(Service):
    def stopService(self) -> None:
        raise RuntimeError("cannot stop")


def test_children_stop_one_after_the_other_last_first() -> None:
    events: list[str] = []
    ordered = StopInOrder()
    first, second = Recorded("coderd", events), Recorded("ssh", events)
    first.setServiceParent(ordered)
    second.setServiceParent(ordered)
    ordered.startService()
    assert events == ["start coderd", "start ssh"]
    done: list[object] = []
    ordered.stopService().addCallback(done.append)
    assert events[2:] == ["stop ssh"]  # coderd waits for the SSH server's drain
    assert second.stopping is not None
    second.stopping.callback(None)
    assert events[2:] == ["stop ssh", "stop coderd"] and done == []
    assert first.stopping is not None
    first.stopping.callback(None)
    assert done == [None] and not ordered.running


def test_a_child_that_fails_to_stop_does_not_keep_the_others_running() -> None:
    events: list[str] = []
    ordered = StopInOrder()
    last = Recorded("last", events)
    last.setServiceParent(ordered)
    Broken().setServiceParent(ordered)
    ordered.startService()
    done: list[object] = []
    ordered.stopService().addCallback(done.append)
    assert events[-1] == "stop last"
    assert last.stopping is not None
    last.stopping.callback(None)
    assert done == [None]
