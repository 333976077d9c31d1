"""``--forwarding-policy-file`` and authorized_keys options, end to end with the OpenSSH client.

The README's example policies are the fixtures where a real path allows it; refusals are
checked as OpenSSH shows them (``open failed: administratively prohibited: <reason>``,
``remote port forwarding failed``), in the agent's log (the rule named) and its metrics.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.agentproc import TIMEOUT, Agent, ClientKeys, runningAgent
from tests.integration.test_forwarding import (
    TCPServer,
    UnixServer,
    _Echo,
    clientOptions,
    freePort,
    refused,
    runSsh,
    serving,
    sshMaster,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
METRICS = re.compile(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+)")


@contextmanager
def withPolicy(keys: ClientKeys, workdir: Path, policy: Path, *extra: str) -> Iterator[Agent]:
    with runningAgent(keys, workdir, [f"--forwarding-policy-file={policy}", *extra]) as agent:
        agent.waitForLog(r"forwarding policy .* loaded")
        yield agent


def stdio(agent: Agent, key: Path, target: str) -> subprocess.CompletedProcess[bytes]:
    """``ssh -W target``, sending ``ping`` (an echo server answers it)."""
    return runSsh(agent, key, "-W", target, input=b"ping")


def prohibited(done: subprocess.CompletedProcess[bytes], reason: str) -> bool:
    """Refused by the agent's policy, with ``reason`` in what OpenSSH printed."""
    text = done.stderr.decode()
    return (
        done.returncode == 255
        and "open failed: administratively prohibited: " in text
        and (reason in text)
    )


def reverse(agent: Agent, key: Path, spec: str) -> subprocess.CompletedProcess[bytes]:
    """``ssh -R spec true`` that fails if the forward is refused."""
    return subprocess.run(
        [
            "ssh",
            *clientOptions(agent, key),
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            spec,
            f"coder@{agent.host}",
            "true",
        ],
        capture_output=True,
        timeout=TIMEOUT,
    )


def metric(agent: Agent, name: str) -> float:
    port = agent.waitForLog(METRICS).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def portIn(low: int, high: int) -> int:
    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {low}-{high}")


class PortServer(TCPServer):
    """An echo server on a given port."""

    def __init__(self, port: int) -> None:
        socketserver.ThreadingTCPServer.__init__(self, ("127.0.0.1", port), _Echo)
        self.sawEOF: queue.Queue[object] = queue.Queue()


# -- the README's examples ------------------------------------------------------------------


