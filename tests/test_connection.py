"""AgentConnection's windows: one connection's channels share a bounded budget."""

from __future__ import annotations

import struct

from twisted.conch.ssh import connection

from coderagent.ssh.connection import AgentConnection
from coderagent.ssh.windows import CHANNEL_WINDOW, CONNECTION_WINDOW_BUDGET, MIN_CHANNEL_WINDOW
from tests.fakes import FakeSSHTransport, ManyChannels, openPacket


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
