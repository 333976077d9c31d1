"""coderd's side of the RPC WebSocket, for coderd-dev: answer the upgrade, then carry bytes.

coderd accepts ``/api/v2/workspaceagents/me/rpc`` as a WebSocket upgrade
(or refuses it with a JSON ``{"message": …}`` body, as it words every error)
and runs yamux on the binary messages' byte stream.  The framing, ping and
close handling are the agent's own (:class:`coderagent.coderd.websocket.WebSocketStream`),
so both ends of a test run the same WebSocket code paths; only the handshake
differs, and only coderd-dev needs this side of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.interfaces import IProtocol
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request

from coderagent.coderd.websocket import WebSocketStream

__all__ = ["Acceptance", "WebSocketServerProtocol"]

#: What a server's ``accept`` callback returns: the inner protocol to run,
#: or a refusal (HTTP status, message) sent as the upgrade's response.
Acceptance = IProtocol | tuple[int, str]


class WebSocketServerProtocol(WebSocketStream):
    """Answer one upgrade request; if accepted, carry an inner protocol's bytes.

    ``accept(request)`` sees the wsproto :class:`~wsproto.events.Request`
    (target, headers) and returns the inner protocol or ``(status, message)``
    to refuse with, which is sent as a JSON body ``{"message": …}`` the way
    coderd words its errors.
    """

    def __init__(self, accept: Callable[[Request], Acceptance]) -> None:
        self._accept = accept
        self._ws = WSConnection(ConnectionType.SERVER)

    def _handshakeEvent(self, event: Event) -> None:
        if not isinstance(event, Request):
            return
        verdict = self._accept(event)
        if isinstance(verdict, tuple):
            status, message = verdict
            body = _jsonMessage(message)
            self._send(
                RejectConnection(
                    status_code=status,
                    headers=[
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                    has_body=True,
                )
            )
            self._send(RejectData(data=body, body_finished=True))
            self.transport.loseConnection()
            return
        self._send(AcceptConnection())
        self._attach(verdict)


def _jsonMessage(message: str) -> bytes:
    return json.dumps({"message": message}).encode("utf-8")
