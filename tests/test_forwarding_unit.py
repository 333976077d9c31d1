# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Forwarding without processes: deferred opens, the relay, policy, listeners.

Everything here runs against the fakes of ``tests/fakes.py`` (an SSH
transport that records packets, a socket transport that records calls) or
against real Unix sockets in a temporary directory, driven by the test
reactor.  The end-to-end behaviour with
OpenSSH is in ``tests/integration/test_forwarding*.py``.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from coderagent.files import PRIVATE_SOCKET_MODE
from coderagent.observe.metrics import AgentMetrics
from coderagent.policy import Policy, loadPolicy
from coderagent.ssh.forwarding.opening import DeferredOpenConnection
from coderagent.ssh.forwarding.relay import RelayChannel, SocketSide
from coderagent.ssh.forwarding.sockets import describeConnectError
from coderagent.ssh.windows import CHANNEL_MAX_PACKET, CHANNEL_WINDOW
from coderagent.unixsocket import SUN_PATH_MAX
from tests.fakes import (
    FakeAvatar,
    FakeConn,
    FakeSocketTransport,
    FakeSSHTransport,
    LookupAvatar,
    Opened,
    directStreamlocal,
    directTcpip,
    openPacket,
    u32,
)

NS = common.NS


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_level") == LogLevel.warn]


def relay(
    remoteWindow: int = 1 << 20, remoteMaxPacket: int = 32768
) -> tuple[RelayChannel, SocketSide, FakeSocketTransport, FakeConn]:
    sock = SocketSide()
    transport = FakeSocketTransport()
    sock.makeConnection(transport)
    conn = FakeConn()
    chan = RelayChannel(
        sock,
        remoteWindow=remoteWindow,
        remoteMaxPacket=remoteMaxPacket,
        conn=conn,
    )
    return chan, sock, transport, conn


def test_connect_errors_read_like_go() -> None:
    assert (
        describeConnectError(error.ConnectionRefusedError("Connection refused"), "h")
        == "connect: connection refused"
    )
    assert describeConnectError(error.ConnectError(2, "x"), "h") == (
        "connect: no such file or directory"
    )
    assert describeConnectError(error.DNSLookupError("nope"), "nowhere.invalid") == (
        "lookup nowhere.invalid: no such host"
    )
    assert describeConnectError(error.TimeoutError(), "h") == "i/o timeout"


# -- DeferredOpenConnection ----------------------------------------------------


def service(avatar: Any) -> tuple[DeferredOpenConnection, FakeSSHTransport]:
    conn = DeferredOpenConnection()
    transport = FakeSSHTransport(avatar)
    conn.transport = transport  # type: ignore[assignment]
    return conn, transport


def failure(packet: tuple[int, bytes]) -> tuple[int, int, bytes]:
    kind, payload = packet
    assert kind == connection.MSG_CHANNEL_OPEN_FAILURE
    sender, code = struct.unpack(">2L", payload[:8])
    return sender, code, common.getNS(payload[8:])[0]


def test_plain_channel_is_confirmed_at_once() -> None:
    chan = Opened()
    conn, transport = service(LookupAvatar(chan))
    conn.ssh_CHANNEL_OPEN(openPacket())
    [(kind, payload)] = transport.packets
    assert kind == connection.MSG_CHANNEL_OPEN_CONFIRMATION
    assert struct.unpack(">4L", payload) == (7, 0, CHANNEL_WINDOW, CHANNEL_MAX_PACKET)
    assert chan.openedWith == b"xyz" and chan.conn is conn and conn.channels == {0: chan}


def test_deferred_channel_is_confirmed_only_when_it_fires() -> None:
    d: Deferred[Any] = Deferred()
    conn, transport = service(LookupAvatar(d))
    conn.ssh_CHANNEL_OPEN(openPacket())
    assert transport.packets == []
    chan = Opened()
    d.callback(chan)
    assert [k for k, _ in transport.packets] == [connection.MSG_CHANNEL_OPEN_CONFIRMATION]
    assert chan.openedWith == b"xyz" and conn.channelsToRemoteChannel[chan] == 7
    assert conn._pendingOpens == set()


