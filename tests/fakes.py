"""Fakes shared by the SSH unit tests, and the packets they are driven with.

Each fake stands in for something outside the code under test and records
what it was asked to do: an SSH transport (the packets a connection service
sends), a socket transport (the relay's producer/consumer/half-close calls),
a connection as its channels or listeners see it, an avatar.  What the tests
exercise (connections, channels, forwarding handlers) is always the real
class.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from twisted.conch.ssh.common import NS
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from coderagent.coderd.client import CoderdClient
from coderagent.observe.metrics import AgentMetrics
from coderagent.pb import agent_pb2
from coderagent.policy import Policy
from coderagent.reporting.activity import SSHActivity
from coderagent.reporting.connlog import ConnectionLog
from coderagent.ssh.forwarding import installForwarding
from coderagent.ssh.forwarding.relay import RelayChannel, SocketSide
from coderagent.ssh.interfaces import IChannelWindows
from coderagent.ssh.limits import ConnectionLimits
from coderagent.unixsocket import ServedSockets

# -- packets -------------------------------------------------------------------


def u32(n: int) -> bytes:
    return struct.pack(">L", n)


def directTcpip(host: bytes = b"127.0.0.1", port: int = 80) -> bytes:
    return NS(host) + u32(port) + NS(b"10.0.0.1") + u32(4242)


def directStreamlocal(path: bytes) -> bytes:
    return NS(path) + NS(b"") + u32(0)


def openPacket(kind: bytes = b"direct-tcpip", sender: int = 7, data: bytes = b"xyz") -> bytes:
    """A CHANNEL_OPEN payload: window 1 MiB, max packet 32 KiB."""
    return NS(kind) + struct.pack(">3L", sender, 1 << 20, 32768) + data


# -- transports and connections --------------------------------------------------


class FakeSSHTransport:
    """Records the packets a connection service sends."""

    def __init__(self, avatar: Any = None) -> None:
        self.packets: list[tuple[int, bytes]] = []
        if avatar is not None:
            self.avatar = avatar
        self.transport = self  # AgentServerTransport.transport -> the TCP connection

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.7", 50000)


class FakeSocketTransport:
    """A TCP connection as the relay uses it: producer, consumer, half-close."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.readPaused = False
        self.writeShut = False
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None and streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.readPaused = True

    def resumeProducing(self) -> None:
        self.readPaused = False

    def loseWriteConnection(self) -> None:
        self.writeShut = True

    def loseConnection(self) -> None:
        self.closing = True

    def abortConnection(self) -> None:
        self.aborted = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 6000)


@implementer(IChannelWindows)
class FakeConn:
    """The connection side of a channel: what it sent, and window re-opens."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.reopened = 0

    def sendData(self, chan: Any, data: bytes) -> None:
        self.sent.append(("data", data))

    def sendDataChunks(self, chan: Any, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.sendData(chan, bytes(chunk))

    def sendEOF(self, chan: Any) -> None:
        self.sent.append(("eof", b""))

    def sendClose(self, chan: Any) -> None:
        if not chan.localClosed:
            self.sent.append(("close", b""))
            chan.localClosed = True

    def sizeWindow(self, chan: Any) -> None:
        chan.windowCap = chan.localWindowSize  # the window it asked for

    def reopenWindow(self, chan: Any) -> None:
        self.reopened += 1

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.sent]

    def data(self) -> bytes:
        return b"".join(d for kind, d in self.sent if kind == "data")


class FakeSSHConn:
    """An SSH connection as a listener sees it: it opens channels."""

    def __init__(self) -> None:
        self.transport = FakeSSHTransport()
        self.opened: list[tuple[RelayChannel, bytes]] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def openChannels(self) -> int:
        return len(self.opened)

    def openChannel(self, chan: RelayChannel, extra: bytes = b"") -> None:
        self.opened.append((chan, extra))
        due = [d for n, d in self._waiting if len(self.opened) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.opened) < n]
        for d in due:
            d.callback(None)

    def whenOpened(self, count: int, timeout: float = 30.0) -> Deferred[None]:
        """Fires once ``count`` channels have been opened in all (fails after ``timeout``)."""
        if len(self.opened) >= count:
            return succeed(None)
        from twisted.internet import reactor

        d: Deferred[None] = Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(timeout, reactor)


class FakeAvatar:
    """An authenticated user with the real forwarding handlers installed."""

    def __init__(
        self,
        policy: Policy,
        reactor: Any = None,
        limits: ConnectionLimits | None = None,
        resolver: Callable[[str, int], list[str]] | None = None,
    ) -> None:
        self.metrics = AgentMetrics()
        self.limits = limits or ConnectionLimits(metrics=self.metrics)
        self.servedSockets = ServedSockets()
        # The connection log, never started: what it would send waits in ``pending``.
        clock = MemoryReactorClock()
        self.connectionLog = ConnectionLog(
            CoderdClient(url="http://coderd.test", token="t", reactor=clock), clock=clock
        )
        self.context = SimpleNamespace(
            policy=policy,
            reactor=reactor,
            metrics=self.metrics,
            servedSockets=self.servedSockets,
            resolver=resolver,
            events=SSHActivity(self.connectionLog),
        )
        self.channelLookup: dict[bytes, Any] = {}
        self.globalRequests: dict[bytes, Any] = {}
        self.conn = FakeSSHConn()
        self.forwards = installForwarding(self)

    def logged(self) -> list[tuple[str, str, int, str]]:
        """The connection log entries so far: action, IP, status code, reason."""
        return [
            (
                agent_pb2.Connection.Action.Name(r.connection.action),
                r.connection.ip,
                r.connection.status_code,
                r.connection.reason,
            )
            for r in self.connectionLog.pending
        ]

    def refusedCount(self, direction: str, transport: str) -> float | None:
        return self.metrics.value(
            "agent_ssh_forwarding_refused_total", direction=direction, transport=transport
        )


# -- channels and avatars that open them ----------------------------------------


class Opened(RelayChannel):
    """A channel whose opening is recorded, for the connection tests."""

    def __init__(self, **kw: Any) -> None:
        sock = SocketSide()
        sock.makeConnection(FakeSocketTransport())
        super().__init__(sock, **kw)
        self.openedWith: bytes | None = None
        self.failed: Any = None

    def channelOpen(self, specificData: bytes) -> None:
        self.openedWith = specificData

    def openFailed(self, reason: Any) -> None:
        self.failed = reason


class LookupAvatar:
    """An avatar whose every channel lookup returns (or raises) ``result``."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def lookupChannel(self, kind: bytes, window: int, maxPacket: int, data: bytes) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class ManyChannels:
    """An avatar that hands out a fresh channel for every open."""

    def __init__(self) -> None:
        self.channels: list[Opened] = []

    def lookupChannel(self, kind: bytes, window: int, maxPacket: int, data: bytes) -> Any:
        chan = Opened()
        self.channels.append(chan)
        return chan
