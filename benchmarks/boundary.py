"""Boundary audit logs through the agent into coderd-dev: logs/s, and the latency of one log.

Usage (from the repository root):

    python benchmarks/boundary.py [--writers N] [--logs M] [--per-frame K] [--json-out FILE]
    tox -e bench-boundary -- [same options]

``twistd coderd-dev`` and ``twistd coder-agent`` run as their own processes,
as in a workspace; N writer threads in this process play boundary: each
connects to the agent's socket and writes its share of M logs in frames of K
(boundary batches 10 by default).  Throughput is timed from the first write
to the moment coderd-dev has written the last ``boundary_request`` line to its
stderr, with the spool on (it always is) and every log checked to arrive
exactly once.  Latency is one frame of one log at a time, write to line.
Target: at least 50 000 logs/s with nothing lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from coderagent.boundary.codec import TAG_V1, encodeFrame  # noqa: E402
from coderagent.pb import agent_pb2  # noqa: E402

TARGET_LOGS_PER_S = 50_000
TOKEN = "bench-token"  # noqa: S105 - a throwaway token for a local coderd-dev
LINE = re.compile(r"boundary_request  .*session_id=(\S+)  sequence_number=(\d+)  ")


def log(message: str) -> None:
    print(f"[bench-boundary] {message}", file=sys.stderr, flush=True)


def twistd() -> list[str]:
    candidate = Path(sys.executable).parent / "twistd"
    return (
        [str(candidate)] if candidate.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]
    )


class Process:
    """A twistd process whose stderr is read by a thread, in large chunks.

    Reading coderd-dev's stderr must cost next to nothing: parsing its
    200 000 lines as they come (a regex and a lock per line) took a whole
    core, more than the agent and coderd-dev together, and made the
    benchmark measure itself.  So the reader only counts ``boundary_request``
    markers in each chunk (``bytes.count``); the lines are checked (every log
    exactly once) after the timed part, from the bytes kept.
    """

    MARKER = b"boundary_request  "

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*twistd(), "-n", "--pidfile=", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.cond = threading.Condition()
        self.chunks: list[bytes] = []
        self.count = 0
        self.lastAt = 0.0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        tail = b""
        while chunk := os.read(fd, 1 << 20):
            found = (tail + chunk).count(self.MARKER)
            tail = chunk[-(len(self.MARKER) - 1) :]
            with self.cond:
                self.chunks.append(chunk)
                if found:
                    self.count += found
                    self.lastAt = time.perf_counter()
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return b"".join(self.chunks).decode("utf-8", "replace")

    def waitFor(self, predicate: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def match(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = regex.search(b"".join(self.chunks).decode("utf-8", "replace"))
            if m:
                found.append(m)
                return True
            return self.proc.poll() is not None

        self.waitFor(check, timeout)
        if not found:
            raise SystemExit(f"never saw {pattern!r}:\n{self.text()[-4000:]}")
        return found[0]

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def arrivals(text: str) -> tuple[dict[str, list[int]], int]:
    """Each session's sequence numbers as coderd logged them, and how many were repeats."""
    seen: dict[str, list[int]] = {}
    for m in LINE.finditer(text):
        seen.setdefault(m.group(1), []).append(int(m.group(2)))
    repeats = sum(len(v) - len(set(v)) for v in seen.values())
    return seen, repeats


