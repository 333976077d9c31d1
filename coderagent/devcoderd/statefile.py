"""``--state-file``: coderd-dev's recorded state as JSON, for a person or a test to read.

What the agent reported (lifecycle, startup, connections, stats, logs, ...)
is written to the file as one JSON object (:meth:`DevAgentAPI.state`) after
each change, at most every ``INTERVAL`` seconds and once more when coderd-dev
stops.  The file is replaced atomically, so a reader never sees half of it:
``jq . state.json`` works at any moment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from coderagent.deferreds import cancelCall
from coderagent.devcoderd.api import DevAgentAPI

log = Logger()

#: Longest a change waits before it is in the file.
INTERVAL = 0.2


class StateFile(Service):
    """Keeps ``path`` up to date with ``api.state()``."""

    def __init__(self, api: DevAgentAPI, path: str, clock: Any) -> None:
        self.api = api
        self.path = Path(path)
        self.clock = clock
        self._pending: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self.api.onChange(self._changed)
        self.write()

    def stopService(self) -> None:
        super().stopService()
        cancelCall(self._pending)
        self._pending = None
        self.write()

    def _changed(self) -> None:
        if self._pending is None and self.running:
            self._pending = self.clock.callLater(INTERVAL, self._due)

    def _due(self) -> None:
        self._pending = None
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.api.state(), indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("cannot write the state file {path}: {error}", path=str(self.path), error=e)
