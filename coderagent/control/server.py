"""The agent's local control socket: one line in, one JSON line out.

Upstream's agent can serve a Unix socket for local tools to query it.  Ours
answers ``status`` with the same report as the debug server's ``/health``
(version, uptime, coderd connection, SSH, boundary proxy) and ``ping`` with
``{"ok": true}``; anything else gets ``{"error": …}``.  The socket is mode
0600, so only the agent's user (and root) can ask, and a request line is at
most 1 KiB.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from coderagent.listening import ListeningService
from coderagent.observe.status import AgentStatus
from coderagent.unixsocket import ServedSockets, agentSocket


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1024
    transport: Any

    def __init__(self, status: AgentStatus) -> None:
        self.status = status

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode("utf-8", "replace")
        answer: dict[str, Any]
        if command == "status":
            answer = self.status.report()
        elif command == "ping":
            answer = {"ok": True}
        else:
            answer = {"error": f"unknown command {command!r}; try status or ping"}
        self.sendLine(json.dumps(answer, sort_keys=True).encode())
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(json.dumps({"error": "request too long"}).encode())
        self.transport.loseConnection()


class ControlFactory(Factory):
    noisy = False

    def __init__(self, status: AgentStatus) -> None:
        self.status = status

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        return ControlProtocol(self.status)


def controlSocket(
    path: str, reactor: Any, status: AgentStatus, *, served: ServedSockets
) -> ListeningService:
    """The control socket at ``path`` (0600; a stale socket file is replaced, a live one not)."""
    return agentSocket(
        reactor=reactor,
        path=path,
        factory=ControlFactory(status),
        what="control socket",
        served=served,
    )
