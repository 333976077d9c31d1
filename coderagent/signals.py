"""SIGTERM and SIGINT: a graceful shutdown that ends with exit status 0.

Twisted's own handlers stop the reactor and then have twistd kill itself
with the same signal, so a supervisor sees "killed by SIGTERM".  Upstream's
agent treats SIGTERM as the normal way to stop (containers, systemd) and
exits 0 once it has shut down: stopped accepting, told the SSH clients,
reported the lifecycle and put away the boundary spool.  These handlers,
installed once the reactor runs (after Twisted's), do the same.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


class GracefulSignals(Service):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._received)

    def _received(self, number: int, frame: object) -> None:
        name = signal.Signals(number).name
        # From a signal handler, as Twisted's own: the reactor stops at its next turn.
        self.reactor.callFromThread(self._stop, name)

    def _stop(self, name: str) -> None:
        if self.reactor.running:
            log.info("{signal} received: shutting down", signal=name)
            self.reactor.stop()
