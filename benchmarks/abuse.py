# paramiko is unannotated.
# mypy: disallow-untyped-calls=False
"""One hostile connection against a real agent: what it costs the agent.

Runs the abuse cases of issue 11 against ``twistd coder-agent`` started with
a given ``RLIMIT_NOFILE`` (soft:hard, as a distribution's default 1024 soft
limit), and prints the agent's resident memory and open descriptors around
each, plus whether a second connection can still log in and run a command:

* ``forwards``: 1009 ``tcpip-forward`` requests on one connection;
* ``env``: 1024 ``env`` requests of 200 KB (``--env-size``) on one session,
  then ``exec``;
* ``longpath``: a ``direct-streamlocal`` open whose path is longer than
  ``sun_path`` (how long until the answer, descriptors meanwhile).

Not a benchmark of speed and not run by the tests:
``python benchmarks/abuse.py [--nofile 1024:1024]`` from the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
from paramiko.common import cMSG_CHANNEL_OPEN
from paramiko.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.agentproc import (
    LISTENING,
    START_TIMEOUT,
    Agent,
    ClientKeys,
    agentArgs,
    agentEnvironment,
    spawnAgent,
    ssh,
)

TIMEOUT = 60.0


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(agent: Agent) -> str:
    pid = agent.process.pid
    return (
        f"RSS {status(pid, 'VmRSS') / 1024:.1f} MiB (peak {status(pid, 'VmHWM') / 1024:.1f}), "
        f"{descriptors(pid)} descriptors"
    )


@contextmanager
def agentWithLimit(workdir: Path, keys: ClientKeys, nofile: str) -> Iterator[Agent]:
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    prefix = ["prlimit", f"--nofile={nofile}", "--"] if nofile else []
    proc = spawnAgent(
        agentArgs(keys, workdir / "data"), agentEnvironment(home), prefix=prefix
    )
    agent = Agent(proc, home=home)
    agent.startReading()
    try:
        m = agent.waitForLog(LISTENING, timeout=START_TIMEOUT)
        agent.host, agent.port = m.group(1), int(m.group(2))
        yield agent
    finally:
        agent.stop()


def login(agent: Agent, key: Path) -> paramiko.Transport:
    transport = paramiko.Transport((agent.host, agent.port))
    transport.start_client(timeout=TIMEOUT)
    transport.auth_publickey("coder", paramiko.Ed25519Key.from_private_key_file(str(key)))
    return transport


def secondLogin(agent: Agent, key: Path) -> str:
    done = ssh(agent, key, "echo second-login-ok", timeout=TIMEOUT)
    if done.returncode == 0 and done.stdout == b"second-login-ok\n":
        return "a second login runs a command: yes"
    return f"a second login runs a command: NO (exit {done.returncode}: {done.stderr[-200:]!r})"


def forwards(agent: Agent, key: Path, count: int = 1009) -> None:
    print(f"forwards: before: {snapshot(agent)}")
    transport = login(agent, key)
    granted = refused = 0
    try:
        for _ in range(count):
            try:
                transport.request_port_forward("127.0.0.1", 0)
                granted += 1
            except paramiko.SSHException:
                refused += 1
                if not transport.is_active():
                    break
        print(f"forwards: {granted} granted, {refused} refused; connection up: "
              f"{transport.is_active()}")
        print(f"forwards: holding: {snapshot(agent)}")
        print(f"forwards: {secondLogin(agent, key)}")
    finally:
        transport.close()


def env(agent: Agent, key: Path, count: int = 1024, size: int = 200 * 1000) -> None:
    print(f"env: before: {snapshot(agent)}")
    transport = login(agent, key)
    try:
        chan = transport.open_session(timeout=TIMEOUT)
        chan.settimeout(TIMEOUT)
        value = "x" * size
        for i in range(count):
            chan.set_environment_variable(f"BIG{i}", value)
        chan.exec_command("echo done")
        out = b""
        while True:
            data = chan.recv(4096)
            if not data:
                break
            out += data
        print(f"env: exec after {count} x {size} B: exit {chan.recv_exit_status()}, "
              f"output {out!r}")
        print(f"env: after: {snapshot(agent)}")
    finally:
        transport.close()


def longpath(agent: Agent, key: Path) -> None:
    print(f"longpath: before: {snapshot(agent)}")
    transport = login(agent, key)
    path = b"/tmp/" + b"p" * 200 + b".sock"
    try:
        chanid = transport._next_channel()
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(2 * 1024 * 1024, 32768)
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("direct-streamlocal@openssh.com")
        m.add_int(chanid)
        m.add_int(2 * 1024 * 1024)
        m.add_int(32768)
        m.add_string(path)
        m.add_string(b"")
        m.add_int(0)
        started = time.monotonic()
        transport._send_user_message(m)
        event.wait(1.0)
        print(f"longpath: 1 s after the open: {snapshot(agent)}")
        event.wait(TIMEOUT)
        took = time.monotonic() - started
        failure = transport.get_exception()
        print(f"longpath: answered after {took:.2f} s: {failure!r}")
        tracebacks = agent.log().count("Traceback")
        print(f"longpath: tracebacks in the agent log: {tracebacks}")
    finally:
        transport.close()


CASES = {"forwards": forwards, "env": env, "longpath": longpath}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", default="1024:1024", help="soft:hard RLIMIT_NOFILE")
    parser.add_argument("--env-size", type=int, default=200_000, help="bytes per env value")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    if args.env_size != 200_000:
        CASES["env"] = lambda agent, key: env(agent, key, size=args.env_size)
    with tempfile.TemporaryDirectory(prefix="abuse", dir="/tmp") as d:
        keys = ClientKeys.create(Path(d) / "keys")
        for name in args.cases:
            with agentWithLimit(Path(d) / name, keys, args.nofile) as agent:
                CASES[name](agent, keys.key)


if __name__ == "__main__":
    main()
