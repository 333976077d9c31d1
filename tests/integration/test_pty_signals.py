"""PTY sessions (``ssh -tt`` from a real terminal) and signals (asyncssh)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

import asyncssh
import pytest

from tests.agentproc import Agent, ClientKeys, sshOptions

TIMEOUT = 30.0


class Terminal:
    """Runs ``ssh -tt`` on a pseudo-terminal we own, so we can resize it."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        env = dict(os.environ, TERM="xterm-256color")
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.output = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))

    def expect(self, pattern: bytes) -> re.Match[bytes]:
        """Read until ``pattern`` appears in the output, with a deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = regex.search(self.output)
            if m:
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"never saw {pattern!r}; got {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {pattern!r}; got {self.output!r}")
                self.output += chunk

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            os.close(self.master)


def test_tty_session_gets_a_terminal_and_resizes(agent: Agent, clientKeys: ClientKeys) -> None:
    script = "tty; echo TERM=$TERM; echo SSH_TTY=$SSH_TTY; stty size; read x; stty size; exit 5"
    term = Terminal(
        ["ssh", *sshOptions(agent, clientKeys.key), "-tt", f"coder@{agent.host}", script],
        rows=24,
        cols=80,
    )
    try:
        m = term.expect(rb"(/dev/pts/\d+)\r\nTERM=(\S+)\r\nSSH_TTY=(\S+)\r\n")
        assert m.group(2) == b"xterm-256color"
        assert m.group(3) == m.group(1)
        term.expect(rb"24 80\r\n")
        term.resize(40, 132)
        term.proc.send_signal(signal.SIGWINCH)
        term.send(b"go\r")
        term.expect(rb"40 132\r\n")
    finally:
        status = term.close()
    assert status == 5


def test_tty_modes_are_applied(agent: Agent, clientKeys: ClientKeys) -> None:
    # The client's terminal sends its modes; ^C (VINTR) must be what it set.
    term = Terminal(
        ["ssh", *sshOptions(agent, clientKeys.key), "-tt", f"coder@{agent.host}", "stty -a"],
        rows=30,
        cols=100,
    )
    try:
        term.expect(rb"intr = \^C")
        term.expect(rb"rows 30; columns 100")
    finally:
        assert term.close() == 0


async def _run(
    agent: Agent, clientKeys: ClientKeys, script: str, signame: str
) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        agent.host,
        agent.port,
        username="coder",
        client_keys=[str(clientKeys.key)],
        known_hosts=None,
        agent_path=None,
    ) as conn:
        async with conn.create_process(script) as process:
            line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
            assert line == "ready\n"
            process.send_signal(signame)
            return await asyncio.wait_for(process.wait(), TIMEOUT)


@pytest.mark.parametrize("signame", ["USR1", "HUP", "INT", "TERM", "QUIT", "USR2", "ALRM"])
def test_named_signal_reaches_the_process(
    agent: Agent, clientKeys: ClientKeys, signame: str
) -> None:
    script = (
        f"trap 'echo got-{signame}; exit 9' {signame}; echo ready; while :; do sleep 0.05; done"
    )
    result = asyncio.run(_run(agent, clientKeys, script, signame))
    assert result.stdout == f"got-{signame}\n"
    assert result.exit_status == 9


def test_kill_signal_gives_exit_signal(agent: Agent, clientKeys: ClientKeys) -> None:
    result = asyncio.run(_run(agent, clientKeys, "echo ready; exec sleep 60", "KILL"))
    assert result.exit_signal is not None
    assert result.exit_signal[0] == "KILL"
    assert result.exit_status == -1


def test_unknown_signal_name_kills(agent: Agent, clientKeys: ClientKeys) -> None:
    result = asyncio.run(_run(agent, clientKeys, "echo ready; exec sleep 60", "NOSUCHSIG"))
    assert result.exit_signal is not None and result.exit_signal[0] == "KILL"
