"""The agent's coderd transport: unary call round trip and calls per second over one connection.

Usage (from the repository root):

    python benchmarks/rpc.py [--calls N] [--concurrency K] [--seconds S] [--json-out FILE]
    tox -e bench-rpc -- [same options]

``twistd coderd-dev`` runs as its own process (as coderd would), and the
agent's :class:`~coderagent.coderd.client.CoderdClient` runs in this process
on the real reactor, over loopback: WebSocket, yamux, one DRPC stream per
call, exactly the agent's path.  Reported:

* round trip of one ``UpdateStats`` call at a time (median, p90, p99, max), the
  target being a median of at most 1 ms;
* calls per second with ``--concurrency`` calls in flight on the one connection;
* one 3 MiB ``BatchCreateLogs`` (a message near the 4 MiB cap);
* CPU seconds per 1000 calls, client and coderd-dev.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_MEDIAN_MS = 1.0
TOKEN = "bench-token"  # noqa: S105 - a throwaway token for a local coderd-dev


def log(message: str) -> None:
    print(f"[bench-rpc] {message}", file=sys.stderr, flush=True)


def startCoderd() -> tuple[subprocess.Popen[str], int]:
    twistd = Path(sys.executable).parent / "twistd"
    command = [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [
            *command,
            "-n",
            "--pidfile=",
            "coderd-dev",
            "--listen=tcp:0:interface=127.0.0.1",
            f"--token={TOKEN}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        m = re.search(r"coderd-dev listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            # Keep reading its log so that it never blocks on a full pipe.
            threading.Thread(target=_discard, args=(proc.stderr,), daemon=True).start()
            return proc, int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("coderd-dev did not start")


def _discard(stream: Any) -> None:
    for _ in stream:
        pass


def cpuSeconds(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace, port: int, coderdPid: int) -> dict[str, Any]:
    from twisted.internet import defer, reactor

    from coderagent.coderd.client import CoderdClient
    from coderagent.pb import agent_pb2

    client = CoderdClient(url=f"http://127.0.0.1:{port}", token=TOKEN, reactor=reactor)
    client.startService()
    try:
        await client.call("GetManifest", agent_pb2.GetManifestRequest(), timeout=30)
        request = agent_pb2.UpdateStatsRequest(
            stats=agent_pb2.Stats(connection_count=1, rx_bytes=12345, tx_bytes=67890)
        )
        for _ in range(200):  # warm-up
            await client.call("UpdateStats", request)

        # 1. one call at a time
        cpu0, srv0 = cpuSeconds(), cpuSeconds(coderdPid)
        rtts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            await client.call("UpdateStats", request)
            rtts.append((time.perf_counter() - t0) * 1000)
        cpu1, srv1 = cpuSeconds(), cpuSeconds(coderdPid)

        # 2. K in flight for S seconds
        done = 0
        stopAt = time.perf_counter() + args.seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stopAt:
                await client.call("UpdateStats", request)
                done += 1

        t0 = time.perf_counter()
        cpu2, srv2 = cpuSeconds(), cpuSeconds(coderdPid)
        await defer.gatherResults([defer.ensureDeferred(caller()) for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - t0
        cpu3, srv3 = cpuSeconds(), cpuSeconds(coderdPid)

        # 3. one large message
        big = agent_pb2.BatchCreateLogsRequest(
            logs=[agent_pb2.Log(output="x" * (3 * 1024 * 1024), level=agent_pb2.Log.INFO)]
        )
        t0 = time.perf_counter()
        await client.call("BatchCreateLogs", big)
        bigMs = (time.perf_counter() - t0) * 1000
    finally:
        await client.stopService()
    return {
        "sequential_calls": args.calls,
        "rtt_median_ms": round(statistics.median(rtts), 3),
        "rtt_p90_ms": round(percentile(rtts, 0.90), 3),
        "rtt_p99_ms": round(percentile(rtts, 0.99), 3),
        "rtt_max_ms": round(max(rtts), 3),
        "sequential_calls_per_s": round(args.calls / (sum(rtts) / 1000), 1),
        "client_cpu_s_per_1000": round((cpu1 - cpu0) / args.calls * 1000, 3),
        "coderd_cpu_s_per_1000": round((srv1 - srv0) / args.calls * 1000, 3),
        "concurrency": args.concurrency,
        "concurrent_calls": done,
        "concurrent_calls_per_s": round(done / elapsed, 1),
        "concurrent_client_cores": round((cpu3 - cpu2) / elapsed, 2),
        "concurrent_coderd_cores": round((srv3 - srv2) / elapsed, 2),
        "call_3MiB_ms": round(bigMs, 1),
    }


def report(result: dict[str, Any]) -> str:
    ok = result["rtt_median_ms"] <= TARGET_MEDIAN_MS
    rows = [
        (
            "unary round trip, median ms",
            result["rtt_median_ms"],
            f"<= {TARGET_MEDIAN_MS}",
            "PASS" if ok else "FAIL",
        ),
        (
            "unary round trip, p90 / p99 / max ms",
            f"{result['rtt_p90_ms']} / {result['rtt_p99_ms']} / {result['rtt_max_ms']}",
            "",
            "",
        ),
        ("one call at a time, calls/s", result["sequential_calls_per_s"], "", ""),
        (
            f"{result['concurrency']} calls in flight, calls/s",
            result["concurrent_calls_per_s"],
            "",
            "",
        ),
        (
            "  cores used: client / coderd-dev",
            f"{result['concurrent_client_cores']} / {result['concurrent_coderd_cores']}",
            "",
            "",
        ),
        (
            "CPU s per 1000 sequential calls: client / coderd-dev",
            f"{result['client_cpu_s_per_1000']} / {result['coderd_cpu_s_per_1000']}",
            "",
            "",
        ),
        ("one 3 MiB BatchCreateLogs, ms", result["call_3MiB_ms"], "", ""),
    ]
    lines = ["| metric | agent | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/rpc.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000, help="sequential calls timed")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of the concurrent run")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = p.parse_args(argv)

    proc, port = startCoderd()
    log(f"coderd-dev pid {proc.pid} on 127.0.0.1:{port}")
    result: dict[str, Any] = {}
    try:
        from twisted.internet import defer, reactor
        from twisted.python.failure import Failure

        def run() -> None:
            d = defer.ensureDeferred(measure(args, port, proc.pid))

            def finished(outcome: Any) -> None:
                if isinstance(outcome, Failure):
                    log(f"failed: {outcome.getTraceback()}")
                else:
                    result.update(outcome)
                reactor.stop()

            d.addBoth(finished)

        reactor.callWhenRunning(run)
        reactor.run()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not result:
        return 1
    print(report(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.check and result["rtt_median_ms"] > TARGET_MEDIAN_MS:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
