"""OpenSSH sshd and the coder agent side by side: forwarding throughput, concurrency, exec latency.

Usage (from the repository root):

    python benchmarks/run.py [--reps N] [--mbytes M] [--only a,b] [--json-out FILE]
    tox -e bench -- [same options]

Tests (``--only``): local (-L TCP), remote (-R TCP), unix (-L to a unix
socket), conc (N connections through one -L), exec (exec latency on a
ControlMaster connection).  Each runs in each algorithm configuration
(``--configs``): ``ctr`` forces ``-c aes128-ctr -m hmac-sha2-256``,
``default`` forces nothing (OpenSSH negotiates chacha20-poly1305 with both
servers), ``gcm`` forces ``-c aes128-gcm@openssh.com``.  Within each
repetition every test runs on both servers back to back; which server goes
first alternates between repetitions.  The agent is installed in a venv of
its own and runs as the login user, started from ``/``.  See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import install, report, servers, workloads  # noqa: E402
from benchmarks.sampling import Measure, machineBusy, processTree, treeMemory  # noqa: E402

TESTS = ["exec", "local", "remote", "unix", "conc"]
_KEX = ["-o", "KexAlgorithms=curve25519-sha256"]
#: The algorithm configurations: what the ssh client is told, on both servers.
CONFIGS: dict[str, list[str]] = {
    "ctr": ["-c", "aes128-ctr", "-m", "hmac-sha2-256", *_KEX],
    "default": [],
    "gcm": ["-c", "aes128-gcm@openssh.com", *_KEX],
}
MIB = workloads.MIB


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parseArgs(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions (servers interleaved)")
    p.add_argument("--mbytes", type=int, default=256, help="MiB per throughput push")
    p.add_argument("--only", default=",".join(TESTS), help="comma-separated subset of the tests")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated algorithm configurations: " + ", ".join(CONFIGS),
    )
    p.add_argument(
        "--agent-venv",
        type=Path,
        default=install.DEFAULT_VENV,
        help="virtualenv the working tree's agent is installed into (outside any 0700 home)",
    )
    p.add_argument("--json-out", type=Path, help="write every raw result and the summary here")
    p.add_argument("--servers", default="sshd,agent", help="which of sshd,agent to run")
    p.add_argument("--conns", type=int, default=200, help="concurrent connections (conc test)")
    p.add_argument("--conn-mbytes", type=float, default=2.0, help="MiB per concurrent connection")
    p.add_argument("--exec-n", type=int, default=30, help="timed execs per repetition")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="shrink a throughput push so it takes about this long at most",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="bound on any one operation, s")
    p.add_argument(
        "--deadline-min", type=float, default=20.0, help="start no new test after this many minutes"
    )
    p.add_argument(
        "--user",
        default="coderbench",
        help="login user for both servers when run as root (created if missing)",
    )
    p.add_argument(
        "--agent-as",
        choices=["auto", "bench", "self"],
        default="auto",
        help="run the agent as the login user (bench), as yourself (self), or "
        "bench when that user can execute this Python (auto)",
    )
    p.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra coder-agent option (repeatable)",
    )
    p.add_argument(
        "--agent-cprofile",
        type=Path,
        metavar="FILE",
        help="run the agent under cProfile, stats written to FILE when it stops",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the probe of negotiated algorithms and channel windows",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="apt-get install openssh-server first if sshd is missing (root)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    a.only = [t.strip() for t in a.only.split(",") if t.strip()]
    a.servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    for c in a.configs:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; choose from {','.join(CONFIGS)}")
    for t in a.only:
        if t not in TESTS:
            p.error(f"unknown test {t!r}; choose from {','.join(TESTS)}")
    for s in a.servers:
        if s not in ("sshd", "agent"):
            p.error(f"unknown server {s!r}")
    if a.reps < 1 or a.mbytes < 1 or a.conns < 1 or a.exec_n < 1:
        p.error("--reps, --mbytes, --conns and --exec-n must be positive")
    return a


class Bench:
    """Owns the temporary directory, the sink and the servers; stops them all."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.workdir = Path(tempfile.mkdtemp(prefix="coderagent-bench-"))
        self.workdir.chmod(0o755)  # the login user reads authorized_keys, sink.sock
        self.servers: dict[str, servers.Server] = {}
        self.sink: workloads.Sink | None = None
        self.keys: servers.Keys | None = None
        self.user: servers.BenchUser | None = None
        self.runs: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.twistd: Path | None = None

    # ---------------------------------------------------------------- setup --
    def start(self, name: str) -> servers.Server:
        assert self.keys and self.user
        if name == "sshd":
            server = servers.startSshd(self.workdir, self.keys, self.user)
        else:
            sub = self.workdir / f"agent-{len(self.runs)}-{time.monotonic_ns()}"
            sub.mkdir()
            sub.chmod(0o755)
            assert self.twistd is not None
            server = servers.startAgent(
                sub,
                self.keys,
                self.user,
                self.twistd,
                agentAs=self.a.agent_as,
                extraArgs=self.a.agent_arg,
                profile=self.a.agent_cprofile is not None,
            )
        log(f"started {name}: pid {server.pid}, 127.0.0.1:{server.port}, {server.notes}")
        self.servers[name] = server
        return server

    def client(self, server: servers.Server, config: str) -> workloads.Client:
        assert self.keys and self.user
        return workloads.Client(server.port, self.user.name, self.keys.client, CONFIGS[config])

    def setUp(self) -> None:
        a = self.a
        if "sshd" in a.servers:
            try:
                servers.findSshd()
            except servers.BenchSetupError:
                if not a.install:
                    raise
                log("installing openssh-server ...")
                servers.installOpenSSHServer()
                servers.findSshd()
        if "agent" in a.servers:
            log(f"installing the agent from {REPO} into {a.agent_venv} ...")
            self.twistd = install.installAgent(a.agent_venv)
        self.user = servers.ensureBenchUser(a.user)
        self.keys = servers.makeKeys(self.workdir)
        self.sink = workloads.startSink(self.workdir)
        idle: dict[str, float] = {}
        for name in a.servers:
            server = self.start(name)
            time.sleep(1.0)  # past start-up
            idle[name] = round(treeMemory(processTree(server.pid))[0] / MIB, 1)
        self.meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "configs": {c: CONFIGS[c] for c in a.configs},
            "idle_rss_no_connection_MiB": idle,
            "login_user": self.user.name,
            "ssh": servers.versionOf(["ssh", "-V"]),
            "python": servers.versionOf([str(self.twistd.parent / "python"), "-V"])
            if self.twistd
            else "-",
            "coderagent": f"{install.describeTree()}, installed in {a.agent_venv}",
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "servers": {
                n: {"port": s.port, "pid": s.pid, **s.notes} for n, s in self.servers.items()
            },
        }
        if self.twistd is not None:
            self.meta["twisted"] = servers.versionOf(
                [
                    str(self.twistd.parent / "python"),
                    "-c",
                    "import twisted; print(twisted.version.short())",
                ]
            )

    # ----------------------------------------------------------------- tests --
    def runTest(self, test: str, server: servers.Server, config: str) -> dict[str, Any]:
        a, sink = self.a, self.sink
        assert sink is not None
        client = self.client(server, config)

        def measure(clientPid: int | None) -> Measure:
            return Measure(server.pid, clientPid, maxSeconds=a.timeout + 60)

        nbytes = a.mbytes * MIB
        if test == "exec":
            return workloads.execLatency(client, a.exec_n, measure, self.workdir, a.timeout)
        if test == "conc":
            return workloads.concurrency(
                client, sink, a.conns, int(a.conn_mbytes * MIB), measure, self.workdir, a.timeout
            )
        entry = servers.freePort()
        if test == "local":
            spec = ["-L", f"127.0.0.1:{entry}:127.0.0.1:{sink.port}"]
        elif test == "remote":
            spec = ["-R", f"127.0.0.1:{entry}:127.0.0.1:{sink.port}"]
        else:
            spec = ["-L", f"127.0.0.1:{entry}:{sink.unixPath}"]
        return workloads.throughput(
            client, spec, entry, nbytes, measure, self.workdir, a.timeout, a.max_seconds
        )

    def run(self) -> None:
        a = self.a
        assert self.sink is not None
        busy = machineBusy(1.0)
        self.meta["machine_busy_before"] = busy
        if busy > 0.15:
            log(f"WARNING: the machine is already {busy:.0%} busy: figures will be low and noisy")
        self.meta["raw_loopback_MBps"] = workloads.rawLoopback(self.sink, a.mbytes * MIB, a.timeout)
        log(f"raw loopback (pusher -> sink, no SSH): {self.meta['raw_loopback_MBps']} MB/s")
        if not a.no_probe:
            self.meta["probe"] = {}
            for config in a.configs:
                for name, server in self.servers.items():
                    client = self.client(server, config)
                    pr = workloads.probe(client, self.sink, self.workdir, a.timeout)
                    self.meta["probe"][f"{config}/{name}"] = pr
                    log(f"probe {config} {name}: {pr}")
        stopAt = time.monotonic() + a.deadline_min * 60
        names = list(self.servers)
        for rep in range(a.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for config, test in [(c, t) for c in a.configs for t in a.only]:
                for name in order:
                    if time.monotonic() > stopAt:
                        log("deadline reached: no more tests")
                        return
                    server = self.servers[name]
                    if not server.proc.alive():
                        log(f"{name} died (status {server.proc.popen.returncode}); restarting")
                        server = self.start(name)
                    t0 = time.monotonic()
                    try:
                        result = self.runTest(test, server, config)
                    except Exception as e:  # recorded; the run goes on
                        result = {"error": f"{type(e).__name__}: {e}"[:400]}
                    self.runs.append(
                        {
                            "rep": rep,
                            "config": config,
                            "test": test,
                            "server": name,
                            "first": name == order[0],
                            "result": result,
                        }
                    )
                    log(
                        f"rep {rep + 1}/{a.reps} {config:7} {test:6} {name:5} "
                        f"{time.monotonic() - t0:5.1f}s  {brief(test, result)}"
                    )

    def tearDown(self) -> None:
        for name, server in self.servers.items():
            rc = server.stop()
            log(f"stopped {name} (pid {server.pid}, status {rc})")
            if server.profile and self.a.agent_cprofile:
                if server.profile.exists():
                    shutil.copy(server.profile, self.a.agent_cprofile)
                    log(f"agent profile: {self.a.agent_cprofile}")
                else:
                    log("the agent wrote no profile")
        if self.sink is not None:
            self.sink.proc.stop()
        if self.a.keep_tmp:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---------------------------------------------------------------- report --
    def report(self) -> bool:
        a = self.a
        load = os.getloadavg()
        out = [
            "",
            f"coderagent benchmarks: {len({r['rep'] for r in self.runs})} repetition(s), "
            f"{a.mbytes} MiB per push, MB = 1e6 bytes, cells are median [min-max]",
            f"login user {self.meta.get('login_user')}; "
            + "; ".join(
                f"{n}: {s.get('runs as')}, pid {s.get('pid')}"
                + (f", HOME {s['HOME']}" if "HOME" in s else "")
                + (f", cwd {s['cwd']}" if "cwd" in s else "")
                for n, s in self.meta.get("servers", {}).items()
            ),
            f"client {self.meta.get('ssh')}; agent {self.meta.get('coderagent')}, "
            f"Twisted {self.meta.get('twisted', '?')}, {self.meta.get('python')}",
            f"raw loopback through the same pusher/sink (no SSH): "
            f"{self.meta.get('raw_loopback_MBps')} MB/s; machine busy before the run: "
            f"{self.meta.get('machine_busy_before', 0):.0%} of {os.cpu_count()} CPUs; "
            f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            "idle RSS, no connection: "
            + ", ".join(
                f"{n} {v} MiB" for n, v in self.meta.get("idle_rss_no_connection_MiB", {}).items()
            ),
        ]
        for name, notes in self.meta.get("servers", {}).items():
            for key, value in notes.items():
                if key.startswith("why not"):
                    out.append(
                        f"{name}: not run as the login user: {value}; its HOME holds "
                        "copies of the login user's dotfiles"
                    )
        ok = True
        summary: dict[str, list[dict[str, Any]]] = {}
        for config in a.configs:
            runs = [r for r in self.runs if r.get("config") == config]
            if not runs:
                continue
            rows = report.summarize(runs, a.conns, a.conn_mbytes, baseline=config == "default")
            summary[config] = [vars(r) for r in rows]
            ok = ok and report.allPass(rows)
            crypto = " ".join(CONFIGS[config]) or "nothing forced (default negotiation)"
            out += ["", f"## {config}: {crypto}", ""]
            for key, pr in self.meta.get("probe", {}).items():
                if key.startswith(config + "/"):
                    out.append(
                        f"probe {key.split('/', 1)[1]}: {pr.get('software')}, kex {pr.get('kex')}, "
                        f"{pr.get('cipher_mac')}, window/maxpacket session "
                        f"{pr.get('session_window')}, "
                        f"direct-tcpip {pr.get('direct_tcpip_window')}, "
                        f"forwarded-tcpip {pr.get('forwarded_tcpip_window')}"
                    )
            out += [
                "",
                report.mainTable(rows),
                "",
                "Server resources during each test (median; peak RSS is the max over repetitions):",
                "",
                report.resourceTable(runs, list(self.servers)),
            ]
        errors = report.errorLines(self.runs)
        if errors:
            out += ["", "Errors:"] + [f"  {e}" for e in errors[:30]]
        print("\n".join(out), flush=True)
        if a.json_out:
            a.json_out.write_text(
                json.dumps(
                    {"meta": self.meta, "runs": self.runs, "summary": summary},
                    indent=1,
                    sort_keys=True,
                )
                + "\n"
            )
            log(f"wrote {a.json_out}")
        return ok


def brief(test: str, result: dict[str, Any]) -> str:
    if result.get("error"):
        return "ERROR " + str(result["error"])[:200]
    if test == "exec":
        return (
            f"median {result.get('median_ms')} ms, p95 {result.get('p95_ms')} ms, "
            f"failures {result.get('failures')}"
        )
    if test == "conc":
        return (
            f"{result.get('seconds')} s, failures {result.get('failures')}, "
            f"server {result.get('server_cores')} cores, peak RSS {result.get('rss_peak_MiB')} MiB"
        )
    return (
        f"{result.get('MBps')} MB/s ({result.get('MiB')} MiB), server "
        f"{result.get('server_cores')} cores, ssh {result.get('client_cores')} cores"
    )


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    a = parseArgs(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    bench = Bench(a)
    t0 = time.monotonic()
    try:
        bench.setUp()
        bench.run()
    except servers.BenchSetupError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        bench.tearDown()
    ok = bench.report()
    log(f"done in {time.monotonic() - t0:.0f}s")
    return 1 if (a.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
