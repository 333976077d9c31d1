"""What the SSH server tells coderd's reporting: sessions by type, connections, refusals.

:class:`SSHActivity` is the agent's :class:`~coderagent.ssh.interfaces.IConnectionEvents`:
it keeps the number of live sessions of each kind (the session counts of
``UpdateStats``, which are what makes coderd bump a workspace's activity) and
hands every session start, end and refusal to the connection log.

Session kinds are upstream's: the client's ``CODER_SSH_SESSION_TYPE``
(``vscode``, ``jetbrains``), ``ssh`` when it sent none.  A session of any
other kind is logged but not counted, as upstream does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from zope.interface import implementer

from coderagent.ssh.interfaces import IConnectionEvents

#: The session kinds counted in the stats.
SESSION_KINDS = ("ssh", "vscode", "jetbrains")


class ConnectionLogSink(Protocol):
    """Where connection events go (:class:`~coderagent.reporting.connlog.ConnectionLog`)."""

    def sessionStarted(self, sessionType: str, peer: object) -> Callable[[int, str], None]: ...

    def refused(self, peer: object, reason: str) -> None: ...


@implementer(IConnectionEvents)
class SSHActivity:
    """Live sessions by kind; every event passed on to the connection log (if any)."""

    def __init__(self, log: ConnectionLogSink | None = None) -> None:
        self.log = log
        self._sessions = dict.fromkeys(SESSION_KINDS, 0)

    def sessionCounts(self) -> dict[str, int]:
        """Live sessions of each counted kind, zeros included."""
        return dict(self._sessions)

    def sessionStarted(self, sessionType: str, peer: object) -> Callable[[int, str], None]:
        kind = sessionType if sessionType in self._sessions else None
        if kind is not None:
            self._sessions[kind] += 1
        logged = self.log.sessionStarted(sessionType, peer) if self.log is not None else None
        ended = False

        def sessionEnded(code: int, reason: str) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            if kind is not None:
                self._sessions[kind] -= 1
            if logged is not None:
                logged(code, reason)

        return sessionEnded

    def refused(self, peer: object, reason: str) -> None:
        if self.log is not None:
            self.log.refused(peer, reason)


def connectionsByProto(transports: Iterable[Any]) -> Mapping[str, int]:
    """Authenticated SSH connections by the protocol they arrived on (``TCP``, ``UNIX``).

    Upstream keys tailnet connections by IP protocol (``TCP``); a client on
    a Unix socket has no IP protocol and is counted as ``UNIX``.
    """
    counts: dict[str, int] = {}
    for t in list(transports):
        if not getattr(t, "authenticated", False) or t.transport is None:
            continue
        proto = str(getattr(t.transport.getPeer(), "type", "UNIX"))
        counts[proto] = counts.get(proto, 0) + 1
    return counts