def frames(session: str, logs: int, perFrame: int) -> list[bytes]:
    out = []
    for first in range(0, logs, perFrame):
        request = agent_pb2.ReportBoundaryLogsRequest(
            session_id=session, confined_process_name="bench"
        )
        for seq in range(first, min(first + perFrame, logs)):
            entry = request.logs.add(allowed=seq % 3 != 0, sequence_number=seq)
            entry.http_request.method = "GET"
            entry.http_request.url = f"https://api.example.com/v1/items/{seq}"
            if entry.allowed:
                entry.http_request.matched_rule = "*.example.com"
            entry.time.GetCurrentTime()
        out.append(encodeFrame(TAG_V1, request.SerializeToString()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/boundary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=8, help="concurrent boundary writers")
    p.add_argument("--logs", type=int, default=200_000, help="logs in all")
    p.add_argument("--per-frame", type=int, default=10, help="logs per frame (boundary: 10)")
    p.add_argument("--latency-samples", type=int, default=50)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="coderagent-bench-boundary-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["HOME"] = str(work)
    (work / "authorized_keys").write_text("")
    coderd = Process(["coderd-dev", "--listen=tcp:0:interface=127.0.0.1", f"--token={TOKEN}"], env)
    agent: Process | None = None
    result: dict[str, Any] = {}
    try:
        port = coderd.match(r"coderd-dev listening on 127\.0\.0\.1:(\d+)").group(1)
        sock = str(work / "boundary.sock")
        agent = Process(
            [
                "coder-agent",
                "--ssh-endpoint=tcp:0:interface=127.0.0.1",
                f"--ssh-authorized-keys={work / 'authorized_keys'}",
                f"--script-data-dir={work}",
                f"--agent-url=http://127.0.0.1:{port}",
                f"--agent-token={TOKEN}",
                f"--boundary-log-proxy-socket-path={sock}",
                "--prometheus-address=",
            ],
            env,
        )
        agent.match("connected to coderd")
        agent.match("boundary log proxy listening on")
        log(f"coderd-dev pid {coderd.proc.pid}, agent pid {agent.proc.pid}")

        # 1. latency of one log
        latencies = []
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            for i in range(a.latency_samples):
                frame = frames(f"latency-{i}", 1, 1)[0]
                before = coderd.count
                t0 = time.perf_counter()
                s.sendall(frame)
                coderd.waitFor(lambda before=before: coderd.count > before, 30)
                latencies.append((coderd.lastAt - t0) * 1000)

        # 2. throughput
        share = a.logs // a.writers
        prepared = [frames(f"w{w}", share, a.per_frame) for w in range(a.writers)]
        total = share * a.writers
        barrier = threading.Barrier(a.writers + 1)

        def writer(data: list[bytes]) -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
                barrier.wait()
                for frame in data:
                    s.sendall(frame)

        threads = [threading.Thread(target=writer, args=(d,), daemon=True) for d in prepared]
        for t in threads:
            t.start()
        start = coderd.count
        cpuAgent, cpuCoderd = agent.cpu(), coderd.cpu()
        harness = resource.getrusage(resource.RUSAGE_SELF)
        cpuHarness = harness.ru_utime + harness.ru_stime
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        writtenAt = time.perf_counter()
        arrivedAll = coderd.waitFor(lambda: coderd.count - start >= total, 600)
        elapsed = coderd.lastAt - t0
        cpuAgent, cpuCoderd = agent.cpu() - cpuAgent, coderd.cpu() - cpuCoderd
        harness = resource.getrusage(resource.RUSAGE_SELF)
        cpuHarness = harness.ru_utime + harness.ru_stime - cpuHarness
        seen, duplicates = arrivals(coderd.text())
        lost = sum(share - len(set(seen.get(f"w{w}", ()))) for w in range(a.writers))
        result = {
            "writers": a.writers,
            "logs": total,
            "logs_per_frame": a.per_frame,
            "seconds": round(elapsed, 3),
            "write_seconds": round(writtenAt - t0, 3),
            "logs_per_s": round(total / elapsed, 1),
            "lost": lost,
            "duplicates": duplicates,
            "all_arrived": arrivedAll,
            "agent_cores": round(cpuAgent / elapsed, 2),
            "coderd_cores": round(cpuCoderd / elapsed, 2),
            "harness_cores": round(cpuHarness / elapsed, 2),
            "latency_median_ms": round(statistics.median(latencies), 2),
            "latency_p90_ms": round(sorted(latencies)[int(0.9 * len(latencies))], 2),
            "latency_max_ms": round(max(latencies), 2),
        }
    finally:
        if agent is not None:
            agent.stop()
        coderd.stop()
    ok = result.get("logs_per_s", 0) >= TARGET_LOGS_PER_S and result.get("lost") == 0
    rows = [
        (
            "logs/s, writers to coderd-dev's stderr",
            result["logs_per_s"],
            f">= {TARGET_LOGS_PER_S}",
            "PASS" if ok else "FAIL",
        ),
        ("logs lost / duplicated", f"{result['lost']} / {result['duplicates']}", "0 lost", ""),
        (
            "  logs, writers, logs per frame",
            f"{result['logs']}, {result['writers']}, {result['logs_per_frame']}",
            "",
            "",
        ),
        ("  seconds (writing took)", f"{result['seconds']} ({result['write_seconds']})", "", ""),
        (
            "  cores: agent / coderd-dev / this harness (writers, reader)",
            f"{result['agent_cores']} / {result['coderd_cores']} / {result['harness_cores']}",
            "",
            "",
        ),
        (
            "one log, write to coderd's line: median / p90 / max ms",
            " / ".join(
                str(result[k]) for k in ("latency_median_ms", "latency_p90_ms", "latency_max_ms")
            ),
            "",
            "",
        ),
    ]
    print("| metric | agent | target | |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2))
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
