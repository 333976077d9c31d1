"""The forwarding policy's cost: microseconds per decision, and ``-L`` throughput with one.

Usage (from the repository root):

    python benchmarks/policy.py [--rules 1000] [--decisions 20000]
    python benchmarks/policy.py --throughput [--rules 100] [--reps 5] [--mbytes 256]

A policy file of N local_tcp rules (every one a miss for the request, so each decision
reads them all: the worst case) and the same number of reverse_tcp and reverse_unix
rules; each decision goes through the one Policy object as the SSH handlers call it.

``--throughput`` installs the working tree as ``benchmarks/run.py`` does and, in each
repetition, starts two agents from it, one without a policy file and one with such a file of
N rules, then pushes data through ``ssh -N -L`` to each in turn (the order alternating; the
same client, sink and user as the side-by-side benchmark): MB/s and the agent's CPU per
32 KiB packet, side by side.  The policy decides when a channel opens, not per packet, so the
two should agree within the noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import install  # noqa: E402
from coderagent.policy import Policy, loadPolicy  # noqa: E402


def policyText(rules: int) -> str:
    parts = ['[local_tcp]\ndefault = "allow"\n']
    for i in range(rules):
        parts.append(
            f'[[local_tcp.rules]]\nname = "r{i}"\naction = "deny"\n'
            f'host = ["host{i}.example", "10.{i // 250}.{i % 250}.0/24"]\nports = {1 + i}\n'
        )
    parts.append('[reverse_tcp]\ndefault = "allow"\n')
    for i in range(rules):
        parts.append(f'[[reverse_tcp.rules]]\naction = "deny"\nbind = "10.9.{i % 250}.1"\n')
    parts.append('[reverse_unix]\ndefault = "allow"\n')
    for i in range(rules):
        parts.append(f'[[reverse_unix.rules]]\naction = "deny"\npath = "/srv/s{i}/*.sock"\n')
    return "".join(parts)


def timeEach(decide: object, n: int) -> float:
    """Median microseconds of ``decide()`` over ``n`` calls (in batches of 100)."""
    samples = []
    for _ in range(max(1, n // 100)):
        start = time.perf_counter()
        for _ in range(100):
            decide()  # type: ignore[operator]
        samples.append((time.perf_counter() - start) / 100 * 1e6)
    return statistics.median(samples)


def throughput(rules: int, reps: int, mbytes: int, venv: Path) -> None:
    """``-L`` MB/s and CPU per packet: an agent without a policy file and one with ``rules``."""
    import shutil
    import tempfile

    from benchmarks import servers, workloads
    from benchmarks.sampling import Measure

    twistd = install.installAgent(venv)
    workdir = Path(tempfile.mkdtemp(prefix="coderagent-bench-policy-"))
    workdir.chmod(0o755)
    policyFile = workdir / "policy.toml"
    policyFile.write_text(policyText(rules))
    policyFile.chmod(0o644)
    user = servers.ensureBenchUser("coderbench")
    keys = servers.makeKeys(workdir)
    sink = workloads.startSink(workdir)
    configs = {"none": [], f"{rules} rules": [f"--forwarding-policy-file={policyFile}"]}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    started: list[servers.Server] = []
    try:
        for rep in range(reps):
            # Fresh agents each repetition, started and measured in alternating order: the
            # one started first tended to do a few percent better, whichever it was.
            order = list(configs) if rep % 2 == 0 else list(reversed(configs))
            agents = {}
            for name in order:
                sub = workdir / f"agent-{rep}-{len(agents)}"
                sub.mkdir()
                sub.chmod(0o755)
                agents[name] = servers.startAgent(sub, keys, user, twistd, extraArgs=configs[name])
                started.append(agents[name])
            for name in order:
                server = agents[name]
                client = workloads.Client(server.port, user.name, keys.client, [])
                entry = servers.freePort()
                result = workloads.throughput(
                    client,
                    ["-L", f"127.0.0.1:{entry}:127.0.0.1:{sink.port}"],
                    entry,
                    mbytes * workloads.MIB,
                    lambda clientPid, pid=server.pid: Measure(pid, clientPid),
                    workdir,
                    120.0,
                    30.0,
                )
                if "error" in result:
                    raise RuntimeError(f"{name}: {result['error']}")
                results[name].append(result)
                print(
                    f"[bench] rep {rep + 1}/{reps} {name}: {result['MBps']} MB/s, "
                    f"{result['server_cpu_us_per_packet']} µs/packet",
                    file=sys.stderr,
                    flush=True,
                )
            for server in agents.values():
                server.stop()
    finally:
        for server in started:
            server.stop()
        sink.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def cell(name: str, key: str) -> str:
        xs = [r[key] for r in results[name]]
        return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"

    names = list(results)
    print(
        f"| `ssh -L`, {mbytes} MiB per push, {reps} reps, median [min-max] | "
        + " | ".join(names)
        + " | ratio |"
    )
    print("|---|---|---|---|")
    for label, key in (
        ("MB/s", "MBps"),
        ("agent CPU µs per 32 KiB packet", "server_cpu_us_per_packet"),
    ):
        medians = [statistics.median(r[key] for r in results[n]) for n in names]
        print(
            f"| {label} | {cell(names[0], key)} | {cell(names[1], key)} "
            f"| {medians[1] / medians[0]:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/policy.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rules", type=int, default=None, help="rules per section (1000; 100 with --throughput)"
    )
    p.add_argument("--decisions", type=int, default=20000)
    p.add_argument(
        "--throughput", action="store_true", help="-L throughput with and without a policy"
    )
    p.add_argument("--reps", type=int, default=5, help="repetitions of each agent (--throughput)")
    p.add_argument("--mbytes", type=int, default=256, help="MiB per push (--throughput)")
    p.add_argument("--agent-venv", type=Path, default=install.DEFAULT_VENV)
    a = p.parse_args(argv)
    if a.throughput:
        throughput(100 if a.rules is None else a.rules, a.reps, a.mbytes, a.agent_venv)
        return 0
    a.rules = 1000 if a.rules is None else a.rules
    loadStart = time.perf_counter()
    policy = Policy(rules=loadPolicy(policyText(a.rules).encode()))
    loaded = time.perf_counter() - loadStart
    rows = [
        (
            "local tcp, a name and 2 addresses",
            lambda: policy.localTCP("app.internal", 443, ["192.0.2.10", "2001:db8::10"]),
        ),
        ("reverse tcp", lambda: policy.reverseTCP("127.0.0.1", 8080)),
        ("reverse unix", lambda: policy.reverseUnix("/run/user/1000/gnupg/S.gpg-agent")),
    ]
    print(f"| decision, {a.rules} rules (all read) | median µs |")
    print("|---|---|")
    for what, decide in rows:
        print(f"| {what} | {timeEach(decide, a.decisions):.1f} |")
    print(f"| loading the file ({3 * a.rules} rules) | {loaded * 1e3:.0f} ms |")
    empty = Policy()
    cost = timeEach(lambda: empty.localTCP("h", 1, ["192.0.2.1"]), a.decisions)
    print(f"| local tcp, no policy file | {cost:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