def test_deferred_failure_is_an_open_failure_with_code_and_text() -> None:
    d: Deferred[Any] = Deferred()
    conn, transport = service(LookupAvatar(d))
    conn.ssh_CHANNEL_OPEN(openPacket(sender=9))
    d.errback(ConchError("dial tcp x:1: connect: connection refused", 2))
    assert failure(transport.packets[0]) == (9, 2, b"dial tcp x:1: connect: connection refused")
    assert conn.channels == {}


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ConchError("port forwarding is disabled", 1), (1, b"port forwarding is disabled")),
        (ConchError(1, "swapped order"), (1, b"swapped order")),  # Twisted #3657
        (ConchError("no code"), (2, b"no code")),
    ],
)
def test_synchronous_refusals(raised: ConchError, expected: tuple[int, bytes]) -> None:
    conn, transport = service(LookupAvatar(raised))
    conn.ssh_CHANNEL_OPEN(openPacket())
    assert failure(transport.packets[0])[1:] == expected


def test_unknown_type_and_a_bug_are_refused(logged: list[dict[str, Any]]) -> None:
    conn, transport = service(LookupAvatar(None))
    conn.ssh_CHANNEL_OPEN(openPacket())
    assert failure(transport.packets[0])[1] == connection.OPEN_UNKNOWN_CHANNEL_TYPE
    conn, transport = service(LookupAvatar(RuntimeError("bug")))
    conn.ssh_CHANNEL_OPEN(openPacket())
    assert failure(transport.packets[0])[1:] == (2, b"unknown failure")
    assert any(e.get("log_failure") is not None for e in logged)  # a bug leaves a traceback


def test_pending_opens_are_cancelled_when_the_connection_stops() -> None:
    cancelled: list[bool] = []
    d: Deferred[Any] = Deferred(lambda _: cancelled.append(True))
    conn, transport = service(LookupAvatar(d))
    conn.ssh_CHANNEL_OPEN(openPacket())
    conn.serviceStopped()
    assert cancelled == [True]
    assert transport.packets == []  # nothing sent on a dead connection


def test_a_channel_ready_after_the_connection_stopped_is_discarded() -> None:
    d: Deferred[Any] = Deferred()  # not cancellable: fires anyway
    conn, transport = service(LookupAvatar(d))
    conn.ssh_CHANNEL_OPEN(openPacket())
    conn._pendingOpens = None  # as if it had already fired past cancellation
    conn._stopped = True
    chan = Opened()
    d.callback(chan)
    assert transport.packets == [] and chan.failed is not None


# -- RelayChannel ----------------------------------------------------------------


def test_relay_is_a_push_producer_and_holds_the_socket_until_open() -> None:
    chan, _sock, transport, _conn = relay()
    verifyObject(IPushProducer, chan)
    assert transport.readPaused  # nothing is read before the channel is open
    assert (chan.localWindowSize, chan.localMaxPacket) == (CHANNEL_WINDOW, CHANNEL_MAX_PACKET)
    chan.channelOpen(b"")
    assert transport.producer is chan and not transport.readPaused


def test_relay_moves_bytes_both_ways_in_packets() -> None:
    chan, sock, transport, conn = relay(remoteMaxPacket=1000)
    chan.channelOpen(b"")
    chan.dataReceived(b"to the socket")
    assert transport.written == [b"to the socket"]
    sock.dataReceived(b"y" * 2500)
    assert [len(d) for k, d in conn.sent] == [1000, 1000, 500]


def test_full_remote_window_pauses_the_socket_until_it_reopens() -> None:
    chan, sock, transport, conn = relay(remoteWindow=1500, remoteMaxPacket=1000)
    chan.channelOpen(b"")
    sock.dataReceived(b"a" * 2000)
    assert transport.readPaused and conn.data() == b"a" * 1500 and chan.buf == b"a" * 500
    chan.addWindowBytes(10_000)
    assert not transport.readPaused and conn.data() == b"a" * 2000 and chan.buf == b""


def test_slow_socket_keeps_the_client_window_shut() -> None:
    chan, _sock, transport, conn = relay()
    chan.channelOpen(b"")
    transport.producer.pauseProducing()  # the socket's write buffer is full
    assert chan.consumerPaused
    transport.producer.resumeProducing()  # drained
    assert not chan.consumerPaused and conn.reopened == 1


