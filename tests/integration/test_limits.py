# paramiko is unannotated.
# mypy: disallow-untyped-calls=False
"""One connection at its limits, against the real agent: refused explicitly, others unharmed.

Issue 11: with the soft limit at 1024, one connection opened 1009 reverse
listeners; then logins, sessions and the coderd reconnect failed.  Here each
limit is driven to its cap with paramiko, and a second connection (and
coderd) must not notice.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import paramiko
import paramiko.common
import pytest

from tests.agentproc import TIMEOUT, Agent, ClientKeys, runningAgent, spawnCoderd, ssh
from tests.integration.test_coderd import CONNECTED
from tests.integration.test_forwarding import (
    TCPServer,
    _Echo,
    execWorks,
    paramikoTransport,
    serving,
)
from tests.integration.test_operability import get, listening, samples

CAPS = [
    "--ssh-max-sessions=2",
    "--ssh-max-channels=6",
    "--ssh-max-reverse-forwards=3",
    "--ssh-max-env-bytes=64KiB",
]


@pytest.fixture(scope="module")
def capped(clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with runningAgent(clientKeys, tmp_path_factory.mktemp("capped"), CAPS) as running:
        yield running


def refusals(agent: Agent, limit: str) -> float:
    text = get(listening(agent, "Prometheus metrics") + "/metrics")[2]
    return samples(text)[f'agent_ssh_limit_refused_total{{limit="{limit}"}}']


def clientPort(transport: paramiko.Transport) -> int:
    return int(transport.sock.getsockname()[1])


def warnedOnce(agent: Agent, port: int, text: str) -> None:
    """The agent logged ``text`` for the connection from ``port``, and only once."""
    pattern = rf"\[warn\].*127\.0\.0\.1:{port}\b.*{re.escape(text)}"
    agent.waitForLog(pattern)
    assert len(re.findall(pattern, agent.log())) == 1, agent.log()


def openFails(caplog: pytest.LogCaptureFixture, open_: object) -> str:
    """The reason text of a channel open refused with "resource shortage".

    paramiko's exception carries only the code; the agent's text is in its log.
    """
    caplog.clear()
    with pytest.raises(paramiko.ChannelException) as refused:
        open_()  # type: ignore[operator]
    assert refused.value.code == paramiko.common.OPEN_FAILED_RESOURCE_SHORTAGE
    [failed] = [r.getMessage() for r in caplog.records if "open FAILED" in r.getMessage()]
    return failed.split("open FAILED: ", 1)[1].rsplit(": Resource shortage", 1)[0]


def test_sessions_beyond_the_cap_are_a_resource_shortage(
    capped: Agent, clientKeys: ClientKeys, caplog: pytest.LogCaptureFixture
) -> None:
    before = refusals(capped, "sessions")
    transport = paramikoTransport(capped, clientKeys.key)
    port = clientPort(transport)
    try:
        sessions = [transport.open_session(timeout=TIMEOUT) for _ in range(2)]
        for _ in range(5):
            refused = openFails(caplog, lambda: transport.open_session(timeout=TIMEOUT))
            assert refused == "too many sessions on this connection"
        sessions[0].close()
        assert execWorks(transport)  # one freed: a session opens again
        assert ssh(capped, clientKeys.key, "echo other").stdout == b"other\n"
    finally:
        transport.close()
    warnedOnce(capped, port, "reached its limit of 2 open sessions (--ssh-max-sessions)")
    assert refusals(capped, "sessions") == before + 5


def test_channels_beyond_the_cap_are_a_resource_shortage(
    capped: Agent, clientKeys: ClientKeys, caplog: pytest.LogCaptureFixture
) -> None:
    before = refusals(capped, "channels")
    transport = paramikoTransport(capped, clientKeys.key)
    port = clientPort(transport)
    with serving(TCPServer(_Echo)) as echo:
        try:
            opened = [transport.open_session(timeout=TIMEOUT)]
            target = ("127.0.0.1", echo.port)
            for _ in range(5):
                opened.append(transport.open_channel("direct-tcpip", target, ("127.0.0.1", 1)))
            for _ in range(3):
                refused = openFails(
                    caplog,
                    lambda: transport.open_channel("direct-tcpip", target, ("127.0.0.1", 1)),
                )
                assert refused == "too many channels on this connection"
            refused = openFails(caplog, lambda: transport.open_session(timeout=TIMEOUT))
            assert refused == "too many channels on this connection"
            # A forwarded connection at the cap is closed at once, and counted.
            bound = transport.request_port_forward("127.0.0.1", 0)
            with socket.create_connection(("127.0.0.1", bound), timeout=TIMEOUT) as s:
                s.settimeout(TIMEOUT)
                assert s.recv(1) == b""
            opened.pop().close()
            # Answered after the close, so the agent has forgotten the channel by then.
            transport.global_request("keepalive@openssh.com", wait=True)
            with socket.create_connection(("127.0.0.1", bound), timeout=TIMEOUT) as s:
                s.settimeout(TIMEOUT)
                forwarded = transport.accept(TIMEOUT)
                assert forwarded is not None
                forwarded.sendall(b"back")
                assert s.recv(4) == b"back"
        finally:
            transport.close()
    warnedOnce(capped, port, "reached its limit of 6 open channels (--ssh-max-channels)")
    assert refusals(capped, "channels") == before + 5


def test_reverse_forwards_beyond_the_cap_fail(
    capped: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    before = refusals(capped, "reverse_forwards")
    transport = paramikoTransport(capped, clientKeys.key)
    port = clientPort(transport)
    try:
        ports = [transport.request_port_forward("127.0.0.1", 0) for _ in range(3)]
        for _ in range(10):
            with pytest.raises(paramiko.SSHException, match="denied"):
                transport.request_port_forward("127.0.0.1", 0)
        path = tmp_path / "r.sock"
        reply = transport.global_request(
            "streamlocal-forward@openssh.com", (str(path),), wait=True
        )
        assert reply is None and not path.exists()
        transport.cancel_port_forward("127.0.0.1", ports[0])
        capped.waitForLog(rf"stopped forwarding 127\.0\.0\.1:{ports[0]}\b")
        assert transport.request_port_forward("127.0.0.1", 0) != 0  # one freed
        assert execWorks(transport)
    finally:
        transport.close()
    warnedOnce(
        capped, port, "reached its limit of 3 reverse forwards (--ssh-max-reverse-forwards)"
    )
    assert refusals(capped, "reverse_forwards") == before + 11


def test_env_beyond_its_total_size_is_refused(capped: Agent, clientKeys: ClientKeys) -> None:
    before = refusals(capped, "env_bytes")
    transport = paramikoTransport(capped, clientKeys.key)
    port = clientPort(transport)
    try:
        chan = transport.open_session(timeout=TIMEOUT)
        chan.settimeout(TIMEOUT)
        chan.set_environment_variable("FIRST", "a" * 40000)
        for i in range(20):
            chan.set_environment_variable(f"BIG{i}", "b" * 40000)  # over 64 KiB in all
        chan.set_environment_variable("SMALL", "c")  # still fits
        chan.exec_command('printf "%s %s %s" "${#FIRST}" "${#BIG0}" "$SMALL"')
        out = b""
        while data := chan.recv(4096):
            out += data
        assert (out, chan.recv_exit_status()) == (b"40000 0 c", 0)
    finally:
        transport.close()
    warnedOnce(capped, port, "reached its limit of 65536 bytes of env in a session")
    assert refusals(capped, "env_bytes") == before + 20


# -- the descriptor reserve -----------------------------------------------------------

#: The agent's open file limit, soft and hard: the default caps (256 reverse forwards,
#: 1024 channels) do not fit, so the reserve is what stops the first connection.
NOFILE = 192


def descriptors(agent: Agent) -> int:
    return len(os.listdir(f"/proc/{agent.process.pid}/fd"))


def test_a_connection_at_its_maximum_leaves_logins_sessions_and_coderd_working(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    coderd = spawnCoderd(tmp_path / "coderd", "tok")
    port = coderd.port
    args = [f"--agent-url={coderd.url}", "--agent-token=tok"]
    prefix = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]
    try:
        with (
            runningAgent(clientKeys, tmp_path / "agent", args, prefix=prefix) as agent,
            serving(TCPServer(_Echo)) as echo,
        ):
            agent.waitForLog(rf"open file limit: {NOFILE} \(the hard limit\)")
            agent.waitForLog(CONNECTED)
            first = paramikoTransport(agent, clientKeys.key)
            try:
                # The first user takes all it can: forwarded connections, listeners.
                def forward() -> paramiko.Channel:
                    return first.open_channel(
                        "direct-tcpip", ("127.0.0.1", echo.port), ("127.0.0.1", 1)
                    )

                channels = [forward() for _ in range(20)]
                listeners = 0
                for _ in range(256):
                    try:
                        first.request_port_forward("127.0.0.1", 0)
                    except paramiko.SSHException:
                        break
                    listeners += 1
                assert 0 < listeners < 256
                with pytest.raises(paramiko.ChannelException) as refused:
                    forward()
                assert refused.value.code == paramiko.common.OPEN_FAILED_RESOURCE_SHORTAGE
                held = descriptors(agent)
                assert NOFILE - 64 - 8 <= held <= NOFILE - 64 + 8, held
                # The second user logs in and runs a command.
                second = ssh(agent, clientKeys.key, "echo second user")
                assert (second.returncode, second.stdout) == (0, b"second user\n"), second.stderr
                # The first one's sessions still start, and its forwards still carry data.
                assert execWorks(first)
                channels[0].sendall(b"ping")
                assert channels[0].recv(4) == b"ping"
                # coderd restarts: the agent reconnects.
                coderd.process.kill()
                coderd.process.wait(TIMEOUT)
                coderd = spawnCoderd(tmp_path / "coderd2", "tok", port=port)
                agent.waitForCount(CONNECTED, 2)
            finally:
                first.close()
            assert len(re.findall(r"only \d+ file descriptors are left", agent.log())) == 1
            # Once the first connection is gone, its descriptors are free again.
            agent.waitForCount(r"stopped forwarding 127\.0\.0\.1:", listeners)
            again = paramikoTransport(agent, clientKeys.key)
            try:
                assert again.request_port_forward("127.0.0.1", 0) != 0
            finally:
                again.close()
    finally:
        coderd.stop()
