"""The workloads: a sink, a pusher, and the tests built on them.

Transfer protocol (one transfer per connection, so no half-close is needed
and a forwarder that does not pass EOF on still completes)::

    pusher -> sink : 8-byte big-endian length N, then N bytes
    sink -> pusher : b"K" + 8-byte big-endian count of bytes received

A transfer is timed from ``connect()`` to the acknowledgement, so it covers
delivery end to end.  A connection that closes before its header is ignored
(readiness probes send a 0-byte transfer instead).

The sink is a separate process (``python -m benchmarks.workloads sink``):
threaded, listening on 127.0.0.1 and on a unix socket.  The pusher runs in the
benchmark's own process.  Every test drives the OpenSSH client ``ssh``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.servers import Proc, freePort

MIB = 1 << 20
#: Channel data per full SSH packet: both servers and the client use 32 KiB.
PACKET_DATA = 32 * 1024
HEADER = struct.Struct(">Q")
ACK = b"K"
ACK_LEN = 1 + HEADER.size
REPO = Path(__file__).resolve().parent.parent


class Measurement(Protocol):
    result: dict[str, float | None]

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


#: Builds a measurement of the server for a test, given the ssh client's PID.
MeasureFactory = Callable[[int | None], Measurement]


# --------------------------------------------------------------------- sink --


def _recvExact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class _SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(300)
        try:
            header = _recvExact(sock, HEADER.size)
            if header is None:
                return
            (want,) = HEADER.unpack(header)
            view = memoryview(bytearray(MIB))
            got = 0
            while got < want:
                n = sock.recv_into(view, min(MIB, want - got))
                if n == 0:
                    break
                got += n
            sock.sendall(ACK + HEADER.pack(got))
            sock.settimeout(30)  # let the pusher close first
            while sock.recv(65536):
                pass
        except OSError:
            pass


class _TCPSink(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class _UnixSink(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024


def sinkMain(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="workloads sink")
    parser.add_argument("--unix", required=True)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    servers: list[socketserver.BaseServer] = [_TCPSink(("127.0.0.1", 0), _SinkHandler)]
    if os.path.exists(args.unix):
        os.unlink(args.unix)
    servers.append(_UnixSink(args.unix, _SinkHandler))
    os.chmod(args.unix, 0o777)  # noqa: S103 - the agent may run as another user
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.5,), daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    port = servers[0].server_address[1]  # type: ignore[attr-defined]
    print(f"READY tcp={port}", flush=True)
    done.wait(args.lifetime)  # bounded even if nobody stops it
    for server in servers:
        server.shutdown()
        server.server_close()
    if os.path.exists(args.unix):
        os.unlink(args.unix)


@dataclass
class Sink:
    proc: Proc
    port: int
    unixPath: str


def startSink(workdir: Path, timeout: float = 20.0) -> Sink:
    unixPath = str(workdir / "sink.sock")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
    }
    proc = Proc(
        [sys.executable, "-m", "benchmarks.workloads", "sink", "--unix", unixPath],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.popen.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        line = proc.popen.stdout.readline()
        if line.startswith(b"READY"):
            break
    m = re.search(rb"tcp=(\d+)", line)
    if not m:
        proc.stop()
        raise RuntimeError("the sink did not start")
    return Sink(proc, int(m.group(1)), unixPath)


# ------------------------------------------------------------------- pusher --

_payload: memoryview | None = None


def payload() -> memoryview:
    global _payload
    if _payload is None:
        _payload = memoryview(os.urandom(MIB))
    return _payload


def push(port: int, nbytes: int, timeout: float) -> float:
    """One transfer of ``nbytes`` through 127.0.0.1:``port``; seconds to the ack."""
    buf = payload()
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=min(timeout, 30)) as s:
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HEADER.pack(nbytes))
        left = nbytes
        while left > 0:
            n = min(left, len(buf))
            s.sendall(buf[:n])
            left -= n
            if time.monotonic() > deadline:
                raise TimeoutError(f"push of {nbytes} bytes passed its {timeout}s deadline")
        ack = _recvExact(s, ACK_LEN)
        if ack is None:
            raise ConnectionError("closed before the acknowledgement")
        (got,) = HEADER.unpack(ack[1:])
        if ack[:1] != ACK or got != nbytes:
            raise ConnectionError(f"the sink got {got} of {nbytes} bytes")
        return time.perf_counter() - t0


def waitReady(port: int, proc: Proc, timeout: float = 20.0) -> str | None:
    """0-byte transfers until the forward works end to end; None or an error."""
    deadline = time.monotonic() + timeout
    last, broken = "timed out", 0
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"ssh exited with status {proc.popen.returncode}"
        try:
            push(port, 0, timeout=10)
            return None
        except ConnectionRefusedError as e:  # nobody listening yet
            last = repr(e)
        except OSError as e:  # listening, but the channel was refused or closed
            last = repr(e)
            broken += 1
            if broken >= 5:
                return f"forwarded connection failed 5 times: {last}"
        time.sleep(0.1)
    return last


# ---------------------------------------------------------------------- ssh --


@dataclass
class Client:
    """The OpenSSH client, pointed at one server, with the forced algorithms."""

    port: int
    user: str
    key: Path
    crypto: list[str] = field(default_factory=list)

    def options(
        self, logLevel: str = "ERROR", master: str = "no", controlPath: str = "none"
    ) -> list[str]:
        # ssh takes the first value given for an option: nothing may follow
        # these to override them.
        settings = {
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
            "BatchMode": "yes",
            "StrictHostKeyChecking": "no",
            "UserKnownHostsFile": "/dev/null",
            "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlgorithms": "ssh-ed25519",
            "ConnectTimeout": "15",
            "Compression": "no",
            "RequestTTY": "no",
            "ControlMaster": master,
            "ControlPath": controlPath,
            "LogLevel": logLevel,
        }
        options = [x for k, v in settings.items() for x in ("-o", f"{k}={v}")]
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.key),
            *options,
            *self.crypto,
        ]

    @property
    def dest(self) -> str:
        return f"{self.user}@127.0.0.1"

    def run(
        self, command: list[str], timeout: float, logLevel: str = "ERROR"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.options(logLevel), self.dest, *command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @contextmanager
    def forwarding(self, spec: list[str], log: Path, logLevel: str = "ERROR") -> Iterator[Proc]:
        """``ssh -N`` with the forwards in ``spec``, stopped on exit."""
        with open(log, "ab") as err:
            proc = Proc(
                [
                    *self.options(logLevel),
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    *spec,
                    self.dest,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            yield proc
        finally:
            proc.stop()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _logTail(path: Path, n: int = 300) -> str:
    try:
        return " ".join(path.read_text(errors="replace").split())[-n:]
    except OSError:
        return ""


# -------------------------------------------------------------------- tests --


def probe(client: Client, sink: Sink, workdir: Path, timeout: float) -> dict[str, Any]:
    """Negotiated algorithms, and the windows the server advertises per channel type."""
    out: dict[str, Any] = {}
    r = client.run(["true"], timeout=timeout, logLevel="DEBUG2")
    out["exec_rc"] = r.returncode
    for key, rx in [
        ("kex", r"kex: algorithm: (\S+)"),
        ("hostkey", r"kex: host key algorithm: (\S+)"),
        ("cipher_mac", r"kex: server->client cipher: (\S+ MAC: \S+)"),
        ("software", r"remote software version (\S+)"),
    ]:
        m = re.search(rx, r.stderr)
        out[key] = m.group(1) if m else None
    m = re.search(r"channel 0: open confirm rwindow (\d+) rmax (\d+)", r.stderr)
    out["session_window"] = f"{m.group(1)}/{m.group(2)}" if m else None
    lport, rport = freePort(), freePort()
    log = workdir / f"probe-{client.port}.log"
    spec = [
        "-L",
        f"127.0.0.1:{lport}:127.0.0.1:{sink.port}",
        "-R",
        f"127.0.0.1:{rport}:127.0.0.1:{sink.port}",
    ]
    with client.forwarding(spec, log, logLevel="DEBUG2") as proc:
        out["local_ready_error"] = waitReady(lport, proc, timeout=15)
        out["remote_ready_error"] = waitReady(rport, proc, timeout=15)
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    wins = re.findall(r"channel \d+: open confirm rwindow (\d+) rmax (\d+)", text)
    out["direct_tcpip_window"] = f"{wins[-1][0]}/{wins[-1][1]}" if wins else None
    m = re.search(r"ctype forwarded-tcpip rchan \d+ win (\d+) max (\d+)", text)
    out["forwarded_tcpip_window"] = f"{m.group(1)}/{m.group(2)}" if m else None
    return out


def throughput(
    client: Client,
    spec: list[str],
    entryPort: int,
    nbytes: int,
    measure: MeasureFactory,
    workdir: Path,
    timeout: float,
    maxSeconds: float,
) -> dict[str, Any]:
    """Push ``nbytes`` through one ``ssh -N`` forward: MB/s (1 MB = 1e6 bytes).

    A 16 MiB warm-up push also estimates the rate; the timed push is cut down
    so it takes about ``maxSeconds`` at most (a slow server still finishes).
    """
    log = workdir / f"ssh-{entryPort}.log"
    with client.forwarding(spec, log) as proc:
        error = waitReady(entryPort, proc)
        if error:
            return {"error": f"forward not ready: {error} {_logTail(log)}".strip()}
        warm = min(16 * MIB, nbytes)
        rate = warm / push(entryPort, warm, timeout)
        size = int(min(nbytes, max(warm, rate * maxSeconds)) // MIB) * MIB
        with measure(proc.pid) as m:
            seconds = push(entryPort, size, timeout)
        return {
            "MBps": round(size / seconds / 1e6, 1),
            "MiB": size // MIB,
            "seconds": round(seconds, 3),
            "server_cpu_s_per_GB": round((m.result["server_cpu_s"] or 0) / (size / 1e9), 2),
            # Bulk data travels in full packets (32 KiB of data each, both servers).
            "server_cpu_us_per_packet": round(
                (m.result["server_cpu_s"] or 0) * 1e6 / (size / PACKET_DATA), 1
            ),
            **m.result,
        }


def concurrency(
    client: Client,
    sink: Sink,
    conns: int,
    nbytes: int,
    measure: MeasureFactory,
    workdir: Path,
    timeout: float,
) -> dict[str, Any]:
    """``conns`` connections at once through one ``ssh -N -L``, ``nbytes`` each."""
    lport = freePort()
    log = workdir / f"ssh-{lport}.log"
    with client.forwarding(["-L", f"127.0.0.1:{lport}:127.0.0.1:{sink.port}"], log) as proc:
        error = waitReady(lport, proc)
        if error:
            return {"error": f"forward not ready: {error} {_logTail(log)}".strip()}
        barrier = threading.Barrier(conns + 1, timeout=60)
        results: list[float | str] = ["not run"] * conns

        def worker(i: int) -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                results[i] = "barrier broken"
                return
            try:
                results[i] = push(lport, nbytes, timeout)
            except Exception as e:  # counted as a failure
                results[i] = f"{type(e).__name__}: {str(e)[:80]}"

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
        for t in threads:
            t.start()
        with measure(proc.pid) as m:
            t0 = time.perf_counter()
            barrier.wait()
            deadline = time.monotonic() + timeout + 30
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            seconds = time.perf_counter() - t0
        ok = [r for r in results if isinstance(r, float)]
        errors = [r for r in results if not isinstance(r, float)]
        out: dict[str, Any] = {
            "seconds": round(seconds, 3),
            "ok": len(ok),
            "failures": len(errors),
            "MBps": round(len(ok) * nbytes / seconds / 1e6, 1),
            "conn_p50_s": round(percentile(ok, 0.5) or 0, 3),
            "conn_max_s": round(max(ok), 3) if ok else None,
            "ssh_alive": proc.alive(),
            **m.result,
        }
        if errors:
            out["errors"] = sorted(set(errors))[:5]
        return out


def execLatency(
    client: Client,
    n: int,
    measure: MeasureFactory,
    workdir: Path,
    timeout: float,
) -> dict[str, Any]:
    """``ssh -S ctl host true`` on an open ControlMaster connection, ``n`` times.

    Each exec is preceded by ``ssh -S ctl -O check`` (a round trip to the
    local master only), whose median is the client-side floor.
    """
    ctl = str(workdir / f"ctl-{client.port}")
    master = Proc(
        [
            *client.options(master="yes", controlPath=ctl),
            "-o",
            "ControlPersist=no",
            "-N",
            client.dest,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mux = client.options(controlPath=ctl)

    def check() -> bool:
        r = subprocess.run([*mux, "-O", "check", client.dest], capture_output=True, timeout=10)
        return r.returncode == 0

    try:
        deadline = time.monotonic() + 20
        ready = False
        while time.monotonic() < deadline and master.alive():
            if os.path.exists(ctl) and check():
                ready = True
                break
            time.sleep(0.05)
        if not ready:
            return {"error": "ControlMaster did not come up"}
        for _ in range(2):  # warm-up, not timed
            subprocess.run(
                [*mux, client.dest, "true"],
                capture_output=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        times: list[float] = []
        floors: list[float] = []
        errors: list[str] = []
        stopAt = time.monotonic() + timeout
        with measure(master.pid) as m:
            for _ in range(n):
                if time.monotonic() > stopAt:
                    errors.append("deadline")
                    break
                t0 = time.perf_counter()
                check()
                floors.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                try:
                    r = subprocess.run(
                        [*mux, client.dest, "true"],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        stdin=subprocess.DEVNULL,
                    )
                    failed = (
                        f"rc={r.returncode} {r.stderr.strip()[-150:]}" if r.returncode else None
                    )
                except subprocess.TimeoutExpired:
                    failed = "timeout"
                dt = time.perf_counter() - t0
                if failed:
                    errors.append(failed)
                else:
                    times.append(dt)
                if not master.alive():
                    errors.append("master died")
                    break
            time.sleep(0.2)  # let the server reap the last shell (cutime)
        count = len(times) + len(errors)
        out: dict[str, Any] = {
            "median_ms": _ms(percentile(times, 0.5)),
            "p95_ms": _ms(percentile(times, 0.95)),
            "min_ms": _ms(min(times)) if times else None,
            "floor_median_ms": _ms(percentile(floors, 0.5)),
            "n": len(times),
            "failures": len(errors),
            "server_cpu_ms_per_exec": (
                round((m.result["server_cpu_s"] or 0) * 1000 / count, 1) if count else None
            ),
            **m.result,
        }
        if errors:
            out["errors"] = sorted(set(errors))[:5]
        return out
    finally:
        try:
            subprocess.run([*mux, "-O", "exit", client.dest], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            pass
        master.stop()


def rawLoopback(sink: Sink, nbytes: int, timeout: float) -> float:
    """MB/s of the pusher straight into the sink (no SSH): the harness's own ceiling."""
    push(sink.port, min(16 * MIB, nbytes), timeout)
    rates = [nbytes / push(sink.port, nbytes, timeout) / 1e6 for _ in range(3)]
    return round(statistics.median(rates), 1)


if __name__ == "__main__":
    if sys.argv[1:2] != ["sink"]:
        raise SystemExit("usage: python -m benchmarks.workloads sink --unix PATH")
    sinkMain(sys.argv[2:])
