"""The boundary audit log path as one service: the spool, what fills it, what empties it.

The spool has one owner, this service, and one lifetime: it is opened (in
its own thread) when the service starts, and only then do the socket and
the forwarder start; it is closed when the service stops, after the socket
has stopped accepting and the forwarder has finished the request on its way,
so nothing can append to or take from a closed spool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.boundary.forwarder import Forwarder
from coderagent.boundary.server import BoundaryLogProxy
from coderagent.boundary.spool import Spool
from coderagent.coderd.client import CoderdClient
from coderagent.observe.metrics import AgentMetrics
from coderagent.unixsocket import ServedSockets

log = Logger()


class BoundaryService(MultiService):
    """Owns the spool; runs the socket server and the forwarder while it is open."""

    def __init__(
        self,
        *,
        spool: Spool,
        client: CoderdClient,
        metrics: AgentMetrics,
        reactor: Any,
        socketPath: str,
        served: ServedSockets,
        announce: Callable[[str], None] | None = None,
        clock: Any = None,
    ) -> None:
        """``served`` learns the socket's path (forwards may not take it).
        ``socketPath`` empty: no socket (batches left in the spool are still delivered).
        ``clock`` (default: the reactor) times stalled writers and the forwarder's retries."""
        super().__init__()
        self.spool = spool
        self.proxy: BoundaryLogProxy | None = None
        clock = clock if clock is not None else reactor
        if socketPath:
            self.proxy = BoundaryLogProxy(
                path=socketPath,
                spool=spool,
                metrics=metrics,
                reactor=reactor,
                served=served,
                announce=announce,
                clock=clock,
            )
            self.proxy.setServiceParent(self)
        else:
            log.warn("boundary log proxy socket path not defined; not starting proxy")
        self.forwarder = Forwarder(spool=spool, client=client, metrics=metrics, clock=clock)
        self.forwarder.setServiceParent(self)
        metrics.watchSpool(
            lambda: spool.pendingRecords, lambda: spool.pendingLogs, lambda: spool.pendingBytes
        )
        self._opening: Deferred[None] | None = None

    @property
    def serving(self) -> bool:
        return self.proxy is not None and self.proxy.serving

    def privilegedStartService(self) -> None:
        # Nothing binds before the spool is open: see startService.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        self._opening = self.spool.open()
        self._opening.addCallback(self._startChildren)
        self._opening.addErrback(self._failedToStart)

    def whenStarted(self) -> Deferred[None]:
        """Fires once the spool is open and the socket and forwarder run (for tests)."""
        d: Deferred[None] = Deferred()
        if self._opening is None:
            d.errback(RuntimeError("the boundary service is not started"))
        else:

            def started(result: object) -> object:
                d.callback(None)
                return result

            self._opening.addBoth(started)
        return d

    def _startChildren(self, _: object) -> None:
        if self.running:
            for child in self:
                child.startService()

    def _failedToStart(self, reason: Failure) -> None:
        log.failure("boundary log proxy failed to start", reason)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        opening, self._opening = self._opening, None
        started = opening if opening is not None else Deferred()
        if opening is None:
            started.callback(None)

        def stopChildren(_: object) -> Deferred[Any]:
            # The socket first (no new batches), then the forwarder (the request on
            # its way finishes), then the spool (what is left goes to disk).
            stopping: list[Deferred[Any]] = []
            if self.proxy is not None and self.proxy.running:
                stopping.append(maybeDeferred(self.proxy.stopService))
            d = DeferredList(stopping)
            if self.forwarder.running:
                d.addCallback(lambda _: self.forwarder.stopService())
            return d.addCallback(lambda _: self.spool.close())

        return started.addCallback(stopChildren).addCallback(lambda _: None)
