"""Medians, ratios and targets; the tables ``run.py`` prints.

Each run record is ``{"rep": i, "test": name, "server": "sshd"|"agent",
"result": {...}}``.  A cell is the median over repetitions with [min-max];
the ratio is agent median / sshd median.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    test: str
    field: str
    label: str
    # target on the ratio agent/sshd: (">=", 0.75) or ("<=", 1.5), or None
    ratioTarget: tuple[str, float] | None = None
    failuresField: str | None = None  # must sum to 0 for the agent
    digits: int = 1
    agentMax: float | None = None  # an absolute bound on the agent's median


def metrics(conns: int, connMiB: float, baseline: bool = False) -> list[Metric]:
    """The rows of issue 15's table; ``baseline``: the default negotiation (>= 1.0x)."""
    floor = 1.0 if baseline else 0.9
    return [
        Metric("local", "MBps", "-L TCP forward, MB/s", (">=", floor)),
        Metric("remote", "MBps", "-R TCP forward, MB/s", (">=", floor)),
        Metric("unix", "MBps", "-L to unix socket (direct-streamlocal), MB/s", (">=", floor)),
        Metric(
            "conc",
            "seconds",
            f"{conns} conns x {connMiB:g} MiB through one -L, total s",
            ("<=", 1.3),
            failuresField="failures",
            digits=2,
        ),
        Metric("conc", "MBps", f"  {conns} conns, aggregate MB/s"),
        Metric(
            "exec",
            "median_ms",
            "exec on ControlMaster (ssh -S ctl host true), median ms",
            ("<=", 1.3),
            digits=2,
        ),
        Metric("exec", "p95_ms", "  p95 ms"),
        Metric("exec", "floor_median_ms", "  client floor (ssh -O check), median ms"),
        Metric(
            "exec",
            "server_cpu_ms_per_exec",
            "server CPU per exec, ms (shell included)",
            ("<=", 2.0),
        ),
        Metric("local", "server_cpu_us_per_packet", "server CPU per 32 KiB packet, -L TCP, us"),
        Metric("remote", "server_cpu_us_per_packet", "server CPU per 32 KiB packet, -R TCP, us"),
        Metric("unix", "server_cpu_us_per_packet", "server CPU per 32 KiB packet, -L unix, us"),
        Metric("local", "rss_before_MiB", "idle RSS with one connection open, MiB", agentMax=45.0),
    ]


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def values(runs: Sequence[Record], server: str, test: str, field: str) -> list[float]:
    out = []
    for r in runs:
        if r["server"] == server and r["test"] == test:
            v = r["result"].get(field)
            if _number(v):
                out.append(float(v))
    return out


def errorsOf(runs: Sequence[Record], server: str, test: str) -> list[str]:
    return [
        str(r["result"]["error"])
        for r in runs
        if r["server"] == server and r["test"] == test and r["result"].get("error")
    ]


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def cell(xs: list[float], digits: int, nErrors: int = 0) -> str:
    if not xs:
        return "error" if nErrors else "-"
    text = _fmt(statistics.median(xs), digits)
    if len(xs) > 1:
        text += f" [{_fmt(min(xs), digits)}-{_fmt(max(xs), digits)}]"
    if nErrors:
        text += f" ({nErrors} err)"
    return text


@dataclass
class Row:
    label: str
    sshd: str
    agent: str
    ratio: str
    target: str
    verdict: str
    sshdMedian: float | None = None
    agentMedian: float | None = None
    ratioValue: float | None = None


