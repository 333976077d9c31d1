"""The debug server's view of the live SSH connections, from the factory's set."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from coderagent.observe.connections import describeConnections
from coderagent.policy import Policy
from coderagent.ssh.connection import AgentConnection
from coderagent.ssh.environment import UserInfo
from coderagent.ssh.session import SessionChannel, SessionContext
from coderagent.ssh.transport import AgentServerTransport
from tests.fakes import FakeAvatar, FakeSSHTransport, Opened


class _Listener:
    def __init__(self, description: str) -> None:
        self.description = description

    def close(self) -> None:
        return None


def _session(command: str | None) -> SessionChannel:
    user = UserInfo(name="dev", home="/", shell="/bin/sh")
    chan = SessionChannel(
        SessionContext(policy=Policy(), reactor=MemoryReactor(), user=user, agentEnvironment={})
    )
    chan.command = command
    return chan


def test_each_connection_is_described_with_its_channels_and_forwards() -> None:
    clock = Clock()
    t = AgentServerTransport()
    t.transport = FakeSSHTransport()  # type: ignore[assignment]
    t.otherVersionString = b"SSH-2.0-OpenSSH_9.6"
    t.authenticated = True
    t.since = 2.0
    conn = AgentConnection()
    t.service = conn
    for number, chan in enumerate((_session("cat"), _session(None), Opened(name=b"direct-tcpip"))):
        chan.id = number
        conn.channels[number] = chan
    avatar = FakeAvatar(Policy())
    avatar.username = "coder"  # type: ignore[attr-defined]
    avatar.forwards.add(("unix", "/tmp/b.sock", 0), _Listener("/tmp/b.sock"))
    avatar.forwards.add(("tcp", "localhost", 8080), _Listener("localhost:8080"))
    t.avatar = avatar
    fresh = AgentServerTransport()  # connected, not yet past the version exchange
    fresh.since = 7.0
    clock.advance(7.5)
    assert describeConnections([t, fresh], clock) == [
        {
            "peer": "192.0.2.7:50000",
            "user": "coder",
            "authenticated": True,
            "connected_seconds": 5.5,
            "client": "SSH-2.0-OpenSSH_9.6",
            "channels": [
                {"id": 0, "type": "session", "command": "cat", "pty": False},
                {"id": 1, "type": "session", "pty": False},
                {"id": 2, "type": "direct-tcpip", "pty": False},
            ],
            "forwards": ["/tmp/b.sock", "localhost:8080"],
        },
        {
            "peer": "?",
            "user": None,
            "authenticated": False,
            "connected_seconds": 0.5,
            "client": "",
            "channels": [],
            "forwards": [],
        },
    ]
