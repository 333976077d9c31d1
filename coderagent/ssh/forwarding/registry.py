"""Per-connection bookkeeping shared by the TCP and Unix-socket forwarders.

One :class:`Forwards` lives on each authenticated SSH connection.  It holds
the listeners that connection created (so they all close when it ends, and
one connection can never cancel another's), answers who the peer is for log
lines, and accounts for refusals: every one is logged at WARN with what was
asked for, counted in ``agent_ssh_forwarding_refused_total`` and told to the
session context's connection events (coderd's connection log).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.conch.error import ConchError
from twisted.conch.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    SSHConnection,
)
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.netaddr import UNKNOWN, describePeer, resolve
from coderagent.policy.engine import FLAG_LOCAL, FLAG_REVERSE, normalisePath
from coderagent.ssh.events import forwardRefusal
from coderagent.ssh.forwarding.opening import DeferredOpenConnection

if TYPE_CHECKING:
    from coderagent.policy import Decision, KeyOptions, Policy
    from coderagent.ssh.limits import ConnectionLimits
    from coderagent.unixsocket import ServedSockets

log = Logger()


#: What a refusal's log line shows for a target that could not be parsed.
UNPARSED = "<unparsable payload>"


class Listener(Protocol):
    """A listener a forward created: ``description`` is what it listens on."""

    description: str

    def close(self) -> Deferred[None] | None:
        """Stop listening; may return a Deferred that fires once the socket is closed."""


class Forwards:
    """What one SSH connection has forwarded, and how to tell about it."""

    def __init__(self, avatar: Any) -> None:
        self.avatar = avatar
        self.context = avatar.context
        #: Listeners this connection asked for, keyed by (kind, address).
        self.listeners: dict[tuple[str, str, int], Listener] = {}
        self.closed = False
        #: Closes begun (by a cancel or by close()) that have not finished.
        self._closing: set[Deferred[None]] = set()

    @property
    def policy(self) -> Policy:
        policy: Policy = self.context.policy
        return policy

    @property
    def servedSockets(self) -> ServedSockets:
        """The agent's own socket paths: no forward may take one."""
        served: ServedSockets = self.context.servedSockets
        return served

    @property
    def reactor(self) -> Any:
        return self.context.reactor

    def resolve(self, host: str, port: int) -> Deferred[list[str]]:
        """What ``host`` resolves to, looked up in the reactor's thread pool with the
        context's resolver (a test brings its own; the agent's is the system's)."""
        resolver = getattr(self.context, "resolver", None) or resolve
        pool = self.reactor.getThreadPool()
        found: Deferred[list[str]] = deferToThreadPool(self.reactor, pool, resolver, host, port)
        return found

    def peer(self) -> str:
        """The SSH client's address, for log lines."""
        try:
            return describePeer(self.avatar.conn.transport.transport)
        except AttributeError:
            return UNKNOWN

    def checkLocal(self, transport: str, target: str, what: str) -> None:
        """Ask the policy about a local forward; raise the open failure it refuses with."""
        decision = self.policy.allowLocalForward(transport, target)
        if not decision.allowed:
            self.refused("local", transport, decision, what, target)
            raise ConchError(decision.reason, OPEN_ADMINISTRATIVELY_PROHIBITED)

    def allowsReverse(self, transport: str, target: str, what: str) -> bool:
        """Ask the policy about a reverse forward; a refusal is accounted for here."""
        decision = self.policy.allowReverseForward(transport, target)
        if not decision.allowed:
            self.refused("reverse", transport, decision, what, target)
        return decision.allowed

    @property
    def key(self) -> KeyOptions | None:
        """What the key this connection logged in with may do (its authorized_keys options)."""
        options: KeyOptions | None = getattr(self.avatar, "keyOptions", None)
        return options

    def decided(
        self, direction: str, transport: str, decision: Decision, what: str, target: str
    ) -> bool:
        """Act on the policy's answer to a parsed request: a refusal is logged and counted;
        in audit mode, what the file would refuse is logged, counted, and allowed."""
        if decision.wouldRefuse:
            log.warn(
                "{kind} would be refused (audit mode): {what} from {peer}: {reason}",
                kind=_KIND[direction, transport],
                what=what,
                peer=self.peer(),
                reason=decision.reason,
                rule=decision.rule,
            )
            metrics = getattr(self.context, "metrics", None)
            if metrics is not None:
                metrics.forwardingWouldBeRefused(direction, transport, decision.rule)
            return True
        if not decision.allowed:
            self.refused(direction, transport, decision, what, target)
        return decision.allowed

    def refused(
        self, direction: str, transport: str, decision: Decision, what: str, target: str
    ) -> None:
        """Account for one policy refusal: a WARN line naming what decided, the counters, and
        the connection log (upstream's reason for a block flag; a rule's reason added)."""
        rule = decision.rule or "the policy"
        log.warn(
            "{kind} blocked: {what} from {peer}: {reason}",
            kind=_KIND[direction, transport],
            what=what,
            peer=self.peer(),
            # A file rule's reason names it already; a flag's is upstream's text.
            reason=decision.reason if rule in decision.reason else f"{decision.reason} ({rule})",
            rule=rule,
            direction=direction,
            transport=transport,
        )
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.forwardingRefused(direction, transport, decision.rule)
        events = getattr(self.context, "events", None)
        if events is not None:
            flag = decision.rule in (FLAG_LOCAL, FLAG_REVERSE)
            reason = forwardRefusal(direction, transport, target, None if flag else decision.reason)
            events.refused(self._peerAddress(), reason)

    def _peerAddress(self) -> object:
        try:
            return self.avatar.conn.transport.transport.getPeer()
        except AttributeError:
            return None

    def recheck(self) -> None:
        """After a policy reload: close the reverse listeners it no longer allows."""
        for (kind, address, port), listener in list(self.listeners.items()):
            if kind == "tcp":
                decision = self.policy.reverseTCP(address, port, self.key)
            else:
                decision = self.policy.reverseUnix(normalisePath(address), self.key)
            if decision.allowed:
                continue
            log.warn(
                "closing the reverse forward {listener} of {peer}: the policy now refuses it "
                "({reason})",
                listener=listener.description,
                peer=self.peer(),
                reason=decision.reason,
                rule=decision.rule,
            )
            self.remove((kind, address, port))

    def requireDeferredOpens(self) -> None:
        """Refuse to connect on a connection that would confirm before the connect.

        ``direct-*`` openers answer with a Deferred, which only
        :class:`~.opening.DeferredOpenConnection` understands; stock Conch
        would confirm something that is not a channel.
        """
        conn = getattr(self.avatar, "conn", None)
        if isinstance(conn, SSHConnection) and not isinstance(conn, DeferredOpenConnection):
            log.error(
                "{conn} cannot wait for a connect; build the SSH connection service on "
                "coderagent.ssh.forwarding.opening.DeferredOpenConnection",
                conn=type(conn).__qualname__,
            )
            raise ConchError("local forwarding is not available", OPEN_CONNECT_FAILED)

    def admitsReverseForward(self) -> bool:
        """Whether this connection may bind another reverse listener (its limits decide)."""
        limits: ConnectionLimits = self.avatar.limits
        return limits.reverseForward(listeners=len(self.listeners)) is None

    def admitsForwardedConnection(self) -> bool:
        """Whether a reverse listener may open another ``forwarded-*`` channel."""
        limits: ConnectionLimits = self.avatar.limits
        return limits.forwardChannel(channels=self.avatar.conn.openChannels()) is None

    def malformed(self, request: str, error: Exception) -> None:
        log.warn(
            "malformed {request} request from {peer} refused: {error}",
            request=request,
            peer=self.peer(),
            error=str(error),
        )

    def add(self, key: tuple[str, str, int], listener: Listener) -> None:
        self.listeners[key] = listener

    def remove(self, key: tuple[str, str, int]) -> bool:
        """Close this connection's listener ``key``; False if there is none."""
        listener = self.listeners.pop(key, None)
        if listener is None:
            return False
        self._close(listener)
        return True

    def close(self) -> Deferred[None]:
        """Close every listener this connection created (it is going away).

        Returns :meth:`whenClosed`: what closes here, and what a cancel was
        still closing, is closed when it fires.
        """
        self.closed = True
        listeners, self.listeners = self.listeners, {}
        for listener in listeners.values():
            self._close(listener)
        return self.whenClosed()

    def whenClosed(self) -> Deferred[None]:
        """Fires once every listener whose close has begun is closed.

        Closed means the socket is gone and a Unix socket's file removed.
        Never fails: a failure to close is logged, not passed on.
        """
        closing: Deferred[list[None]] = gatherResults(list(self._closing))
        return closing.addCallback(lambda _: None)

    def _close(self, listener: Listener) -> None:
        peer = self.peer()

        def closed(_: object) -> None:
            # Logged once the socket is really gone (and its file removed).
            log.info("stopped forwarding {what} for {peer}", what=listener.description, peer=peer)

        def failed(reason: Failure) -> None:
            log.failure(
                "closing forwarding listener {what} failed", reason, what=listener.description
            )

        def settled(_: None) -> None:
            self._closing.discard(closing)

        closing: Deferred[None] = maybeDeferred(listener.close).addCallbacks(closed, failed)
        self._closing.add(closing)
        closing.addCallback(settled)


#: Upstream's log texts for each kind of refusal.
_KIND = {
    ("local", "tcp"): "local port forward",
    ("local", "unix"): "unix local port forward",
    ("reverse", "tcp"): "reverse port forward",
    ("reverse", "unix"): "unix reverse port forward",
}