def test_client_eof_half_closes_the_socket() -> None:
    chan, sock, transport, conn = relay()
    chan.channelOpen(b"")
    transport.producer.pauseProducing()
    chan.eofReceived()
    # The producer goes first: Twisted never finishes a half-close while a
    # paused producer is registered.
    assert transport.producer is None and transport.writeShut and not chan.consumerPaused
    assert not transport.closing and conn.kinds() == []
    sock.writeConnectionLost()
    sock.readConnectionLost()  # the socket is done too: now close it
    assert conn.kinds() == ["eof"] and transport.closing
    sock.connectionLost()
    assert conn.kinds() == ["eof", "close"]


def test_socket_eof_waits_for_buffered_data_then_keeps_the_channel_half_open() -> None:
    chan, sock, transport, conn = relay(remoteWindow=100, remoteMaxPacket=100)
    chan.channelOpen(b"")
    sock.dataReceived(b"z" * 150)
    sock.readConnectionLost()
    assert conn.kinds() == ["data"]  # no EOF before the 50 buffered bytes
    chan.addWindowBytes(100)
    assert conn.kinds() == ["data", "data", "eof"] and conn.data() == b"z" * 150
    chan.startWriting()  # a late window adjust must not read an EOF'd socket again
    assert transport.readPaused
    chan.dataReceived(b"the client may still send")
    assert transport.written == [b"the client may still send"]


def test_socket_lost_sends_eof_then_close_after_the_buffer() -> None:
    chan, sock, _transport, conn = relay(remoteWindow=10, remoteMaxPacket=100)
    chan.channelOpen(b"")
    sock.dataReceived(b"q" * 30)
    sock.connectionLost()
    assert conn.kinds() == ["data"]
    chan.addWindowBytes(100)
    assert conn.kinds() == ["data", "data", "eof", "close"] and conn.data() == b"q" * 30


def test_client_close_drops_unsent_data_and_closes_the_socket() -> None:
    chan, sock, transport, conn = relay(remoteWindow=10)
    chan.channelOpen(b"")
    sock.dataReceived(b"w" * 30)
    chan.closeReceived()
    assert chan.buf == b"" and transport.closing and transport.producer is None
    assert conn.kinds() == ["data", "close"]


def test_socket_that_ended_before_the_channel_opened() -> None:
    chan, sock, _transport, conn = relay()
    sock.connectionLost()
    assert conn.kinds() == []
    chan.channelOpen(b"")
    assert conn.kinds() == ["eof", "close"]


def test_refused_forwarded_channel_aborts_the_socket() -> None:
    chan, _sock, transport, _conn = relay()
    chan.openFailed(ConchError("nope", 2))
    assert transport.aborted


# -- policy and malformed payloads through the handlers ------------------------

BLOCK_BOTH = Policy(blockLocalPortForwarding=True, blockReversePortForwarding=True)


def test_handlers_are_installed_under_their_wire_names() -> None:
    avatar = FakeAvatar(Policy())
    assert set(avatar.channelLookup) == {b"direct-tcpip", b"direct-streamlocal@openssh.com"}
    assert set(avatar.globalRequests) == {
        b"tcpip-forward",
        b"cancel-tcpip-forward",
        b"streamlocal-forward@openssh.com",
        b"cancel-streamlocal-forward@openssh.com",
    }


