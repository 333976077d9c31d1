"""TCP forwarding: ``direct-tcpip`` (``ssh -L``/``-W``) and ``tcpip-forward`` (``ssh -R``).

``direct-tcpip`` connects first and answers the open afterwards, so a target
that refuses is reported as OpenSSH's ``open failed: connect failed: <why>``.
``tcpip-forward`` binds synchronously (the reply must carry the port) and
opens a ``forwarded-tcpip`` channel per accepted connection, naming the
address the client asked for and the port actually bound.  Listeners belong
to the SSH connection that asked for them.

The policy is asked before anything else: before the payload is trusted,
before any connect or bind.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.netaddr import joinHostPort as hostPort
from coderagent.ssh.forwarding.registry import UNPARSED, Forwards
from coderagent.ssh.forwarding.relay import RelayChannel
from coderagent.ssh.forwarding.sockets import (
    CONNECT_TIMEOUT,
    AcceptedSocket,
    FirstOf,
    ForwardedFactory,
    describeConnectError,
    dial,
)
from coderagent.ssh.wire import MalformedPayload, Payload

log = Logger()


class _AcceptedTCP(AcceptedSocket):
    """A connection to a ``tcpip-forward`` listener."""

    channelName = b"forwarded-tcpip"

    def channelData(self) -> bytes:
        peer = self.transport.getPeer()
        return (
            common.NS(self.factory.address.encode("utf-8"))
            + struct.pack(">L", self.factory.boundPort)
            + common.NS(str(getattr(peer, "host", "")).encode("utf-8"))
            + struct.pack(">L", int(getattr(peer, "port", 0)))
        )


class _Listener:
    """A ``tcpip-forward`` listener as the registry sees it."""

    def __init__(self, port: IListeningPort, description: str) -> None:
        self.port = port
        self.description = description

    def close(self) -> Deferred[None] | None:
        closing: Deferred[None] | None = self.port.stopListening()
        return closing


def _addresses(f: Forwards, host: str, port: int) -> Deferred[list[str]]:
    """The addresses a forward to ``host`` may connect to: itself if it is an address,
    else what the session context's resolver finds, in order.

    The policy decides on these, and only these are connected to: no second
    lookup between the decision and the connect.
    """
    if isIPAddress(host) or isIPv6Address(host):
        return succeed([host])

    def failed(reason: Failure) -> Failure:
        if reason.check(socket.gaierror, UnicodeError):
            return Failure(error.DNSLookupError(host))
        return reason

    return f.resolve(host, port).addErrback(failed)


def _endpointsFor(reactor: Any, addresses: list[str], port: int) -> list[IStreamClientEndpoint]:
    return [
        (TCP6ClientEndpoint if isIPv6Address(a) else TCP4ClientEndpoint)(
            reactor, a, port, timeout=CONNECT_TIMEOUT
        )
        for a in addresses
    ]


def _bindInterface(address: str) -> str:
    """Where to bind for the address a client asked for (as OpenSSH reads it)."""
    if address in ("", "*", "0.0.0.0"):  # noqa: S104 - what the client explicitly asked for
        return ""
    if address == "localhost":
        return "127.0.0.1"
    return address


class TCPForwarding:
    """The TCP half of one SSH connection's forwarding."""

    def __init__(self, forwards: Forwards) -> None:
        self.forwards = forwards

    # -- direct-tcpip ------------------------------------------------------

    def openDirect(
        self, *, remoteWindow: int, remoteMaxPacket: int, data: bytes, avatar: Any
    ) -> Deferred[RelayChannel]:
        f = self.forwards
        target = _peekHostPort(data)
        f.checkLocal("tcp", target, f"direct-tcpip to {target}")
        try:
            payload = Payload(data)
            host = payload.host()
            port = payload.port()
            payload.string()  # originator address
            payload.uint32()  # originator port
            payload.end()
        except MalformedPayload as e:
            f.malformed("direct-tcpip", e)
            raise ConchError(
                f"error parsing forward data: {e}", connection.OPEN_CONNECT_FAILED
            ) from None
        f.requireDeferredOpens()
        target = hostPort(host, port)

        def failureText(e: BaseException | None) -> str:
            return f"dial tcp {target}: {describeConnectError(e, host)}"

        def decide(addresses: list[str]) -> Deferred[RelayChannel]:
            answer = f.policy.localTCP(host, port, addresses, f.key)
            if not f.decided("local", "tcp", answer.decision, f"direct-tcpip to {target}", target):
                prohibited = connection.OPEN_ADMINISTRATIVELY_PROHIBITED
                raise ConchError(answer.decision.reason, prohibited)
            return dial(
                f,
                FirstOf(_endpointsFor(f.reactor, list(answer.addresses), port)),
                request="direct-tcpip",
                failureText=failureText,
                remoteWindow=remoteWindow,
                remoteMaxPacket=remoteMaxPacket,
                avatar=avatar,
            )

        def unresolved(reason: Failure) -> Failure:
            if reason.check(ConchError, CancelledError):
                return reason
            message = failureText(reason.value)
            log.info("direct-tcpip from {peer} failed: {message}", peer=f.peer(), message=message)
            return Failure(ConchError(message, connection.OPEN_CONNECT_FAILED))

        return _addresses(f, host, port).addCallback(decide).addErrback(unresolved)

    # -- tcpip-forward / cancel-tcpip-forward ---------------------------------

    def forward(self, data: bytes) -> int | tuple[int, bytes]:
        f = self.forwards
        bind = _peekHostPort(data)
        if not f.allowsReverse("tcp", bind, f"tcpip-forward on {bind}"):
            return 0
        bound = _bindRequest(f, data, "tcpip-forward")
        if bound is None:
            return 0
        address, port = bound
        decision = f.policy.reverseTCP(address, port, f.key)
        asked = hostPort(address, port)
        if not f.decided("reverse", "tcp", decision, f"tcpip-forward on {asked}", asked):
            return 0
        if not f.admitsReverseForward():
            return 0
        factory = ForwardedFactory(f, _AcceptedTCP, address)
        try:
            listening = f.reactor.listenTCP(port, factory, interface=_bindInterface(address))
        except (error.CannotListenError, OSError, ValueError) as e:
            log.info(
                "tcpip-forward on {bind} from {peer} failed: {error}",
                bind=hostPort(address, port),
                peer=f.peer(),
                error=e,
            )
            return 0
        factory.boundPort = bound = listening.getHost().port
        f.add(("tcp", address, bound), _Listener(listening, hostPort(address, bound)))
        log.info(
            "forwarding {bind} to {peer}",
            bind=hostPort(address, bound),
            peer=f.peer(),
        )
        if port == 0:
            return 1, struct.pack(">L", bound)
        return 1

    def cancel(self, data: bytes) -> int:
        f = self.forwards
        bound = _bindRequest(f, data, "cancel-tcpip-forward")
        if bound is None:
            return 0
        f.remove(("tcp", *bound))
        return 1


def _bindRequest(f: Forwards, data: bytes, request: str) -> tuple[str, int] | None:
    """The address and port of a ``tcpip-forward`` or its cancel (``None``: malformed)."""
    try:
        payload = Payload(data)
        address = payload.host()
        port = payload.port()
        payload.end()
    except MalformedPayload as e:
        f.malformed(request, e)
        return None
    return address, port


def _peekHostPort(data: bytes) -> str:
    """The leading ``host:port`` of a payload, for the policy and a refusal's log line.

    Never raises: the policy decides before the payload is validated.
    """
    try:
        payload = Payload(data)
        host = payload.string().decode("utf-8", "replace")
        return hostPort(host, payload.uint32())
    except MalformedPayload:
        return UNPARSED
