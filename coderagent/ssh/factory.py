"""The SSH server factory and its configuration.

One :class:`AgentSSHFactory` serves every client: it builds an
:class:`~coderagent.ssh.transport.AgentServerTransport` per connection with
the agent's host keys and portal, keeps the set of live connections (read by
the debug server through :mod:`coderagent.observe.connections`) and what they
carried (:mod:`coderagent.ssh.traffic`, for coderd's stats), and says
goodbye to them all on a graceful shutdown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.conch.ssh import factory, transport
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from coderagent.deferreds import Waiters, cancelCall
from coderagent.observe.metrics import AgentMetrics
from coderagent.ssh.auth import AgentUserAuthServer
from coderagent.ssh.connection import AgentConnection
from coderagent.ssh.traffic import TrafficLedger
from coderagent.ssh.transport import AgentServerTransport

#: How long a graceful shutdown waits for SSH clients to go after telling them.
SHUTDOWN_GRACE = 3.0


@dataclass(frozen=True)
class SSHConfig:
    """The SSH server's knobs, resolved from the options by ``tap``."""

    loginGraceTime: float = 120.0
    maxAuthTries: int = 6
    maxTimeout: float = 72 * 3600.0


class AgentSSHFactory(factory.SSHFactory):
    """Builds :class:`AgentServerTransport` with the agent's keys and portal."""

    protocol = AgentServerTransport
    noisy = False
    services = {
        b"ssh-userauth": AgentUserAuthServer,
        b"ssh-connection": AgentConnection,
    }

    def __init__(
        self,
        *,
        config: SSHConfig,
        portal: Any,
        hostKeys: Callable[[], Mapping[bytes, Any]],
        reactor: IReactorTime,
        metrics: AgentMetrics | None = None,
    ) -> None:
        """``hostKeys`` loads (or creates) the host keys: :meth:`loadHostKeys` calls
        it when the server starts, not when it is built."""
        self.config = config
        self.metrics = metrics
        #: Live connections (for the debug server and a graceful shutdown).
        self.connections: set[AgentServerTransport] = set()
        #: Bytes and packets of every connection, live and ended.
        self.traffic = TrafficLedger()
        self._drained: Waiters[None] = Waiters()
        self.portal = portal
        self._hostKeys = hostKeys
        self.privateKeys: dict[bytes, Any] = {}
        self.publicKeys: dict[bytes, Any] = {}
        self.reactor = reactor
        self.primes = None

    def loadHostKeys(self) -> None:
        """Load the host keys (once); the SSH listener calls this just before binding."""
        if not self.privateKeys:
            self.privateKeys = dict(self._hostKeys())
            self.publicKeys = {kind: key.public() for kind, key in self.privateKeys.items()}

    def connectionStarted(self, t: AgentServerTransport) -> None:
        """``t`` has connected: it is live until :meth:`connectionEnded`."""
        self.connections.add(t)
        self.traffic.connectionStarted(t, t.transport)

    def connectionEnded(self, t: AgentServerTransport) -> None:
        """``t`` is gone: forget it, count it if it never authenticated.

        The last connection to go settles a graceful shutdown waiting for it,
        on the next reactor turn: the transport calls this before it stops its
        service, and what the channels do when they close (report their
        session's end) must happen before the shutdown goes on.
        """
        self.connections.discard(t)
        self.traffic.connectionEnded(t)
        if not self.connections:
            self.reactor.callLater(0, self._drain)
        if not t.authenticated and self.metrics is not None:
            self.metrics.sshFailedConnections.inc()

    def shutdown(self, timeout: float = SHUTDOWN_GRACE) -> Deferred[None]:
        """Tell every client the agent is going away; fires once they are gone (or ``timeout``)."""
        if not self.connections:
            return succeed(None)
        for t in list(self.connections):
            t.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"the agent is shutting down")
        done = self._drained.wait()
        timer = self.reactor.callLater(timeout, self._drain, True)

        def settled(result: object) -> object:
            cancelCall(timer)
            return result

        return done.addBoth(settled)

    def _drain(self, force: bool = False) -> None:
        if self.connections and not force:
            return
        if force:
            for t in list(self.connections):
                tcp: Any = t.transport
                if tcp is not None:
                    tcp.abortConnection()
        self._drained.fire(None)

    def buildProtocol(self, addr: Any) -> AgentServerTransport:
        # Skip SSHFactory.buildProtocol: it logs a line per connection when
        # no moduli file is loaded, and our key exchange list needs none.
        t = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(t, AgentServerTransport)
        t.supportedPublicKeys = [
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms()
        ]
        return t
