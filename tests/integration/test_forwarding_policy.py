"""``--block-local-port-forwarding`` / ``--block-reverse-port-forwarding`` end to end.

Each block is tried both as a flag and as its ``CODER_AGENT_*`` variable.  A
blocked direction must refuse both its paths (TCP and Unix) the way upstream
does on the wire; the other direction, sessions and exec must keep working.
Exact reason codes and texts are checked with asyncssh, which reports them
as received.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.agentproc import TIMEOUT, Agent, ClientKeys, runningAgent, ssh
from tests.integration.test_forwarding import (
    TCPServer,
    UnixServer,
    _Echo,
    echoThrough,
    freePort,
    refused,
    runSsh,
    serving,
    sshMaster,
)

LOCAL_FLAG, LOCAL_ENV = "--block-local-port-forwarding", "CODER_AGENT_BLOCK_LOCAL_PORT_FORWARDING"
REVERSE_FLAG, REVERSE_ENV = (
    "--block-reverse-port-forwarding",
    "CODER_AGENT_BLOCK_REVERSE_PORT_FORWARDING",
)


def _start(
    how: str,
    blocks: list[tuple[str, str]],
    clientKeys: ClientKeys,
    tmp: pytest.TempPathFactory,
) -> Iterator[Agent]:
    args = [flag for flag, _ in blocks] if how == "flag" else []
    env = {name: "true" for _, name in blocks} if how == "env" else {}
    with runningAgent(clientKeys, tmp.mktemp("agent-" + how), args, env) as running:
        yield running


@pytest.fixture(scope="module", params=["flag", "env"])
def localBlocked(
    request: pytest.FixtureRequest, clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    yield from _start(request.param, [(LOCAL_FLAG, LOCAL_ENV)], clientKeys, tmp_path_factory)


@pytest.fixture(scope="module", params=["flag", "env"])
def reverseBlocked(
    request: pytest.FixtureRequest, clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    yield from _start(request.param, [(REVERSE_FLAG, REVERSE_ENV)], clientKeys, tmp_path_factory)


@pytest.fixture(scope="module")
def bothBlocked(
    clientKeys: ClientKeys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    blocks = [(LOCAL_FLAG, LOCAL_ENV), (REVERSE_FLAG, REVERSE_ENV)]
    yield from _start("flag", blocks, clientKeys, tmp_path_factory)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fp", dir="/tmp") as d:
        yield Path(d)


# -- what each refusal looks like to OpenSSH ---------------------------------------------


def assertStdioForwardProhibited(agent: Agent, key: Path) -> None:
    port = freePort()
    done = runSsh(agent, key, "-W", f"127.0.0.1:{port}", input=b"x")
    assert done.returncode == 255
    assert (
        "open failed: administratively prohibited: port forwarding is disabled"
        in done.stderr.decode()
    ), done.stderr
    agent.waitForLog(
        rf"\[warn\].*local port forward blocked: direct-tcpip to 127\.0\.0\.1:{port} from "
    )


def assertLocalForwardsProhibited(agent: Agent, key: Path, sockdir: Path) -> None:
    """``-L`` for TCP and for a Unix socket: accepted locally, refused by the agent."""
    target = sockdir / "target.sock"
    with serving(TCPServer(_Echo)) as echo, serving(UnixServer(target, _Echo)) as unixEcho:
        with sshMaster(agent, key, sockdir) as master:
            tcpLocal, unixLocal = freePort(), sockdir / "local.sock"
            master.forward("-L", f"127.0.0.1:{tcpLocal}:127.0.0.1:{echo.port}")
            master.forward("-L", f"{unixLocal}:{target}")
            for family, address in (
                (socket.AF_INET, ("127.0.0.1", tcpLocal)),
                (socket.AF_UNIX, str(unixLocal)),
            ):
                with socket.socket(family) as s:
                    s.settimeout(TIMEOUT)
                    s.connect(address)
                    # The client logs the refusal, then drops this socket.
                    assert s.recv(1) == b""
            log = master.logText()
        assert "open failed: administratively prohibited: port forwarding is disabled" in log
        assert "open failed: administratively prohibited: local port forwarding is disabled" in log
        # Nothing was connected on the agent's side.
        assert echo.sawEOF.empty() and unixEcho.sawEOF.empty()
    agent.waitForLog(
        rf"\[warn\].*local port forward blocked: direct-tcpip to 127\.0\.0\.1:{echo.port} from "
    )
    shown = re.escape(str(target))
    agent.waitForLog(rf"\[warn\].*unix local port forward blocked: direct-streamlocal to {shown}")


def assertReverseForwardsFail(agent: Agent, key: Path, sockdir: Path) -> None:
    port = freePort()
    done = runSsh(agent, key, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:22")
    assert done.returncode == 255
    assert f"remote port forwarding failed for listen port {port}" in done.stderr.decode()
    assert refused(port)  # nothing was bound
    path = sockdir / "sub" / "remote.sock"
    done = runSsh(
        agent, key, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{path}:{sockdir / 't.sock'}"
    )
    assert done.returncode == 255
    assert f"remote port forwarding failed for listen path {path}" in done.stderr.decode()
    assert not path.parent.exists()  # refused before anything was created
    agent.waitForLog(
        rf"\[warn\].*reverse port forward blocked: tcpip-forward on localhost:{port} from "
    )
    shown = re.escape(str(path))
    agent.waitForLog(
        rf"\[warn\].*unix reverse port forward blocked: streamlocal-forward on {shown}"
    )


def assertReverseForwardsWork(agent: Agent, key: Path, sockdir: Path) -> None:
    target, remote = sockdir / "target.sock", sockdir / "remote.sock"
    with serving(TCPServer(_Echo)) as echo, serving(UnixServer(target, _Echo)):
        with sshMaster(agent, key, sockdir) as master:
            port = int(master.forward("-R", f"0:127.0.0.1:{echo.port}").stdout.strip())
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                assert echoThrough(s, b"reverse tcp") == b"reverse tcp"
            master.forward("-R", f"{remote}:{target}")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(remote))
                assert echoThrough(s, b"reverse unix") == b"reverse unix"


def assertLocalForwardsWork(agent: Agent, key: Path, sockdir: Path) -> None:
    target, local = sockdir / "target.sock", sockdir / "local.sock"
    with serving(TCPServer(_Echo)) as echo, serving(UnixServer(target, _Echo)):
        done = runSsh(agent, key, "-W", f"127.0.0.1:{echo.port}", input=b"local tcp")
        assert (done.returncode, done.stdout) == (0, b"local tcp"), done.stderr
        with sshMaster(agent, key, sockdir) as master:
            master.forward("-L", f"{local}:{target}")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(local))
                assert echoThrough(s, b"local unix") == b"local unix"


def assertSessionsWork(agent: Agent, key: Path) -> None:
    done = ssh(agent, key, "echo exec-ok")
    assert (done.returncode, done.stdout) == (0, b"exec-ok\n"), done.stderr
    done = ssh(agent, key, input=b"echo shell-ok; exit 3\n", options=["-T"])
    assert (done.returncode, done.stdout.strip().splitlines()[-1]) == (3, b"shell-ok")


# -- the matrix ------------------------------------------------------------------------------


def test_local_block_refuses_stdio_forward(localBlocked: Agent, clientKeys: ClientKeys) -> None:
    assertStdioForwardProhibited(localBlocked, clientKeys.key)


def test_local_block_refuses_tcp_and_unix_local_forwards(
    localBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    assertLocalForwardsProhibited(localBlocked, clientKeys.key, sockdir)


def test_local_block_leaves_reverse_forwards_working(
    localBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    assertReverseForwardsWork(localBlocked, clientKeys.key, sockdir)


def test_reverse_block_refuses_tcp_and_unix_reverse_forwards(
    reverseBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    assertReverseForwardsFail(reverseBlocked, clientKeys.key, sockdir)


def test_reverse_block_leaves_local_forwards_working(
    reverseBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    assertLocalForwardsWork(reverseBlocked, clientKeys.key, sockdir)


def test_both_blocks_refuse_all_four_and_sessions_still_work(
    bothBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    assertStdioForwardProhibited(bothBlocked, clientKeys.key)
    assertLocalForwardsProhibited(bothBlocked, clientKeys.key, sockdir)
    assertReverseForwardsFail(bothBlocked, clientKeys.key, sockdir)
    assertSessionsWork(bothBlocked, clientKeys.key)
    assert "Traceback" not in bothBlocked.log()


# -- exact codes and texts, as a Go client would read them ------------------------------------


async def _refusals(agent: Agent, key: Path, sockdir: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with asyncssh.connect(
        agent.host,
        agent.port,
        username="coder",
        client_keys=[str(key)],
        known_hosts=None,
        config=[],
    ) as conn:
        for name, opening in (
            ("direct-tcpip", conn.open_connection("127.0.0.1", freePort())),
            ("direct-streamlocal", conn.open_unix_connection(str(sockdir / "x.sock"))),
        ):
            try:
                await opening
            except asyncssh.ChannelOpenError as e:
                seen[name] = (e.code, e.reason)
        try:
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
        except asyncssh.ChannelListenError as e:
            seen["tcpip-forward"] = type(e).__name__
        try:
            await conn.forward_remote_path(str(sockdir / "r.sock"), str(sockdir / "t.sock"))
        except asyncssh.ChannelListenError as e:
            seen["streamlocal-forward"] = type(e).__name__
        # The connection survives every refusal.
        done = await conn.run("echo ok", check=True)
        seen["exec"] = done.stdout
    return seen


def test_exact_reason_codes_and_texts(
    bothBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    seen = asyncio.run(asyncio.wait_for(_refusals(bothBlocked, clientKeys.key, sockdir), TIMEOUT))
    assert seen == {
        "direct-tcpip": (asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "port forwarding is disabled"),
        "direct-streamlocal": (
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "local port forwarding is disabled",
        ),
        "tcpip-forward": "ChannelListenError",
        "streamlocal-forward": "ChannelListenError",
        "exec": "ok\n",
    }
    assert asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED == 1
    assert not os.path.exists(sockdir / "r.sock")


def test_unblocked_connect_failures_are_connect_failed(
    reverseBlocked: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    """Local paths are allowed here: a missing target is code 2 with the dial error."""
    seen = asyncio.run(
        asyncio.wait_for(_refusals(reverseBlocked, clientKeys.key, sockdir), TIMEOUT)
    )
    code, reason = seen["direct-tcpip"]
    assert code == asyncssh.OPEN_CONNECT_FAILED == 2
    assert re.fullmatch(r"dial tcp 127\.0\.0\.1:\d+: connect: connection refused", reason)
    missing = sockdir / "x.sock"
    assert seen["direct-streamlocal"] == (
        asyncssh.OPEN_CONNECT_FAILED,
        f'dial unix socket "{missing}": dial unix {missing}: connect: no such file or directory',
    )
