"""The forwarding policy's decision cost: median microseconds per decision, with N rules.

Usage (from the repository root):

    python benchmarks/policy.py [--rules 1000] [--decisions 20000]
    tox -e bench-policy -- [same options]

A policy file of N local_tcp rules (every one a miss for the request, so each decision
reads them all: the worst case) and the same number of reverse_tcp and reverse_unix
rules; each decision goes through the one Policy object as the SSH handlers call it.
For the cost in throughput, ``benchmarks/run.py --agent-arg
--forwarding-policy-file=FILE`` runs the side-by-side benchmark with a policy in force.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/policy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", type=int, default=1000)
    p.add_argument("--decisions", type=int, default=20000)
    a = p.parse_args(argv)
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