def test_dev_server_example(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with withPolicy(clientKeys, tmp_path, EXAMPLES / "dev-server-only.toml") as agent:
        devPort = portIn(3000, 4000)
        with serving(PortServer(devPort)), serving(TCPServer(_Echo)) as other:
            assert stdio(agent, clientKeys.key, f"127.0.0.1:{devPort}").stdout == b"ping"
            assert stdio(agent, clientKeys.key, f"localhost:{devPort}").stdout == b"ping"
            outside = stdio(agent, clientKeys.key, f"127.0.0.1:{other.port}")
            assert prohibited(
                outside,
                f"forwarding to 127.0.0.1:{other.port} refused by policy rule 'local_tcp default'",
            ), outside.stderr
            cluster = stdio(agent, clientKeys.key, "10.255.0.1:3000")
            assert prohibited(
                cluster,
                "forwarding to 10.255.0.1:3000 refused by policy rule 'no-internal-networks'",
            ), cluster.stderr
        agent.waitForLog(
            r"local port forward blocked: direct-tcpip to 10\.255\.0\.1:3000 from .*"
            r"refused by policy rule 'no-internal-networks'"
        )
        assert metric(agent, "agent_ssh_forwarding_refused_by_rule_total") == 2


def test_oauth_callback_example(clientKeys: ClientKeys, tmp_path: Path) -> None:
    with withPolicy(clientKeys, tmp_path, EXAMPLES / "oauth-callback.toml") as agent:
        with serving(TCPServer(_Echo)) as echo:
            allowed = reverse(agent, clientKeys.key, f"127.0.0.1:8976:127.0.0.1:{echo.port}")
            assert allowed.returncode == 0, allowed.stderr
            for spec in (f"0.0.0.0:8976:127.0.0.1:{echo.port}", f"127.0.0.1:8977:x:{echo.port}"):
                done = reverse(agent, clientKeys.key, spec)
                assert done.returncode == 255
                assert b"remote port forwarding failed" in done.stderr
        agent.waitForLog(r"refused by policy rule 'reverse_tcp default'")


def test_unix_socket_rules_on_normalised_paths(clientKeys: ClientKeys, tmp_path: Path) -> None:
    """The gpg-agent example's shape, under a directory of the test's own."""
    with tempfile.TemporaryDirectory(prefix="pf", dir="/tmp") as d:
        base = Path(d)
        policy = tmp_path / "gpg.toml"
        policy.write_text(
            (EXAMPLES / "gpg-agent.toml").read_text().replace('"/run/user/', f'"{base}/run/user/')
        )
        target = base / "target.sock"
        with serving(UnixServer(target, _Echo)):
            with withPolicy(clientKeys, tmp_path / "agent", policy) as agent:
                gnupg = base / "run" / "user" / "1000" / "gnupg"
                ok = reverse(agent, clientKeys.key, f"{gnupg}/S.gpg-agent:{target}")
                assert ok.returncode == 0, ok.stderr
                for path in (f"{gnupg}/../gnupg/S.gpg-agent.ssh", f"{base}/other.sock"):
                    done = reverse(agent, clientKeys.key, f"{path}:{target}")
                    assert done.returncode == 255, path
                assert not (gnupg / "S.gpg-agent.ssh").exists()
                with sshMaster(agent, clientKeys.key, base) as master:
                    master.forward("-L", f"{base}/local.sock:{target}")
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(TIMEOUT)
                        s.connect(f"{base}/local.sock")
                        assert s.recv(1) == b""  # refused: the client drops this socket
                agent.waitForLog(
                    rf"unix local port forward blocked: direct-streamlocal to {target} .*"
                    r"refused by policy rule 'local_unix default'"
                )


# -- resolving first ------------------------------------------------------------------------


def test_a_name_is_decided_per_address_and_only_allowed_ones_are_connected_to(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[local_tcp]\ndefault = "deny"\n'
        '[[local_tcp.rules]]\nname = "no-v6-loopback"\naction = "deny"\nhost = "::1"\n'
        '[[local_tcp.rules]]\nname = "localhost"\naction = "allow"\nhost = "localhost"\n'
    )
    with withPolicy(clientKeys, tmp_path / "agent", policy) as agent:
        with serving(TCPServer(_Echo)) as echo:  # on 127.0.0.1 only
            assert stdio(agent, clientKeys.key, f"localhost:{echo.port}").stdout == b"ping"
            literal = stdio(agent, clientKeys.key, f"[::1]:{echo.port}")
            assert prohibited(literal, "refused by policy rule 'no-v6-loopback'"), literal.stderr


# -- authorized_keys options ----------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> ClientKeys:
    return ClientKeys.create(tmp_path / "keys")


def test_two_keys_one_agent_each_with_its_options(keys: ClientKeys, tmp_path: Path) -> None:
    with serving(TCPServer(_Echo)) as allowed, serving(TCPServer(_Echo)) as other:
        restricted = Path(f"{keys.otherKey}.pub").read_text().strip()
        keys.authorizedKeys.write_text(
            keys.authorizedKeys.read_text()
            + f'restrict,port-forwarding,permitopen="127.0.0.1:{allowed.port}" {restricted}\n'
        )
        with runningAgent(keys, tmp_path / "agent") as agent:
            for port in (allowed.port, other.port):  # the unrestricted key: anywhere
                assert stdio(agent, keys.key, f"127.0.0.1:{port}").stdout == b"ping"
            assert stdio(agent, keys.otherKey, f"127.0.0.1:{allowed.port}").stdout == b"ping"
            done = stdio(agent, keys.otherKey, f"127.0.0.1:{other.port}")
            assert prohibited(done, "refused by the key's options"), done.stderr
            agent.waitForLog(r"refused by the key's options \(restrict,port-forwarding,")


def test_no_port_forwarding_refuses_every_direction(keys: ClientKeys, tmp_path: Path) -> None:
    key = Path(f"{keys.key}.pub").read_text().strip()
    keys.authorizedKeys.write_text(f"no-port-forwarding {key}\n")
    with serving(TCPServer(_Echo)) as echo, runningAgent(keys, tmp_path / "agent") as agent:
        assert prohibited(stdio(agent, keys.key, f"127.0.0.1:{echo.port}"), "refused by the")
        assert reverse(agent, keys.key, f"127.0.0.1:0:127.0.0.1:{echo.port}").returncode == 255


def test_from_allows_only_the_addresses_it_names(keys: ClientKeys, tmp_path: Path) -> None:
    key = Path(f"{keys.key}.pub").read_text().strip()
    keys.authorizedKeys.write_text(f'from="127.0.0.2" {key}\n')
    with runningAgent(keys, tmp_path / "agent") as agent:
        near = subprocess.run(
            [
                "ssh",
                *clientOptions(agent, keys.key),
                "-b",
                "127.0.0.2",
                f"coder@{agent.host}",
                "echo in",
            ],
            capture_output=True,
            timeout=TIMEOUT,
        )
        assert (near.returncode, near.stdout) == (0, b"in\n"), near.stderr
        far = runSsh(agent, keys.key, "-T", input=b"")
        assert far.returncode == 255 and b"Permission denied" in far.stderr
        agent.waitForLog(r"not from a permitted host \(from='127\.0\.0\.2'\)")


# -- audit mode and reload ------------------------------------------------------------------


def test_audit_mode_lets_through_and_counts(clientKeys: ClientKeys, tmp_path: Path) -> None:
    policy = tmp_path / "audit.toml"
    policy.write_text('mode = "audit"\n[local_tcp]\ndefault = "deny"\n')
    with withPolicy(clientKeys, tmp_path / "agent", policy) as agent:
        with serving(TCPServer(_Echo)) as echo:
            assert stdio(agent, clientKeys.key, f"127.0.0.1:{echo.port}").stdout == b"ping"
        agent.waitForLog(r"would be refused \(audit mode\): direct-tcpip to 127\.0\.0\.1")
        assert metric(agent, "agent_ssh_forwarding_would_refuse_total") == 1
        assert metric(agent, "agent_ssh_forwarding_refused_total") == 0


def test_reload_closes_forbidden_listeners_and_leaves_channels_alone(
    clientKeys: ClientKeys, tmp_path: Path, sockdir: Path
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[reverse_tcp]\ndefault = "allow"\n')
    payload = os.urandom(256 * 1024)
    with withPolicy(clientKeys, tmp_path / "agent", policy) as agent:
        with serving(TCPServer(_Echo)) as echo, sshMaster(agent, clientKeys.key, sockdir) as m:
            listen = freePort()
            m.forward("-R", f"127.0.0.1:{listen}:127.0.0.1:{echo.port}")
            local = freePort()
            m.forward("-L", f"127.0.0.1:{local}:127.0.0.1:{echo.port}")
            results: list[bytes] = []
            started = threading.Barrier(21)

            def transfer() -> None:
                with socket.create_connection(("127.0.0.1", local), timeout=TIMEOUT) as s:
                    s.sendall(payload[:1024])
                    got = b""
                    while len(got) < 1024:
                        got += s.recv(65536)
                    started.wait(TIMEOUT)  # every transfer is open when the policy changes
                    s.sendall(payload[1024:])
                    s.shutdown(socket.SHUT_WR)
                    while chunk := s.recv(65536):
                        got += chunk
                    results.append(got)

            threads = [threading.Thread(target=transfer) for _ in range(20)]
            for t in threads:
                t.start()
            started.wait(TIMEOUT)
            policy.write_text('[reverse_tcp]\ndefault = "deny"\n')
            agent.process.send_signal(signal.SIGHUP)
            for t in threads:
                t.join(TIMEOUT)
            assert results == [payload] * 20
            agent.waitForLog(rf"closing the reverse forward 127\.0\.0\.1:{listen} of ")
            assert refused(listen)


def test_an_invalid_reload_keeps_the_policy(clientKeys: ClientKeys, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[local_tcp]\ndefault = "deny"\n')
    with withPolicy(clientKeys, tmp_path / "agent", policy) as agent:
        policy.write_text('[local_tcp]\ndefault = "perhaps"\n')
        agent.process.send_signal(signal.SIGHUP)
        agent.waitForLog(r"not reloaded \(SIGHUP\), the previous one stays in force: line 1")
        assert metric(agent, "agent_policy_reload_errors_total") == 1
        with serving(TCPServer(_Echo)) as echo:
            assert prohibited(stdio(agent, clientKeys.key, f"127.0.0.1:{echo.port}"), "refused")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pr", dir="/tmp") as d:
        yield Path(d)


def command(
    agent: Agent, key: Path, *options: str, run: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``ssh [options] host [run]`` with nothing on stdin."""
    return subprocess.run(
        ["ssh", *clientOptions(agent, key), *options, f"coder@{agent.host}"]
        + ([run] if run is not None else []),
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
    )


def test_no_pty_refuses_the_terminal_and_not_the_session(keys: ClientKeys, tmp_path: Path) -> None:
    key = Path(f"{keys.key}.pub").read_text().strip()
    keys.authorizedKeys.write_text(f"no-pty {key}\n")
    with runningAgent(keys, tmp_path / "agent") as agent:
        # OpenSSH gives up when a terminal it insisted on (-tt) is refused, as with sshd.
        forced = command(agent, keys.key, "-tt", run="true")
        assert forced.returncode == 255
        assert b"PTY allocation request failed on channel 0" in forced.stderr
        agent.waitForLog(r"pty-req refused for .*: refused by the key's options \(no-pty\)")
        plain = command(agent, keys.key, "-T", run="tty; echo status=$?")
        assert (plain.returncode, plain.stdout) == (0, b"not a tty\nstatus=1\n"), plain.stderr


def test_a_forced_command_runs_instead_and_sees_what_was_asked(
    keys: ClientKeys, tmp_path: Path
) -> None:
    forced = Path(f"{keys.otherKey}.pub").read_text().strip()
    keys.authorizedKeys.write_text(
        keys.authorizedKeys.read_text()
        + f'command="printf \'[%s]\' \\"${{SSH_ORIGINAL_COMMAND-unset}}\\"" {forced}\n'
    )
    with runningAgent(keys, tmp_path / "agent") as agent:
        asked = command(agent, keys.otherKey, run="echo hi; rm -rf x")
        assert (asked.returncode, asked.stdout) == (0, b"[echo hi; rm -rf x]"), asked.stderr
        shell = command(agent, keys.otherKey, "-T")
        assert (shell.returncode, shell.stdout) == (0, b"[unset]"), shell.stderr
        # A subsystem request (what sftp sends) runs the forced command instead.
        subsystem = command(agent, keys.otherKey, "-s", run="sftp")
        assert (subsystem.returncode, subsystem.stdout) == (0, b"[sftp]"), subsystem.stderr
        plain = command(agent, keys.key, run="echo ${SSH_ORIGINAL_COMMAND-unset}")
        assert plain.stdout == b"unset\n", plain.stderr
