"""A service that listens on a strports endpoint and says where it listens.

Twisted's ``strports.service`` either raises a traceback on a bind failure or
(when built by hand) only logs it.  The agent wants neither: a listener the
agent cannot live without stops start-up with one clear line, an optional one
logs the error and lets the rest of the agent run.  Either way the bound
address is logged, which is also how tests learn an ephemeral port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.netaddr import describeAddress

log = Logger()


class ListeningService(Service):
    """Listen on ``description`` with ``factory`` while the service runs."""

    port: IListeningPort | None = None
    _attempted = False

    def __init__(
        self,
        *,
        reactor: Any,
        description: str,
        factory: IProtocolFactory,
        what: str,
        required: bool,
        endpoint: IStreamServerEndpoint | None = None,
        drain: Callable[[], Deferred[None]] | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """``endpoint``, if given, is listened on instead of parsing ``description``
        (which then only names it in log lines).  ``drain``, if given, runs when
        the service stops, once the port no longer accepts: what it returns is
        waited for (an orderly goodbye to the connections already made).
        ``prepare``, if given, runs just before binding (removing a stale
        socket file, say)."""
        self.reactor = reactor
        self.endpoint = endpoint
        self.drain = drain
        self.prepare = prepare
        self.description = description
        self.factory = factory
        self.what = what
        self.required = required

    @property
    def listening(self) -> bool:
        """Whether the port is bound now (started, bound, not yet stopped)."""
        return self.port is not None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        # twistd calls privilegedStartService first; a plain MultiService
        # started by a test does not, so bind here if that has not happened.
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._attempted:
            return
        self._attempted = True
        if self.prepare is not None:
            self.prepare()
        results: list[Any] = []
        endpoint = self.endpoint or endpoints.serverFromString(self.reactor, self.description)
        endpoint.listen(self.factory).addBoth(results.append)
        if not results:  # every endpoint we use binds synchronously
            raise SystemExit(
                f"coder-agent: {self.what}: listening on {self.description} did not complete"
            )
        result = results[0]
        if isinstance(result, Failure):
            message = f"cannot listen on {self.description}: {result.getErrorMessage()}"
            if self.required:
                raise SystemExit(f"coder-agent: {self.what}: {message}")
            log.error("{what}: {message}", what=self.what, message=message)
            return
        self.port = result
        log.info(
            "{what} listening on {address}",
            what=self.what,
            address=describeAddress(result.getHost()),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._attempted = False
        port, self.port = self.port, None
        stopped: Deferred[Any] | None = None
        if port is not None:
            stopped = maybeDeferred(port.stopListening)
        if self.drain is None:
            return stopped
        drain = self.drain
        if stopped is None:
            return drain()
        return stopped.addCallback(lambda _: drain())
