"""A read-only description of the live SSH connections, for the debug server.

Kept out of :mod:`coderagent.ssh` so that the SSH code holds no presentation:
the factory only keeps its set of live transports, and this module turns them
into JSON-ready dicts when ``/ssh`` is requested.  Nothing here changes a
connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from coderagent.netaddr import describePeer

if TYPE_CHECKING:
    from coderagent.ssh.transport import AgentServerTransport


def describeConnections(
    connections: Iterable[AgentServerTransport], clock: IReactorTime
) -> list[dict[str, Any]]:
    """Every live connection: who, since when, its channels and forwards."""
    now = clock.seconds()
    return [_describe(t, now) for t in list(connections)]


def _describe(t: AgentServerTransport, now: float) -> dict[str, Any]:
    channels = [_describeChannel(chan) for chan in getattr(t.service, "channels", {}).values()]
    avatar = getattr(t, "avatar", None)
    forwards = getattr(avatar, "forwards", None)
    return {
        "peer": describePeer(t.transport),
        "user": getattr(avatar, "username", None),
        "authenticated": t.authenticated,
        "connected_seconds": round(now - t.since, 3),
        # Conch sets otherVersionString only once the client's version line is in.
        "client": (getattr(t, "otherVersionString", None) or b"").decode("ascii", "replace"),
        "channels": channels,
        "forwards": sorted(
            listener.description for listener in getattr(forwards, "listeners", {}).values()
        ),
    }


def _describeChannel(chan: Any) -> dict[str, Any]:
    described: dict[str, Any] = {
        "id": chan.id,
        "type": (chan.name or b"?").decode("ascii", "replace"),
    }
    command = getattr(chan, "command", None)
    if command is not None:
        described["command"] = command
    described["pty"] = getattr(chan, "pty", None) is not None
    return described
