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
from typing import Any

from coderagent import __version__

Section = Callable[[], Any]


class AgentStatus:
    """Named sections of the agent's state, gathered on request."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self._sections: dict[str, Section] = {}

    def add(self, name: str, section: Section) -> None:
        self._sections[name] = section

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(self.clock() - self.started, 3),
        }
        for name, section in self._sections.items():
            try:
                out[name] = section()
            except Exception as e:  # one broken section must not hide the others
                out[name] = {"error": f"{type(e).__name__}: {e}"}
        return out
