# paramiko is unannotated.
# mypy: disallow-untyped-calls=False
"""The four forwarding paths against the real agent and the real OpenSSH client.

Data goes through real sockets: thread-based echo and sink servers in this
process, ``ssh -L``/``-R``/``-W`` (often through a ControlMaster, so a forward
can be added, used and cancelled on one connection).  Nothing sleeps to
synchronise: tests wait for client output, agent log lines, socket EOFs or
process exits, each with a bounded timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import socket
import socketserver
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_OPEN, cMSG_GLOBAL_REQUEST
from paramiko.message import Message

from coderagent.ssh.windows import CHANNEL_WINDOW
from tests.agentproc import TIMEOUT, Agent, ClientKeys, runningAgent, sshOptions

MiB = 1024 * 1024
DATA_SIZE = 6 * MiB


# -- helpers shared with test_forwarding_policy -----------------------------------


def clientOptions(agent: Agent, key: Path, logLevel: str = "INFO") -> list[str]:
    """``sshOptions`` with a log level that shows forwarding messages.

    OpenSSH keeps the *first* value of an option, so the level is replaced,
    not appended.
    """
    return [f"LogLevel={logLevel}" if o == "LogLevel=ERROR" else o for o in sshOptions(agent, key)]


def runSsh(
    agent: Agent,
    key: Path,
    *args: str,
    input: bytes = b"",
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", *clientOptions(agent, key), *args, f"coder@{agent.host}"],
        input=input,
        capture_output=True,
        timeout=timeout,
    )


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory: Unix socket paths must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="fw", dir="/tmp") as d:
        yield Path(d)


@dataclass
class Master:
    """A ControlMaster connection: forwards are added and cancelled through it."""

    agent: Agent
    control: Path
    log: Path

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-S", str(self.control), *args, f"coder@{self.agent.host}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def forward(self, *spec: str) -> subprocess.CompletedProcess[str]:
        done = self.command("-O", "forward", *spec)
        assert done.returncode == 0, done.stderr + self.logText()
        return done

    def logText(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def sshMaster(agent: Agent, key: Path, directory: Path, *extra: str) -> Iterator[Master]:
    """``ssh -fNM``: returns once authenticated (and, with ExitOnForwardFailure, forwarded)."""
    master = Master(agent, directory / "ctl", directory / "master.log")
    started = subprocess.run(
        [
            "ssh",
            *clientOptions(agent, key),
            "-f",
            "-N",
            "-M",
            "-S",
            str(master.control),
            "-o",
            "ControlPersist=no",
            "-E",
            str(master.log),
            *extra,
            f"coder@{agent.host}",
        ],
        capture_output=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert started.returncode == 0, started.stderr.decode() + master.logText()
        yield master
    finally:
        if master.control.exists():
            master.command("-O", "exit")


class _Echo(socketserver.BaseRequestHandler):
    """Echoes everything, then half-closes; records what it saw."""

    def handle(self) -> None:
        server: Any = self.server
        total = 0
        while True:
            data = self.request.recv(256 * 1024)
            if not data:
                break
            total += len(data)
            self.request.sendall(data)
        server.sawEOF.put(total)
        self.request.shutdown(socket.SHUT_WR)


class _Respond(socketserver.BaseRequestHandler):
    """Reads to EOF, then answers ``got:<data>``: proves the EOF arrived."""

    def handle(self) -> None:
        server: Any = self.server
        received = b""
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            received += data
        server.sawEOF.put(received)
        self.request.sendall(b"got:" + received)


class TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.sawEOF: queue.Queue[Any] = queue.Queue()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(str(path), handler)
        self.sawEOF: queue.Queue[Any] = queue.Queue()


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def echoThrough(sock: socket.socket, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` (then EOF) while reading the echo until EOF."""
    sock.settimeout(timeout)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    while True:
        chunk = sock.recv(256 * 1024)
        if not chunk:
            break
        chunks.append(chunk)
    sender.join(timeout)
    assert not errors, errors
    return b"".join(chunks)