@pytest.mark.parametrize(
    ("kind", "data", "reason", "transport", "shown"),
    [
        (
            b"direct-tcpip",
            directTcpip(b"db", 5432),
            "port forwarding is disabled",
            "tcp",
            "db:5432",
        ),
        # Decided before the payload is parsed: garbage is still "prohibited".
        (b"direct-tcpip", b"\xff", "port forwarding is disabled", "tcp", "<unparsable payload>"),
        (
            b"direct-streamlocal@openssh.com",
            directStreamlocal(b"/run/x.sock"),
            "local port forwarding is disabled",
            "unix",
            "/run/x.sock",
        ),
        (
            b"direct-streamlocal@openssh.com",
            b"",
            "local port forwarding is disabled",
            "unix",
            "<unparsable payload>",
        ),
    ],
)
def test_blocked_local_forward_is_administratively_prohibited(
    logged: list[dict[str, Any]], kind: bytes, data: bytes, reason: str, transport: str, shown: str
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(BLOCK_BOTH, reactor)
    with pytest.raises(ConchError) as raised:
        avatar.channelLookup[kind](remoteWindow=1, remoteMaxPacket=1, data=data, avatar=avatar)
    assert raised.value.args == (reason, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
    assert reactor.tcpClients == [] and reactor.unixClients == []
    [warning] = warnings(logged)
    text = warning["log_format"].format(**warning)
    assert shown in text and "192.0.2.7:50000" in text and reason in text
    assert "blocked" in text and warning.get("log_failure") is None
    assert avatar.refusedCount("local", transport) == 1
    assert avatar.refusedCount("reverse", transport) == 0
    request = "direct-tcpip" if transport == "tcp" else "direct-streamlocal@openssh.com"
    reason = f"local port forwarding blocked: {request} {shown}"
    assert avatar.logged() == [
        ("CONNECT", "192.0.2.7", 0, ""),
        ("DISCONNECT", "192.0.2.7", 1, reason),
    ]


@pytest.mark.parametrize(
    ("kind", "data", "transport", "shown"),
    [
        (b"tcpip-forward", NS(b"localhost") + u32(0), "tcp", "localhost:0"),
        (b"tcpip-forward", NS(b"x"), "tcp", "<unparsable payload>"),
        (b"streamlocal-forward@openssh.com", NS(b"/tmp/r.sock"), "unix", "/tmp/r.sock"),
    ],
)
def test_blocked_reverse_forward_fails_before_binding(
    logged: list[dict[str, Any]], kind: bytes, data: bytes, transport: str, shown: str
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(BLOCK_BOTH, reactor)
    assert avatar.globalRequests[kind](data) == 0
    assert reactor.tcpServers == [] and reactor.unixServers == []
    [warning] = warnings(logged)
    assert shown in warning["log_format"].format(**warning)
    assert avatar.refusedCount("reverse", transport) == 1
    reason = f"reverse port forwarding blocked: {kind.decode()} {shown}"
    assert avatar.logged()[1:] == [("DISCONNECT", "192.0.2.7", 1, reason)]


def test_a_rule_refusal_reaches_the_connection_log_naming_the_rule() -> None:
    """Beyond the block flags' upstream wording, a policy rule's refusal says which rule."""
    reactor = MemoryReactor()
    rules = loadPolicy(
        b'[reverse_tcp]\ndefault = "allow"\n'
        b'[[reverse_tcp.rules]]\nname = "no-wildcard"\naction = "deny"\nbind = "any"\n'
    )
    avatar = FakeAvatar(Policy(rules=rules), reactor)
    assert avatar.globalRequests[b"tcpip-forward"](NS(b"0.0.0.0") + u32(8080)) == 0
    assert reactor.tcpServers == []
    reason = (
        "reverse port forwarding blocked: tcpip-forward 0.0.0.0:8080 "
        "(listening on 0.0.0.0:8080 refused by policy rule 'no-wildcard')"
    )
    assert avatar.logged()[1:] == [("DISCONNECT", "192.0.2.7", 1, reason)]


MALFORMED = [
    b"",
    b"\x00\x00\x00",
    u32(0x7FFFFFFF) + b"host",
    NS(b"host"),
    NS(b"host") + u32(70000),  # port out of range
    NS(b"\xff\xfe") + u32(22),  # host not UTF-8
    NS(b"host") + u32(22) + b"trailing",
    NS(b"127.0.0.1\0x") + u32(0),  # NUL in the host: no bind or resolver takes it
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_tcpip_forward_and_cancel_fail_cleanly(
    logged: list[dict[str, Any]], data: bytes
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    assert avatar.globalRequests[b"tcpip-forward"](data) == 0
    assert avatar.globalRequests[b"cancel-tcpip-forward"](data) == 0
    assert reactor.tcpServers == []
    assert len(warnings(logged)) == 2
    assert all(e.get("log_failure") is None for e in logged)


@pytest.mark.parametrize(
    "data", [*MALFORMED, NS(b"h") + u32(1) + NS(b"o"), NS(b"h") + u32(1) + NS(b"o") + u32(2) + b"!"]
)
def test_malformed_direct_tcpip_is_a_connect_failure(
    logged: list[dict[str, Any]], data: bytes
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    with pytest.raises(ConchError) as raised:
        avatar.channelLookup[b"direct-tcpip"](
            remoteWindow=1, remoteMaxPacket=1, data=data, avatar=avatar
        )
    text, code = raised.value.args
    assert code == connection.OPEN_CONNECT_FAILED and text.startswith("error parsing forward data")
    assert reactor.tcpClients == [] and len(warnings(logged)) == 1


@pytest.mark.parametrize(
    "data",
    [b"", NS(b"/tmp/x"), NS(b"/tmp/x") + NS(b""), NS(b"/tmp/\0x") + NS(b"") + u32(0), b"\xff" * 9],
)
def test_malformed_streamlocal_requests_fail_cleanly(
    logged: list[dict[str, Any]], data: bytes
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    with pytest.raises(ConchError) as raised:
        avatar.channelLookup[b"direct-streamlocal@openssh.com"](
            remoteWindow=1, remoteMaxPacket=1, data=data, avatar=avatar
        )
    assert raised.value.args == (
        "could not parse direct-streamlocal@openssh.com channel payload",
        connection.OPEN_CONNECT_FAILED,
    )
    if data != NS(b"/tmp/x"):  # (a bare path is a valid forward request)
        assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](data) == 0
        assert avatar.globalRequests[b"cancel-streamlocal-forward@openssh.com"](data) == 0
    assert reactor.unixClients == [] and reactor.unixServers == []
    assert all(e.get("log_failure") is None for e in logged)


def test_tcpip_forward_replies_with_the_bound_port_only_when_zero_was_asked() -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    assert avatar.globalRequests[b"tcpip-forward"](NS(b"localhost") + u32(0)) == (1, u32(0))
    assert avatar.globalRequests[b"tcpip-forward"](NS(b"") + u32(2222)) == 1
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (0, "127.0.0.1"),
        (2222, ""),
    ]


# -- Unix listeners, for real ----------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fwu", dir="/tmp") as d:
        yield Path(d)


def realAvatar() -> FakeAvatar:
    from twisted.internet import reactor

    return FakeAvatar(Policy(), reactor)


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


@pytest_twisted.inlineCallbacks
def test_streamlocal_forward_lifecycle(sockdir: Path) -> Iterator[Deferred[Any]]:
    avatar = realAvatar()
    forward = avatar.globalRequests[b"streamlocal-forward@openssh.com"]
    cancel = avatar.globalRequests[b"cancel-streamlocal-forward@openssh.com"]
    path = sockdir / "new" / "deeper" / "r.sock"
    assert forward(NS(os.fsencode(path))) == 1
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == PRIVATE_SOCKET_MODE
    assert forward(NS(os.fsencode(path))) == 1  # the same path again: fine, as OpenSSH
    assert len(avatar.forwards.listeners) == 1
    assert cancel(NS(os.fsencode(path))) == 1
    yield avatar.forwards.whenClosed()
    assert not path.exists()
    assert cancel(NS(os.fsencode(path))) == 1  # unknown path: still true, as upstream


@pytest_twisted.inlineCallbacks
def test_a_stale_socket_is_replaced(sockdir: Path) -> Iterator[Deferred[Any]]:
    avatar = realAvatar()
    forward = avatar.globalRequests[b"streamlocal-forward@openssh.com"]
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # leaves the file behind
    assert not connectable(stale)
    assert forward(NS(os.fsencode(stale))) == 1 and connectable(stale)
    yield avatar.forwards.close()
    assert not stale.exists()


def occupy(sockdir: Path, kind: str, stack: ExitStack) -> Path:
    """Put ``kind`` at a path in ``sockdir``; returns the path."""
    path = sockdir / f"{kind.replace(' ', '-')}.sock"
    if kind == "regular file":
        path.write_text("notes")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        target = sockdir / "target.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()  # even a link to a stale socket is not ours to remove
        path.symlink_to(target)
    elif kind == "live socket":
        server = stack.enter_context(socket.socket(socket.AF_UNIX))
        server.bind(str(path))
        server.listen()
    return path


def snapshotOf(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_mode, st.st_mtime_ns


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink", "live socket"])
def test_what_is_not_a_stale_socket_is_never_replaced(
    sockdir: Path, logged: list[dict[str, Any]], kind: str
) -> None:
    avatar = realAvatar()
    with ExitStack() as stack:
        path = occupy(sockdir, kind, stack)
        before = snapshotOf(path)
        assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(os.fsencode(path))) == 0
        assert snapshotOf(path) == before
        if kind == "regular file":
            assert path.read_text() == "notes"
        if kind == "live socket":
            assert connectable(path)
    assert avatar.forwards.listeners == {}
    [warning] = warnings(logged)
    text = warning["log_format"].format(**warning)
    assert text == (
        f"streamlocal-forward on {path} from 192.0.2.7:50000 refused: "
        f"{OCCUPANT_TEXT[kind]} is there (only a stale socket is replaced)"
    )


OCCUPANT_TEXT = {
    "regular file": "a file that is not a socket",
    "directory": "a directory",
    "symlink": "a symbolic link",
    "live socket": "a socket in use",
}


@pytest_twisted.inlineCallbacks
def test_a_path_another_connection_forwards_is_refused_and_survives(
    sockdir: Path,
) -> Iterator[Deferred[Any]]:
    first, second = realAvatar(), realAvatar()
    path = os.fsencode(sockdir / "shared.sock")
    assert first.globalRequests[b"streamlocal-forward@openssh.com"](NS(path)) == 1
    assert second.globalRequests[b"streamlocal-forward@openssh.com"](NS(path)) == 0
    yield second.forwards.close()
    assert connectable(Path(os.fsdecode(path)))  # still the first connection's
    yield first.forwards.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("bound", [False, True], ids=["not yet bound", "bound"])
def test_a_path_the_agent_serves_is_refused(
    sockdir: Path, logged: list[dict[str, Any]], bound: bool
) -> None:
    """Even before the agent's own socket is bound (the boundary socket starts after SSH)."""
    avatar = realAvatar()
    path = sockdir / "audit" / "boundary-audit.sock"
    avatar.servedSockets.add(str(path), "boundary log proxy")
    with ExitStack() as stack:
        if bound:
            path.parent.mkdir()
            server = stack.enter_context(socket.socket(socket.AF_UNIX))
            server.bind(str(path))
            server.listen()
        # Spelled differently, through a symlink to its directory.
        link = sockdir / "link"
        link.symlink_to(sockdir)
        for spelling in (path, link / "audit" / ".." / "audit" / "boundary-audit.sock"):
            forward = avatar.globalRequests[b"streamlocal-forward@openssh.com"]
            assert forward(NS(os.fsencode(spelling))) == 0
        assert path.parent.exists() == bound  # nothing created for a refused forward
        if bound:
            assert connectable(path)
    texts = [w["log_format"].format(**w) for w in warnings(logged)]
    assert texts[0] == (
        f"streamlocal-forward on {path} from 192.0.2.7:50000 refused: "
        "the agent serves its boundary log proxy there"
    )
    assert len(texts) == 2 and "the agent serves its boundary log proxy there" in texts[1]


def test_a_path_too_long_for_a_socket_is_refused_before_any_directory_is_made(
    sockdir: Path, logged: list[dict[str, Any]]
) -> None:
    avatar = realAvatar()
    path = sockdir / "new" / ("x" * (SUN_PATH_MAX - len(os.fsencode(sockdir / "new"))))
    assert len(os.fsencode(path)) == SUN_PATH_MAX + 1
    assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(os.fsencode(path))) == 0
    assert not (sockdir / "new").exists()
    [warning] = warnings(logged)
    assert warning["log_format"].format(**warning) == (
        f"streamlocal-forward on {path} from 192.0.2.7:50000 refused: the path is "
        f"{SUN_PATH_MAX + 1} bytes, longer than a Unix socket address allows ({SUN_PATH_MAX})"
    )
    # One byte shorter fits.
    shorter = str(path)[:-1]
    assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(os.fsencode(shorter))) == 1
    avatar.forwards.close()


@pytest_twisted.inlineCallbacks
def test_every_parent_directory_made_for_a_forward_is_0700(
    sockdir: Path,
) -> Iterator[Deferred[Any]]:
    avatar = realAvatar()
    path = sockdir / "a" / "b" / "c" / "r.sock"
    old = os.umask(0)
    try:
        assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(os.fsencode(path))) == 1
    finally:
        os.umask(old)
    for directory in (sockdir / "a", sockdir / "a" / "b", sockdir / "a" / "b" / "c"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    assert stat.S_IMODE(os.stat(path).st_mode) == PRIVATE_SOCKET_MODE
    assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700  # what existed is left as it was
    yield avatar.forwards.close()


def test_direct_streamlocal_to_a_path_too_long_fails_at_once(
    logged: list[dict[str, Any]],
) -> None:
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    path = "/tmp/" + "p" * 200 + ".sock"
    with pytest.raises(ConchError) as raised:
        avatar.channelLookup[b"direct-streamlocal@openssh.com"](
            remoteWindow=1,
            remoteMaxPacket=1,
            data=directStreamlocal(os.fsencode(path)),
            avatar=avatar,
        )
    assert raised.value.args == (
        f'dial unix socket "{path}": dial unix {path}: connect: invalid argument',
        connection.OPEN_CONNECT_FAILED,
    )
    assert reactor.unixClients == []
    assert all(e.get("log_failure") is None for e in logged)
    assert warnings(logged) == []


@pytest_twisted.inlineCallbacks
def test_direct_streamlocal_connect_failure_names_the_path(
    sockdir: Path,
) -> Iterator[Deferred[Any]]:
    avatar = realAvatar()
    missing = sockdir / "missing.sock"
    d = avatar.channelLookup[b"direct-streamlocal@openssh.com"](
        remoteWindow=1,
        remoteMaxPacket=1,
        data=directStreamlocal(os.fsencode(missing)),
        avatar=avatar,
    )
    with pytest.raises(ConchError) as raised:
        yield d
    assert raised.value.args == (
        f'dial unix socket "{missing}": dial unix {missing}: connect: no such file or directory',
        connection.OPEN_CONNECT_FAILED,
    )


@pytest_twisted.inlineCallbacks
def test_direct_tcpip_connects_before_answering() -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    factory: Any = Factory.forProtocol(Protocol)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = cast(IPv4Address, listening.getHost()).port
    avatar = realAvatar()
    opener = avatar.channelLookup[b"direct-tcpip"]
    data = directTcpip(b"127.0.0.1", port)
    try:
        chan = yield opener(remoteWindow=1 << 20, remoteMaxPacket=32768, data=data, avatar=avatar)
        assert isinstance(chan, RelayChannel) and chan.socket.transport.connected
        chan.socket.transport.abortConnection()
    finally:
        yield defer.maybeDeferred(listening.stopListening)
    with pytest.raises(ConchError) as raised:
        yield opener(remoteWindow=1, remoteMaxPacket=1, data=data, avatar=avatar)
    assert raised.value.args == (
        f"dial tcp 127.0.0.1:{port}: connect: connection refused",
        connection.OPEN_CONNECT_FAILED,
    )


@pytest_twisted.inlineCallbacks
def test_accepted_connections_open_forwarded_channels_naming_the_bound_port(
    sockdir: Path,
) -> Iterator[Deferred[Any]]:
    avatar = realAvatar()
    reply = avatar.globalRequests[b"tcpip-forward"](NS(b"127.0.0.1") + u32(0))
    assert isinstance(reply, tuple) and reply[0] == 1
    (bound,) = struct.unpack(">L", reply[1])
    assert bound != 0
    path = sockdir / "fwd.sock"
    assert avatar.globalRequests[b"streamlocal-forward@openssh.com"](NS(os.fsencode(path))) == 1
    tcpClient = socket.create_connection(("127.0.0.1", bound))
    unixClient = socket.socket(socket.AF_UNIX)
    unixClient.connect(str(path))
    try:
        yield avatar.conn.whenOpened(2)
        byName = {chan.name: (chan, extra) for chan, extra in avatar.conn.opened}
        chan, extra = byName[b"forwarded-tcpip"]
        origin = tcpClient.getsockname()
        assert extra == NS(b"127.0.0.1") + u32(bound) + NS(origin[0].encode()) + u32(origin[1])
        assert chan.localWindowSize == CHANNEL_WINDOW
        chan, extra = byName[b"forwarded-streamlocal@openssh.com"]
        assert extra == NS(os.fsencode(path)) + NS(b"")
        for chan, _ in avatar.conn.opened:
            chan.openFailed(ConchError("test over", 2))
    finally:
        tcpClient.close()
        unixClient.close()
        yield avatar.forwards.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", bound), timeout=5).close()


def test_metrics_export_zeroes_and_counts() -> None:
    metrics = AgentMetrics()
    text = metrics.exposition().decode()
    for d in ("local", "reverse"):
        for t in ("tcp", "unix"):
            assert (
                f'agent_ssh_forwarding_refused_total{{direction="{d}",transport="{t}"}} 0.0' in text
            )
    metrics.forwardingRefused("reverse", "unix")
    assert (
        metrics.value("agent_ssh_forwarding_refused_total", direction="reverse", transport="unix")
        == 1
    )


def test_direct_opens_refuse_a_connection_that_cannot_wait(logged: list[dict[str, Any]]) -> None:
    """On stock Conch a Deferred would be "confirmed"; refuse before connecting instead."""
    reactor = MemoryReactor()
    avatar = FakeAvatar(Policy(), reactor)
    avatar.conn = connection.SSHConnection()  # type: ignore[assignment]
    for kind, data in (
        (b"direct-tcpip", directTcpip()),
        (b"direct-streamlocal@openssh.com", directStreamlocal(b"/tmp/x.sock")),
    ):
        with pytest.raises(ConchError) as raised:
            avatar.channelLookup[kind](remoteWindow=1, remoteMaxPacket=1, data=data, avatar=avatar)
        assert raised.value.args[1] == connection.OPEN_CONNECT_FAILED
    assert reactor.tcpClients == [] and reactor.unixClients == []
    assert any("DeferredOpenConnection" in e["log_format"] for e in logged)
    avatar.conn = DeferredOpenConnection()  # type: ignore[assignment]
    connecting = avatar.channelLookup[b"direct-tcpip"](
        remoteWindow=1, remoteMaxPacket=1, data=directTcpip(), avatar=avatar
    )
    assert isinstance(connecting, Deferred)
    connecting.addErrback(lambda _: None)
    connecting.cancel()


@pytest_twisted.inlineCallbacks
def test_a_name_is_looked_up_once_and_only_allowed_addresses_are_connected_to(
    logged: list[dict[str, Any]],
) -> Iterator[Deferred[Any]]:
    """A resolver that answers a refused address first: the forward goes to the allowed one,
    with no second lookup; a name with only refused addresses is prohibited unconnected."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    lookups: list[tuple[str, int]] = []
    answers = {"app.test": ["10.255.0.1", "127.0.0.1"], "db.test": ["10.255.0.2"]}

    def resolver(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return answers[host]

    accepted: list[Protocol] = []

    class Recorded(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    listening = reactor.listenTCP(0, Factory.forProtocol(Recorded), interface="127.0.0.1")
    port = cast(IPv4Address, listening.getHost()).port
    rules = loadPolicy(
        b'[local_tcp]\ndefault = "allow"\n'
        b'[[local_tcp.rules]]\nname = "no-internal"\naction = "deny"\nhost = "10.0.0.0/8"\n'
    )
    avatar = FakeAvatar(Policy(rules=rules), reactor, resolver=resolver)
    opener = avatar.channelLookup[b"direct-tcpip"]
    try:
        chan = yield opener(
            remoteWindow=1 << 20,
            remoteMaxPacket=32768,
            data=directTcpip(b"app.test", port),
            avatar=avatar,
        )
        assert isinstance(chan, RelayChannel)
        assert chan.socket.transport.getPeer().host == "127.0.0.1"
        assert lookups == [("app.test", port)] and len(accepted) == 1
        chan.socket.transport.abortConnection()
        with pytest.raises(ConchError) as raised:
            yield opener(
                remoteWindow=1, remoteMaxPacket=1, data=directTcpip(b"db.test", port), avatar=avatar
            )
        assert raised.value.args == (
            f"forwarding to db.test:{port} refused by policy rule 'no-internal'",
            connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
        )
        assert lookups[1:] == [("db.test", port)] and len(accepted) == 1
    finally:
        yield defer.maybeDeferred(listening.stopListening)
