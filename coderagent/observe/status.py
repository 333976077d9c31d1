"""What the agent can say about itself right now, for the debug server and the control socket.

Each part of the agent registers a small function returning a JSON-ready
dict; :class:`AgentStatus` calls them when asked (always in the reactor
thread, so nothing here races the reactor).  The parts stay ignorant of each
other and of who asks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from coderagent import __version__

Section = Callable[[], Any]
#: A condition the agent is healthy only with: what is wrong, or None.
Check = Callable[[], "str | None"]

OK = "ok"
UNHEALTHY = "unhealthy"


class Listening(Protocol):
    """A listener whose state a check reads (:class:`~coderagent.listening.ListeningService`)."""

    @property
    def listening(self) -> bool: ...


def serving(listener: Listening, what: str) -> Check:
    """A check that fails while ``listener`` does not listen: ``not serving <what>``."""
    return lambda: None if listener.listening else f"not serving {what}"


class AgentStatus:
    """Named sections of the agent's state, gathered on request, and whether it is healthy.

    ``status`` is ``ok`` while every check passes, else ``unhealthy`` with the
    ``problems`` listed; the debug server's ``/health`` then answers 503 and
    ``coder-agent status`` exits 1.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self._sections: dict[str, Section] = {}
        self._checks: list[Check] = []

    def add(self, name: str, section: Section) -> None:
        self._sections[name] = section

    def check(self, check: Check) -> None:
        """Make the agent unhealthy whenever ``check()`` says what is wrong."""
        self._checks.append(check)

    def problems(self) -> list[str]:
        found = []
        for check in self._checks:
            try:
                problem = check()
            except Exception as e:  # a broken check is a problem, not a crash
                problem = f"{type(e).__name__}: {e}"
            if problem:
                found.append(problem)
        return found

    def report(self) -> dict[str, Any]:
        problems = self.problems()
        out: dict[str, Any] = {
            "status": UNHEALTHY if problems else OK,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(self.clock() - self.started, 3),
        }
        if problems:
            out["problems"] = problems
        for name, section in self._sections.items():
            try:
                out[name] = section()
            except Exception as e:  # one broken section must not hide the others
                out[name] = {"error": f"{type(e).__name__}: {e}"}
        return out
