"""AgentConnection's windows: one connection's channels share a bounded budget.

The last test checks the flow-control contract of ``coderagent.ssh.interfaces``
on both sides: the channels the agent opens and the connection (and the fakes
standing in for them).
"""

from __future__ import annotations

import struct

from twisted.conch.ssh import connection
from twisted.internet.testing import MemoryReactor
from zope.interface.verify import verifyClass, verifyObject

from coderagent.policy import Policy
from coderagent.ssh.connection import AgentConnection
from coderagent.ssh.environment import UserInfo
from coderagent.ssh.forwarding.relay import RelayChannel, SocketSide
from coderagent.ssh.interfaces import IChannelWindows, IWindowedChannel
from coderagent.ssh.session import SessionChannel, SessionContext
from coderagent.ssh.windows import CHANNEL_WINDOW, CONNECTION_WINDOW_BUDGET, MIN_CHANNEL_WINDOW
from tests.fakes import (
    FakeConn,
    FakeSocketTransport,
    FakeSSHTransport,
    ManyChannels,
    Opened,
    openPacket,
)


def _connection() -> tuple[AgentConnection, FakeSSHTransport, ManyChannels]:
    avatar = ManyChannels()
    conn = AgentConnection()
    transport = FakeSSHTransport(avatar)
    conn.transport = transport  # type: ignore[assignment]
    return conn, transport, avatar


def _advertised(transport: FakeSSHTransport) -> list[int]:
    return [
        struct.unpack(">4L", payload[:16])[2]
        for kind, payload in transport.packets
        if kind == connection.MSG_CHANNEL_OPEN_CONFIRMATION
    ]


def test_few_channels_get_openssh_windows_many_share_the_budget() -> None:
    conn, transport, _ = _connection()
    for sender in range(200):
        conn.ssh_CHANNEL_OPEN(openPacket(sender=sender))
    windows = _advertised(transport)
    full = CONNECTION_WINDOW_BUDGET // CHANNEL_WINDOW
    assert windows[:full] == [CHANNEL_WINDOW] * full
    assert windows[full:] == [MIN_CHANNEL_WINDOW] * (200 - full)
    # What the peer may send before we forward it: the budget, plus the
    # floor that keeps every further channel moving.
    assert sum(windows) <= CONNECTION_WINDOW_BUDGET + 200 * MIN_CHANNEL_WINDOW


def test_a_new_channel_gets_its_share_of_what_the_others_left() -> None:
    conn, transport, avatar = _connection()
    for sender in range(8):
        conn.ssh_CHANNEL_OPEN(openPacket(sender=sender))
    for chan in avatar.channels:
        chan.localWindowLeft = 0  # all used, nothing forwarded yet
    conn.ssh_CHANNEL_OPEN(openPacket(sender=8))
    assert _advertised(transport)[-1] == CONNECTION_WINDOW_BUDGET // 9


def test_a_channel_is_refilled_to_its_current_share() -> None:
    conn, transport, avatar = _connection()
    for sender in range(64):
        conn.ssh_CHANNEL_OPEN(openPacket(sender=sender))
    chan = avatar.channels[0]
    assert chan.localWindowLeft == CHANNEL_WINDOW
    share = CONNECTION_WINDOW_BUDGET // 64
    transport.packets.clear()
    conn.channelDataReceived(chan.id, b"x" * 32768)
    # Still above half of its share: no adjust yet.
    assert transport.packets == []
    chan.localWindowLeft = share // 2 - 1
    conn.reopenWindow(chan)
    [(kind, payload)] = transport.packets
    assert kind == connection.MSG_CHANNEL_WINDOW_ADJUST
    assert struct.unpack(">2L", payload)[1] == share - (share // 2 - 1)
    assert chan.localWindowLeft == share


def test_a_paused_consumer_keeps_the_window_shut() -> None:
    conn, transport, avatar = _connection()
    conn.ssh_CHANNEL_OPEN(openPacket())
    chan = avatar.channels[0]
    chan.consumerPaused = True
    chan.localWindowLeft = 0
    transport.packets.clear()
    conn.reopenWindow(chan)
    assert transport.packets == []


def _session() -> SessionChannel:
    user = UserInfo(name="dev", home="/", shell="/bin/sh")
    return SessionChannel(
        SessionContext(policy=Policy(), reactor=MemoryReactor(), user=user, agentEnvironment={})
    )


def test_the_channels_and_the_connection_declare_and_meet_the_flow_control_contract() -> None:
    sock = SocketSide()
    sock.makeConnection(FakeSocketTransport())
    for cls, chan in (
        (RelayChannel, RelayChannel(sock, conn=FakeConn())),
        (SessionChannel, _session()),
        (Opened, Opened()),
    ):
        assert verifyClass(IWindowedChannel, cls)
        assert verifyObject(IWindowedChannel, chan)
        assert chan.windowCap == chan.localWindowSize == CHANNEL_WINDOW
        assert chan.consumerPaused is False
    for cls, conn in ((AgentConnection, AgentConnection()), (FakeConn, FakeConn())):
        assert verifyClass(IChannelWindows, cls)
        assert verifyObject(IChannelWindows, conn)
