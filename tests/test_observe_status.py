"""AgentStatus: the sections each part of the agent registers, gathered when asked."""

from __future__ import annotations

import os

from coderagent import __version__
from coderagent.observe.status import AgentStatus, serving


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_report_heads_with_version_pid_and_uptime_from_the_clock() -> None:
    clock = Clock(500.0)
    status = AgentStatus(clock=clock)
    clock.now = 501.23449
    assert status.report() == {
        "status": "ok",
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": 1.234,
    }


def test_sections_are_read_at_every_report_in_the_order_added() -> None:
    status = AgentStatus(clock=Clock(0.0))
    connections = [0]
    status.add("ssh", lambda: {"connections": connections[0]})
    status.add("boundary", lambda: {"serving": True})
    head = ["status", "version", "pid", "uptime_seconds"]
    assert list(status.report()) == [*head, "ssh", "boundary"]
    connections[0] = 3
    assert status.report()["ssh"] == {"connections": 3}


def test_a_broken_section_says_why_and_hides_nothing_else() -> None:
    status = AgentStatus(clock=Clock(0.0))

    def broken() -> dict[str, int]:
        raise KeyError("spool")

    status.add("coderd", lambda: {"connected": True})
    status.add("boundary", broken)
    status.add("ssh", lambda: {"connections": 1})
    report = status.report()
    assert report["boundary"] == {"error": "KeyError: 'spool'"}
    assert report["coderd"] == {"connected": True} and report["ssh"] == {"connections": 1}


def test_adding_a_name_again_replaces_the_section() -> None:
    status = AgentStatus(clock=Clock(0.0))
    status.add("ssh", lambda: "old")
    status.add("ssh", lambda: "new")
    assert status.report()["ssh"] == "new"


class Listener:
    def __init__(self) -> None:
        self.listening = True


def test_a_failing_check_makes_the_agent_unhealthy_and_says_why() -> None:
    status = AgentStatus(clock=Clock(0.0))
    ssh = Listener()
    status.check(serving(ssh, "SSH"))
    status.add("ssh", lambda: {"serving": ssh.listening})
    assert status.report()["status"] == "ok" and "problems" not in status.report()
    ssh.listening = False
    report = status.report()
    assert (report["status"], report["problems"]) == ("unhealthy", ["not serving SSH"])
    assert report["ssh"] == {"serving": False}


def test_a_broken_check_is_a_problem() -> None:
    status = AgentStatus(clock=Clock(0.0))

    def broken() -> str | None:
        raise OSError("gone")

    status.check(broken)
    assert status.report()["problems"] == ["OSError: gone"]
