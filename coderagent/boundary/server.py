"""The boundary socket: sandboxing processes write audit log frames, the agent spools them.

Any number of writers connect at once; each is read independently, so one
that sends half a frame and stalls holds up nobody (and is closed after
``STALL_TIMEOUT``).  What a frame holds goes straight into the spool:
accepting is appending, and the forwarder takes it from there.

Errors are handled as upstream's ``agent/boundarylogproxy`` handles them: a
bad header (unknown tag, length over 32768) closes that connection, since
nothing marks where the next frame would start; a payload that is not valid
protobuf loses that frame only.
Each is logged and counted in ``agent_boundary_log_proxy_frames_rejected_total``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.boundary.codec import FrameParser, Logs, MessageError, Status
from coderagent.boundary.codec import decodePayload as _decode
from coderagent.boundary.spool import Spool, sessionKey
from coderagent.deferreds import cancelCall
from coderagent.observe.metrics import AgentMetrics
from coderagent.unixsocket import ServedSockets, agentSocket

log = Logger()

#: A writer that leaves a frame unfinished this long is closed.
STALL_TIMEOUT = 30.0

#: Connections waiting to be accepted (Go's listeners use the kernel's maximum).
BACKLOG = 4096


class BoundaryWriter(Protocol):
    """One connection from a boundary process."""

    def __init__(self, proxy: BoundaryLogProxy) -> None:
        self.proxy = proxy
        self.parser = FrameParser()
        self._stall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.proxy.writers.add(self)

    def dataReceived(self, data: bytes) -> None:
        for tag, payload in self.parser.feed(data):
            try:
                message = _decode(tag, payload)
            except MessageError as e:
                self.proxy.rejected("undecodable", f"read message error: {e}")
                continue
            if isinstance(message, Logs):
                self.proxy.accept(message)
            elif isinstance(message, Status):
                self.proxy.status(message)
            else:
                log.warn("unknown BoundaryMessage variant; ignored")
        error = self.parser.error
        if error is not None:
            self.proxy.rejected(error.reason, f"read frame error: {error}; closing the connection")
            self._close()
            return
        self._watchStall()

    def _watchStall(self) -> None:
        cancelCall(self._stall)
        self._stall = None
        if self.parser.buffered:
            self._stall = self.proxy.clock.callLater(self.proxy.stallTimeout, self._stalled)

    def _stalled(self) -> None:
        self._stall = None
        self.proxy.rejected(
            "stalled",
            f"a boundary writer left a frame unfinished for {self.proxy.stallTimeout:g}s "
            f"({self.parser.buffered} bytes); closing the connection",
        )
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.writers.discard(self)
        cancelCall(self._stall)
        self._stall = None


class BoundaryLogProxy(MultiService):
    """Listens on the boundary socket and appends what arrives to ``spool``.

    A path that cannot be bound is logged and the agent runs on without the
    proxy, as upstream's does.  A stale socket file left by a previous run is
    replaced; a socket another process still serves, or anything that is not
    a socket, is left alone (and binding fails, with an error logged).
    """

    def __init__(
        self,
        *,
        path: str,
        spool: Spool,
        metrics: AgentMetrics,
        reactor: Any,
        served: ServedSockets,
        announce: Callable[[str], None] | None = None,
        clock: Any = None,
        stallTimeout: float = STALL_TIMEOUT,
    ) -> None:
        """``announce(path)`` is called once the socket is listening (sessions learn it);
        ``clock`` (default: the reactor) times ``stallTimeout``."""
        super().__init__()
        self.path = path
        self.announce = announce
        self.spool = spool
        self.metrics = metrics
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.stallTimeout = stallTimeout
        self.writers: set[BoundaryWriter] = set()
        self.listening = agentSocket(
            reactor=reactor,
            path=path,
            factory=_Writers(self),
            what="boundary log proxy",
            served=served,
            backlog=BACKLOG,
        )
        self.listening.setServiceParent(self)

    @property
    def serving(self) -> bool:
        return self.listening.port is not None

    def startService(self) -> None:
        super().startService()
        if self.serving and self.announce is not None:
            self.announce(self.path)

    def stopService(self) -> Any:
        # No frame may arrive once the spool is closing: stop reading every writer.
        for writer in list(self.writers):
            writer._close()
        return super().stopService()

    # -- what writers deliver --------------------------------------------------------

    def accept(self, logs: Logs) -> None:
        request = logs.request
        count = len(request.logs)
        if not count:
            return  # nothing coderd would record (it skips an empty request)
        key = sessionKey(request.session_id, request.confined_process_name)
        try:
            self.spool.append(key, logs.encoded, count)
        except RuntimeError:  # the spool is not open: cannot happen while the socket serves
            log.error("boundary log proxy: the spool is not open; {n} logs not kept", n=count)
            self.metrics.boundaryDropped("buffer_full", 1, count)

    def status(self, status: Status) -> None:
        if status.droppedChannelFull > 0:
            self.metrics.boundaryDropped("boundary_channel_full", 0, status.droppedChannelFull)
        if status.droppedBatchFull > 0:
            self.metrics.boundaryDropped("boundary_batch_full", 0, status.droppedBatchFull)

    def rejected(self, reason: str, message: str) -> None:
        log.warn("boundary log proxy: {message}", message=message, reason=reason)
        self.metrics.boundaryFramesRejected.labels(reason).inc()


class _Writers(Factory):
    noisy = False

    def __init__(self, proxy: BoundaryLogProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: IAddress | None) -> BoundaryWriter:
        return BoundaryWriter(self.proxy)