def sameBytes(got: bytes, want: bytes) -> bool:
    return len(got) == len(want) and hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def stderrLines(process: subprocess.Popen[bytes]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def waitForLine(
    lines: queue.Queue[str | None], pattern: str, timeout: float = TIMEOUT
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {pattern!r} in {seen}") from None
        if line is None:
            raise AssertionError(f"process ended without {pattern!r}: {seen}")
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m


def paramikoTransport(agent: Agent, key: Path) -> paramiko.Transport:
    transport = paramiko.Transport((agent.host, agent.port))
    try:
        transport.start_client(timeout=TIMEOUT)
        transport.auth_publickey("coder", paramiko.Ed25519Key.from_private_key_file(str(key)))
    except paramiko.SSHException as e:
        # Say why: paramiko's own reason and the agent's side of the story.
        raise AssertionError(
            f"paramiko could not log in: {e!r} (transport: {transport.get_exception()!r}); "
            f"agent log tail:\n{''.join(agent.log().splitlines(True)[-30:])}"
        ) from e
    return transport


def execWorks(transport: paramiko.Transport) -> bool:
    chan = transport.open_session(timeout=TIMEOUT)
    chan.settimeout(TIMEOUT)
    chan.exec_command("echo still-here")
    out = b""
    while True:
        data = chan.recv(4096)
        if not data:
            break
        out += data
    return chan.recv_exit_status() == 0 and out == b"still-here\n"


def rawGlobalRequest(transport: paramiko.Transport, kind: str, payload: bytes) -> bool:
    """A global request with a hand-made payload; True on REQUEST_SUCCESS."""
    m = Message()
    m.add_byte(cMSG_GLOBAL_REQUEST)
    m.add_string(kind)
    m.add_boolean(True)
    m.add_bytes(payload)
    transport.completion_event = threading.Event()
    transport._send_user_message(m)
    assert transport.completion_event.wait(TIMEOUT), "no reply to the global request"
    assert transport.is_active()
    return transport.global_response is not None


def rawChannelOpen(transport: paramiko.Transport, kind: str, payload: bytes) -> int | None:
    """Open a channel with a hand-made payload; the failure code, or None if it opened."""
    chanid = transport._next_channel()
    chan = paramiko.Channel(chanid)
    transport._channels.put(chanid, chan)
    transport.channel_events[chanid] = event = threading.Event()
    transport.channels_seen[chanid] = True
    chan._set_transport(transport)
    chan._set_window(2 * MiB, 32768)
    m = Message()
    m.add_byte(cMSG_CHANNEL_OPEN)
    m.add_string(kind)
    m.add_int(chanid)
    m.add_int(2 * MiB)
    m.add_int(32768)
    m.add_bytes(payload)
    transport._send_user_message(m)
    assert event.wait(TIMEOUT), "no answer to the channel open"
    if transport._channels.get(chanid) is not None:
        chan.close()
        return None
    failure = transport.get_exception()
    assert isinstance(failure, paramiko.ChannelException), failure
    return int(failure.code)


def ns(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def vmKiB(pid: int, field_: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_ + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_} for {pid}")


# -- direct-tcpip ----------------------------------------------------------------


def test_local_tcp_forward_moves_data_byte_exact(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    data = os.urandom(DATA_SIZE)
    with serving(TCPServer(_Echo)) as echo, sshMaster(agent, clientKeys.key, sockdir) as master:
        local = freePort()
        master.forward("-L", f"127.0.0.1:{local}:127.0.0.1:{echo.port}")
        with socket.create_connection(("127.0.0.1", local), timeout=TIMEOUT) as s:
            got = echoThrough(s, data)
        assert sameBytes(got, data)
        assert echo.sawEOF.get(timeout=TIMEOUT) == len(data)


def test_stdio_forward_half_close_reaches_the_destination(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    """``printf x | ssh -W host:port`` returns, and the destination saw EOF."""
    with serving(TCPServer(_Respond)) as server:
        done = runSsh(agent, clientKeys.key, "-W", f"127.0.0.1:{server.port}", input=b"x")
        assert (done.returncode, done.stdout) == (0, b"got:x"), done.stderr
        assert server.sawEOF.get(timeout=TIMEOUT) == b"x"


def test_stdio_forward_is_byte_exact_both_ways(agent: Agent, clientKeys: ClientKeys) -> None:
    data = os.urandom(DATA_SIZE)
    with serving(TCPServer(_Echo)) as echo:
        done = runSsh(agent, clientKeys.key, "-W", f"127.0.0.1:{echo.port}", input=data)
        assert done.returncode == 0, done.stderr
        assert sameBytes(done.stdout, data)


def test_unreachable_target_is_an_open_failure_not_a_closed_channel(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    port = freePort()
    done = runSsh(agent, clientKeys.key, "-W", f"127.0.0.1:{port}", input=b"x")
    assert done.returncode == 255
    assert (
        f"open failed: connect failed: dial tcp 127.0.0.1:{port}: connect: connection refused"
        in done.stderr.decode()
    ), done.stderr


# -- tcpip-forward -------------------------------------------------------------------


def test_reverse_tcp_port_zero_reports_the_real_port_and_closes_with_the_connection(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    data = os.urandom(DATA_SIZE)
    with serving(TCPServer(_Echo)) as echo:
        client = subprocess.Popen(
            [
                "ssh",
                *clientOptions(agent, clientKeys.key),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                f"0:127.0.0.1:{echo.port}",
                f"coder@{agent.host}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            lines = stderrLines(client)
            m = waitForLine(
                lines, rf"Allocated port (\d+) for remote forward to 127\.0\.0\.1:{echo.port}"
            )
            port = int(m.group(1))
            assert port != 0
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                got = echoThrough(s, data)
            assert sameBytes(got, data)
        finally:
            client.terminate()
            client.wait(TIMEOUT)
        agent.waitForLog(rf"stopped forwarding localhost:{port}\b")
        assert refused(port)


def test_reverse_tcp_cancel_closes_the_listener(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    with serving(TCPServer(_Echo)) as echo, sshMaster(agent, clientKeys.key, sockdir) as master:
        spec = f"0:127.0.0.1:{echo.port}"
        port = int(master.forward("-R", spec).stdout.strip())
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            assert echoThrough(s, b"ping") == b"ping"
        cancelled = master.command("-O", "cancel", "-R", spec)
        assert cancelled.returncode == 0, cancelled.stderr
        agent.waitForLog(rf"stopped forwarding localhost:{port}\b")
        assert refused(port)
        # The connection itself is unaffected.
        assert master.command("-O", "check").returncode == 0


# -- direct-streamlocal@openssh.com ------------------------------------------------------


def test_local_unix_forward_moves_data_byte_exact(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    data = os.urandom(DATA_SIZE)
    target, local = sockdir / "target.sock", sockdir / "local.sock"
    with (
        serving(UnixServer(target, _Echo)) as echo,
        sshMaster(agent, clientKeys.key, sockdir) as master,
    ):
        master.forward("-L", f"{local}:{target}")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(local))
            got = echoThrough(s, data)
        assert sameBytes(got, data)
        assert echo.sawEOF.get(timeout=TIMEOUT) == len(data)


def test_local_unix_forward_to_a_missing_socket_names_it(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    missing, local = sockdir / "missing.sock", sockdir / "local.sock"
    with sshMaster(agent, clientKeys.key, sockdir) as master:
        master.forward("-L", f"{local}:{missing}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(local))
            # The client logs the failure (unbuffered), then closes this socket.
            assert s.recv(1) == b""
        assert (
            f'open failed: connect failed: dial unix socket "{missing}": '
            f"dial unix {missing}: connect: no such file or directory"
        ) in master.logText()


# -- streamlocal-forward@openssh.com ---------------------------------------------------------


def test_reverse_unix_forward_byte_exact_and_removed_on_disconnect(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    data = os.urandom(DATA_SIZE)
    target, remote = sockdir / "target.sock", sockdir / "sub" / "remote.sock"
    with serving(UnixServer(target, _Echo)):
        with sshMaster(agent, clientKeys.key, sockdir) as master:
            master.forward("-R", f"{remote}:{target}")
            mode = os.stat(remote).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert stat.S_IMODE(os.stat(remote.parent).st_mode) == 0o700
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(remote))
                got = echoThrough(s, data)
            assert sameBytes(got, data)
        agent.waitForLog(rf"stopped forwarding {re.escape(str(remote))}")
        assert not remote.exists()


def test_reverse_unix_forward_replaces_a_stale_socket(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    target, remote = sockdir / "target.sock", sockdir / "remote.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(remote))
    stale.close()  # a dead socket file is left behind
    with (
        serving(UnixServer(target, _Echo)),
        sshMaster(
            agent,
            clientKeys.key,
            sockdir,
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"{remote}:{target}",
        ),
    ):
        # -f with ExitOnForwardFailure returns 0 only once the forward succeeded.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(remote))
            assert echoThrough(s, b"alive") == b"alive"


def test_reverse_unix_same_path_twice_on_one_connection_succeeds(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path
) -> None:
    """As OpenSSH (coder#11631): a repeat is not an error.  (ssh itself dedups, so raw.)"""
    remote = sockdir / "twice.sock"
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        request = ns(os.fsencode(remote))
        assert rawGlobalRequest(transport, "streamlocal-forward@openssh.com", request)
        assert rawGlobalRequest(transport, "streamlocal-forward@openssh.com", request)
        assert stat.S_ISSOCK(os.stat(remote).st_mode)
        assert rawGlobalRequest(transport, "cancel-streamlocal-forward@openssh.com", request)
        agent.waitForLog(rf"stopped forwarding {re.escape(str(remote))}")
        assert not remote.exists()
        assert execWorks(transport)
    finally:
        transport.close()


@pytest.mark.parametrize(
    "kind", ["regular file", "symlink", "directory", "live socket", "the agent's boundary socket"]
)
def test_reverse_unix_forward_never_destroys_what_is_at_the_path(
    agent: Agent, clientKeys: ClientKeys, sockdir: Path, kind: str
) -> None:
    """Only a stale socket is replaced (issue 11: ``-R`` took over the audit socket)."""
    with contextlib.ExitStack() as stack:
        if kind == "the agent's boundary socket":
            agent.waitForLog(r"boundary log proxy listening on")
            path = agent.home.parent / "data" / "boundary-audit.sock"
        else:
            path = sockdir / "notes.txt"
        if kind == "regular file":
            path.write_text("my notes")
        elif kind == "symlink":
            (sockdir / "elsewhere.txt").write_text("my notes")
            path.symlink_to(sockdir / "elsewhere.txt")
        elif kind == "directory":
            path.mkdir()
        elif kind == "live socket":
            server = stack.enter_context(socket.socket(socket.AF_UNIX))
            server.bind(str(path))
            server.listen()
        before = os.lstat(path)
        done = runSsh(
            agent,
            clientKeys.key,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"{path}:127.0.0.1:9",
        )
        assert done.returncode == 255
        assert f"remote port forwarding failed for listen path {path}" in done.stderr.decode()
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        if kind in ("regular file", "symlink"):
            assert path.read_text() == "my notes"
        if kind in ("live socket", "the agent's boundary socket"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
    why = (
        "the agent serves its boundary log proxy there"
        if kind == "the agent's boundary socket"
        else "is there (only a stale socket is replaced)"
    )
    agent.waitForLog(
        rf"\[warn\].*streamlocal-forward on {re.escape(str(path))} from \S+ refused: .*"
        + re.escape(why)
    )


def test_direct_streamlocal_to_a_path_too_long_fails_at_once(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    """Answered at once (it waited for the 30 s connect timeout, holding a descriptor)."""
    path = b"/tmp/" + b"p" * 200 + b".sock"
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        started = time.monotonic()
        payload = ns(path) + ns(b"") + u32(0)
        assert rawChannelOpen(transport, "direct-streamlocal@openssh.com", payload) == 2
        assert time.monotonic() - started < 10
        assert execWorks(transport)
    finally:
        transport.close()
    shown = re.escape(path.decode())
    agent.waitForLog(rf"direct-streamlocal from \S+ failed: .*{shown}: connect: invalid argument")


# -- malformed payloads ---------------------------------------------------------------------

TRUNCATED = [b"", b"\x00\x00", u32(0x7FFFFFF0) + b"huge", ns(b"127.0.0.1")]


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        *(("direct-tcpip", p) for p in TRUNCATED),
        ("direct-tcpip", ns(b"127.0.0.1") + u32(99999) + ns(b"o") + u32(1)),  # port out of range
        ("direct-tcpip", ns(b"\xff\xfe") + u32(22) + ns(b"o") + u32(1)),  # host not UTF-8
        ("direct-tcpip", ns(b"127.0.0.1") + u32(22) + ns(b"o") + u32(1) + b"junk"),
        *(("direct-streamlocal@openssh.com", p) for p in TRUNCATED),
        ("direct-streamlocal@openssh.com", ns(b"/tmp/a\0b") + ns(b"") + u32(0)),
        ("direct-streamlocal@openssh.com", u32(5) + b"\x00"),
    ],
)
def test_malformed_channel_opens_are_refused_and_the_connection_lives(
    agent: Agent, clientKeys: ClientKeys, kind: str, payload: bytes
) -> None:
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        assert rawChannelOpen(transport, kind, payload) == 2  # OPEN_CONNECT_FAILED
        assert execWorks(transport)
    finally:
        transport.close()
    agent.waitForLog(rf"\[warn\].*malformed {re.escape(kind)} request")
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        *(("tcpip-forward", p) for p in TRUNCATED),
        ("tcpip-forward", ns(b"127.0.0.1") + u32(70000)),
        ("tcpip-forward", ns(b"127.0.0.1") + u32(0) + b"junk"),
        ("tcpip-forward", ns(b"127.0.0.1\0x") + u32(0)),  # dropped the connection
        ("cancel-tcpip-forward", ns(b"127.0.0.1\0x") + u32(0)),
        *(("cancel-tcpip-forward", p) for p in TRUNCATED),
        *(("streamlocal-forward@openssh.com", p) for p in TRUNCATED[:3]),
        ("streamlocal-forward@openssh.com", ns(b"/tmp/a\0b")),
        ("streamlocal-forward@openssh.com", ns(b"")),
        *(("cancel-streamlocal-forward@openssh.com", p) for p in TRUNCATED[:3]),
    ],
)
def test_malformed_global_requests_fail_and_the_connection_lives(
    agent: Agent, clientKeys: ClientKeys, kind: str, payload: bytes
) -> None:
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        assert rawGlobalRequest(transport, kind, payload) is False
        assert execWorks(transport)
    finally:
        transport.close()
    agent.waitForLog(rf"\[warn\].*malformed {re.escape(kind)} request")
    assert "Traceback" not in agent.log()


def test_cancel_replies_true_and_global_requests_are_per_connection(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    first, second = (paramikoTransport(agent, clientKeys.key) for _ in range(2))
    try:
        port = first.request_port_forward("127.0.0.1", 0)
        assert port != 0
        # Another connection cannot cancel it (upstream's map was global).
        assert rawGlobalRequest(second, "cancel-tcpip-forward", ns(b"127.0.0.1") + u32(port))
        assert not refused(port)
        assert rawGlobalRequest(first, "cancel-tcpip-forward", ns(b"127.0.0.1") + u32(port))
        agent.waitForLog(rf"stopped forwarding 127\.0\.0\.1:{port}\b")
        assert refused(port)
        # Unknown: still true, as upstream.
        assert rawGlobalRequest(first, "cancel-tcpip-forward", ns(b"127.0.0.1") + u32(port))
        assert rawGlobalRequest(
            first, "cancel-streamlocal-forward@openssh.com", ns(b"/tmp/never-forwarded.sock")
        )
    finally:
        first.close()
        second.close()


# -- flow control: bounded memory ---------------------------------------------------------

PUSH = 256 * MiB  # far more than can move in SLOW_FOR: the pusher must be held back
RATE = 1_000_000  # bytes per second the slow side takes (1 MB/s)
SLOW_FOR = 6.0  # seconds
#: The agent may hold one window in flight plus its own overhead.
RSS_ALLOWANCE = CHANNEL_WINDOW + 6 * MiB


def throttledRead(read: Callable[[int], bytes], stop: threading.Event) -> int:
    """Read at RATE for SLOW_FOR seconds; return how much was read."""
    start = time.monotonic()
    total = 0
    while not stop.is_set():
        elapsed = time.monotonic() - start
        if elapsed >= SLOW_FOR:
            break
        ahead = total / RATE - elapsed
        if ahead > 0:
            time.sleep(ahead)  # throttling the reader, not synchronising
            continue
        chunk = read(64 * 1024)
        if not chunk:
            break
        total += len(chunk)
    return total


@pytest.fixture
def freshAgent(clientKeys: ClientKeys, tmp_path: Path) -> Iterator[Agent]:
    """An agent of its own, so its peak RSS belongs to one test."""
    with runningAgent(clientKeys, tmp_path) as running:
        yield running


@pytest.mark.slow
def test_slow_destination_bounds_agent_memory(freshAgent: Agent, clientKeys: ClientKeys) -> None:
    """Client pushes 256 MiB through -W into a destination reading 1 MB/s."""
    agent = freshAgent
    accepted: queue.Queue[socket.socket] = queue.Queue()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: accepted.put(listener.accept()[0]), daemon=True).start()
    before = vmKiB(agent.process.pid, "VmRSS")
    client = subprocess.Popen(
        [
            "ssh",
            *clientOptions(agent, clientKeys.key),
            "-W",
            f"127.0.0.1:{listener.getsockname()[1]}",
            f"coder@{agent.host}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    pushed = [0]

    def feed() -> None:
        assert client.stdin is not None
        block = os.urandom(MiB)
        try:
            while pushed[0] < PUSH and not stop.is_set():
                client.stdin.write(block)
                pushed[0] += len(block)
        except (BrokenPipeError, ValueError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        conn = accepted.get(timeout=TIMEOUT)
        conn.settimeout(TIMEOUT)
        read = throttledRead(conn.recv, stop)
        peak = vmKiB(agent.process.pid, "VmHWM")
    finally:
        stop.set()
        client.kill()
        client.wait(TIMEOUT)
        listener.close()
    assert read >= RATE * SLOW_FOR * 0.5, "the destination was not fed"
    assert pushed[0] < PUSH, "the client was never held back"
    growth = (peak - before) * 1024
    print(f"agent grew {growth / MiB:.1f} MiB; read {read / MiB:.1f} MiB")
    assert growth <= RSS_ALLOWANCE, f"agent grew {growth / MiB:.1f} MiB"


@pytest.mark.slow
def test_slow_client_bounds_agent_memory(freshAgent: Agent, clientKeys: ClientKeys) -> None:
    """A destination pushes 256 MiB through -W to a client whose output is read at 1 MB/s."""
    agent = freshAgent
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    sent = [0]

    def source() -> None:
        conn, _ = listener.accept()
        block = os.urandom(MiB)
        try:
            while sent[0] < PUSH and not stop.is_set():
                conn.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=source, daemon=True).start()
    before = vmKiB(agent.process.pid, "VmRSS")
    client = subprocess.Popen(
        [
            "ssh",
            *clientOptions(agent, clientKeys.key),
            "-W",
            f"127.0.0.1:{listener.getsockname()[1]}",
            f"coder@{agent.host}",
        ],
        stdin=subprocess.PIPE,  # kept open: no EOF from the client side
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert client.stdout is not None
        fd = client.stdout.fileno()
        read = throttledRead(lambda n: os.read(fd, n), stop)
        peak = vmKiB(agent.process.pid, "VmHWM")
    finally:
        stop.set()
        client.kill()
        client.wait(TIMEOUT)
        listener.close()
    assert read >= RATE * SLOW_FOR * 0.5, "the client was not fed"
    assert sent[0] < PUSH, "the source was never held back"
    growth = (peak - before) * 1024
    print(f"agent grew {growth / MiB:.1f} MiB; read {read / MiB:.1f} MiB")
    assert growth <= RSS_ALLOWANCE, f"agent grew {growth / MiB:.1f} MiB"
