"""Run the real agent (``twistd -n coder-agent``) and real OpenSSH clients.

Tests talk to the agent the way a user does: a separate process started by
twistd, reached over loopback with the system's ``ssh``/``sftp``/``scp``.  The
agent's log (its ``--log-human`` stream, stderr) is read by a thread so the
tests can wait for events such as "listening on" instead of sleeping.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"SSH server listening on (\S+):(\d+)")
CODERD_LISTENING = re.compile(r"coderd-dev listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0
TIMEOUT = 60.0


def twistdCommand() -> list[str]:
    """The twistd of the interpreter running the tests (the tox venv's)."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; run()"]


@dataclass
class ClientKeys:
    """An authorized client key, an unauthorized one, and the authorized_keys file."""

    directory: Path
    key: Path
    otherKey: Path
    authorizedKeys: Path

    @classmethod
    def create(cls, directory: Path) -> ClientKeys:
        directory.mkdir(parents=True, exist_ok=True)
        key, other = directory / "id_ed25519", directory / "other_ed25519"
        for path in (key, other):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                check=True,
            )
        authorized = directory / "authorized_keys"
        authorized.write_text(Path(f"{key}.pub").read_text())
        return cls(directory, key, other, authorized)


#: Every process of ours started here whose log has not been checked to its end.
_WATCHED: list[LoggedProcess] = []