def summarize(
    runs: Sequence[Record], conns: int, connMiB: float, baseline: bool = False
) -> list[Row]:
    rows: list[Row] = []
    tests = {r["test"] for r in runs}
    for m in metrics(conns, connMiB, baseline):
        if m.test not in tests:
            continue
        s = values(runs, "sshd", m.test, m.field)
        a = values(runs, "agent", m.test, m.field)
        sErr = len(errorsOf(runs, "sshd", m.test))
        aErr = len(errorsOf(runs, "agent", m.test))
        ratio = None
        if s and a and statistics.median(s) > 0:
            ratio = statistics.median(a) / statistics.median(s)
        target, verdict = "", ""
        if m.ratioTarget:
            op, bound = m.ratioTarget
            target = f"{op} {bound:g}x sshd"
            ok = ratio is not None and (ratio >= bound if op == ">=" else ratio <= bound)
            if m.failuresField:
                target = f"0 failures, {target}"
                aFail = values(runs, "agent", m.test, m.failuresField)
                ok = ok and bool(aFail) and sum(aFail) == 0
            ok = ok and aErr == 0
            verdict = "PASS" if ok else "FAIL"
            if not (s or sErr) or not (a or aErr):
                verdict = ""  # one server was not run: nothing to compare
        if m.agentMax is not None:
            target = f"agent <= {m.agentMax:g}"
            verdict = "" if not a else "PASS" if statistics.median(a) <= m.agentMax else "FAIL"
        rows.append(
            Row(
                m.label,
                cell(s, m.digits, sErr),
                cell(a, m.digits, aErr),
                "-" if ratio is None else f"{ratio:.3f}",
                target,
                verdict,
                statistics.median(s) if s else None,
                statistics.median(a) if a else None,
                None if ratio is None else round(ratio, 3),
            )
        )
        if m.failuresField:
            sf = values(runs, "sshd", m.test, m.failuresField)
            af = values(runs, "agent", m.test, m.failuresField)
            rows.append(
                Row(
                    "  failed connections (sum over repetitions)",
                    f"{sum(sf):.0f}" if sf else "-",
                    f"{sum(af):.0f}" if af else "-",
                    "",
                    "0",
                    ("PASS" if af and sum(af) == 0 else "FAIL" if af or aErr else ""),
                )
            )
    if "exec" in tests:
        sf = values(runs, "sshd", "exec", "failures")
        af = values(runs, "agent", "exec", "failures")
        rows.append(
            Row(
                "  exec failures (sum over repetitions)",
                f"{sum(sf):.0f}" if sf else "-",
                f"{sum(af):.0f}" if af else "-",
                "",
                "",
                "",
            )
        )
    return rows


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table, padded for reading in a terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def mainTable(rows: Sequence[Row]) -> str:
    return table(
        ["metric", "sshd", "agent", "ratio agent/sshd", "target", ""],
        [[r.label, r.sshd, r.agent, r.ratio, r.target, r.verdict] for r in rows],
    )


TEST_NAMES = {
    "local": "-L TCP",
    "remote": "-R TCP",
    "unix": "-L unix",
    "conc": "concurrency",
    "exec": "exec (mux)",
}


def resourceTable(runs: Sequence[Record], servers: Sequence[str]) -> str:
    """Per test and server: CPU of the server tree, ssh client CPU, memory."""
    body = []
    for test in TEST_NAMES:
        for server in servers:
            sel = [r for r in runs if r["test"] == test and r["server"] == server]
            if not sel:
                continue

            def med(field: str, digits: int = 2, sel: list[Record] = sel) -> str:
                xs = [float(r["result"][field]) for r in sel if _number(r["result"].get(field))]
                return _fmt(statistics.median(xs), digits) if xs else "-"

            def mx(field: str, sel: list[Record] = sel) -> str:
                xs = [float(r["result"][field]) for r in sel if _number(r["result"].get(field))]
                return _fmt(max(xs), 1) if xs else "-"

            perUnit = "-"
            if test in ("local", "remote", "unix"):
                perUnit = med("server_cpu_s_per_GB") + " ms/MB"
            elif test == "exec":
                perUnit = med("server_cpu_ms_per_exec", 1) + " ms/exec"
            body.append(
                [
                    TEST_NAMES[test],
                    server,
                    med("server_cpu_s"),
                    med("server_cores"),
                    perUnit,
                    med("client_cores"),
                    med("machine_busy"),
                    med("rss_before_MiB", 1),
                    mx("rss_peak_MiB"),
                    med("pss_before_MiB", 1),
                    mx("pss_peak_MiB"),
                ]
            )
    return table(
        [
            "test",
            "server",
            "server CPU s",
            "server cores",
            "server CPU per unit",
            "ssh client cores",
            "machine busy (of 2)" if _cpus() == 2 else "machine busy",
            "RSS before, MiB",
            "peak RSS (max), MiB",
            "PSS before, MiB",
            "peak PSS (max), MiB",
        ],
        body,
    )


def _cpus() -> int:
    return os.cpu_count() or 0


def errorLines(runs: Sequence[Record]) -> list[str]:
    out = []
    for r in runs:
        err = r["result"].get("error") or r["result"].get("errors")
        if err:
            out.append(f"rep {r['rep']} {r['server']} {r['test']}: {err}")
    return out


def allPass(rows: Sequence[Row]) -> bool:
    return all(r.verdict != "FAIL" for r in rows)