@dataclass
class LoggedProcess:
    """A process of ours whose stderr (its log) is read by a thread.

    No process of ours may log a traceback: client input must never cause
    one, and a bug must not hide in a passing test.  Every such process is
    watched from its creation; :func:`newTracebacks` (called after every test
    by the fixture in ``tests/conftest.py``, and when :func:`runningAgent`
    stops an agent) returns what it logged since the last look.  A process
    that is meant to log one says why in ``tracebacksExpected``.
    """

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _cursor: int = 0
    #: Why this process may log tracebacks (empty: it may not).
    tracebacksExpected: str = ""
    #: How many of ``lines`` the traceback check has looked at.
    _checked: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        _WATCHED.append(self)

    def uncheckedTracebacks(self) -> str:
        """The log lines since the last check, if they hold a traceback (else empty)."""
        self.drain()
        start, self._checked = self._checked, len(self.lines)
        fresh = self.lines[start:]
        if self.tracebacksExpected or not any("Traceback" in line for line in fresh):
            return ""
        return "".join(fresh)

    def startReading(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def waitForLog(
        self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT, since: int = 0
    ) -> re.Match[str]:
        """Block until a log line matches ``pattern`` (searching lines seen so far too,
        from line ``since`` on)."""
        return self.waitForLine(pattern, timeout, since)[1]

    def waitForLine(
        self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT, since: int = 0
    ) -> tuple[int, re.Match[str]]:
        """:meth:`waitForLog`, also saying which line matched (its index in ``lines``):
        ``since=index + 1`` then waits for a line logged after it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for index in range(since, len(self.lines)):
            m = regex.search(self.lines[index])
            if m:
                return index, m
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"never logged {regex.pattern!r}; log:\n{self.log()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"exited ({self.process.wait()}) before logging {regex.pattern!r}; "
                    f"log:\n{self.log()}"
                )
            self.lines.append(line)
            m = regex.search(line)
            if m:
                return len(self.lines) - 1, m

    def mark(self) -> int:
        """How many lines have been read: ``since=mark()`` skips them (lines the process
        wrote before this call may still be on their way through the pipe)."""
        self.drain()
        return len(self.lines)

    def waitForCount(
        self, pattern: str | re.Pattern[str], n: int, timeout: float = TIMEOUT
    ) -> None:
        """Block until ``n`` log lines in all match ``pattern``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        # Counted as lines arrive: rescanning every line for each new one made a wait for
        # 10 000 lines take half a minute of the test's own CPU.
        seen = sum(1 for line in self.lines if regex.search(line))
        while seen < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{regex.pattern!r} not logged {n} times; log:\n{self.log()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"exited before logging {regex.pattern!r} {n} times")
            self.lines.append(line)
            if regex.search(line):
                seen += 1

    def drain(self) -> None:
        """Collect whatever the log thread has read, without waiting."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._queue.put(None)
                return
            self.lines.append(line)

    def log(self) -> str:
        self.drain()
        return "".join(self.lines)

    def describe(self) -> str:
        args = self.process.args
        name = args[args.index("-n") + 2] if isinstance(args, list) and "-n" in args else "?"
        return f"{name} (pid {self.process.pid})"

    def stop(self) -> int:
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.drain()
        return self.process.returncode


def newTracebacks() -> list[str]:
    """What watched processes logged with a traceback since the last call.

    A process that has been stopped (and so read to its end) is checked one
    last time and then no longer watched.
    """
    found = []
    for watched in list(_WATCHED):
        excerpt = watched.uncheckedTracebacks()
        if excerpt:
            found.append(f"{watched.describe()} logged a traceback:\n{excerpt}")
        if watched.stopped:
            _WATCHED.remove(watched)
    return found


@dataclass
class Agent(LoggedProcess):
    """A running agent process and what it has logged so far."""

    home: Path = Path()
    host: str = ""
    port: int = 0


@dataclass
class Coderd(LoggedProcess):
    """A running ``twistd coderd-dev``."""

    port: int = 0
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def spawnCoderd(workdir: Path, token: str, port: int = 0, extra: Sequence[str] = ()) -> Coderd:
    """Start coderd-dev on ``port`` (0: any) and wait until it listens."""
    env = agentEnvironment(workdir)
    proc = subprocess.Popen(
        [
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "coderd-dev",
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--token={token}",
            *extra,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
    )
    coderd = Coderd(proc, token=token)
    coderd.startReading()
    m = coderd.waitForLog(CODERD_LISTENING, timeout=START_TIMEOUT)
    coderd.port = int(m.group(1))
    return coderd


@contextmanager
def runningCoderd(
    workdir: Path, token: str = "test-token", port: int = 0, extra: Sequence[str] = ()
) -> Iterator[Coderd]:
    coderd = spawnCoderd(workdir, token, port, extra)
    try:
        yield coderd
    finally:
        coderd.stop()


def agentArgs(keys: ClientKeys, dataDir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        "--ssh-endpoint=tcp:0:interface=127.0.0.1",
        f"--ssh-authorized-keys={keys.authorizedKeys}",
        f"--script-data-dir={dataDir}",
        f"--log-dir={dataDir}",
        "--agent-url=http://127.0.0.1:9",
        "--agent-token=test-token",
        f"--boundary-log-proxy-socket-path={dataDir}/boundary-audit.sock",
        "--prometheus-address=127.0.0.1:0",
        *extra,
    ]


def agentEnvironment(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment: no CODER_AGENT_* leaking in from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODER_")}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    if "TOX_ENV_NAME" not in os.environ:
        # Outside tox, run the working tree; under tox, the installed wheel
        # (so the packaged twistd plugin is what every test exercises).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def spawnAgent(
    args: Sequence[str], env: Mapping[str, str], prefix: Sequence[str] = (), umask: int = -1
) -> subprocess.Popen[str]:
    """``prefix`` runs the agent under another command (``unshare …``); ``umask``
    (if not -1) is the agent's umask."""
    return subprocess.Popen(
        [*prefix, *twistdCommand(), "-n", "--pidfile=", "coder-agent", *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        umask=umask,
    )


@contextmanager
def runningAgent(
    keys: ClientKeys,
    workdir: Path,
    extraArgs: Sequence[str] = (),
    extraEnv: Mapping[str, str] | None = None,
    *,
    prefix: Sequence[str] = (),
    umask: int = -1,
    tracebacksExpected: str = "",
) -> Iterator[Agent]:
    """Start an agent on an ephemeral loopback port; stop it afterwards.

    ``prefix`` runs it under another command (``prlimit …``), ``umask`` (if
    not -1) with that umask.  When the block ends without an error, the
    agent's log must not hold a traceback, unless ``tracebacksExpected``
    says why it may.
    """
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    proc = spawnAgent(
        agentArgs(keys, data, extraArgs), agentEnvironment(home, extraEnv), prefix, umask
    )
    agent = Agent(proc, home=home, tracebacksExpected=tracebacksExpected)
    agent.startReading()
    try:
        m = agent.waitForLog(LISTENING, timeout=START_TIMEOUT)
        agent.host, agent.port = m.group(1), int(m.group(2))
        yield agent
    finally:
        agent.stop()
    excerpt = agent.uncheckedTracebacks()
    if excerpt:
        raise AssertionError(f"{agent.describe()} logged a traceback:\n{excerpt}")


def sshOptions(agent: Agent, key: Path) -> list[str]:
    return [
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=30",
        "-i",
        str(key),
        "-p",
        str(agent.port),
    ]


def ssh(
    agent: Agent,
    key: Path,
    *args: str,
    input: bytes | None = None,
    timeout: float = TIMEOUT,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the OpenSSH client against ``agent``; returns its exit status and output."""
    return subprocess.run(
        ["ssh", *sshOptions(agent, key), *options, f"coder@{agent.host}", *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
    )
