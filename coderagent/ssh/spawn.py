"""Starting a session's process: the user's shell, the session environment, a PTY.

The session channel (:mod:`coderagent.ssh.session`) decides *whether* and
*what* to run; this module knows *how*: ``$SHELL -l`` for a shell and
``$SHELL -c <command>`` for exec (never a string built from client input),
in the workspace's working directory (the manifest's ``directory``, else the
home directory), with the environment of
:func:`~coderagent.ssh.environment.sessionEnvironment`, and with a PTY set to
the client's size and terminal modes when one was asked for.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
from collections.abc import Mapping
from typing import Any

from twisted.conch import ttymodes
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol

from coderagent import launch
from coderagent.ssh.environment import sessionEnvironment
from coderagent.ssh.requests import PtyRequest

#: Upstream's placeholder in SSH_CLIENT when an address has no host or port.
_NO_ADDRESS = "0.0.0.0"  # noqa: S104 - a placeholder, not a bind address


def packWinSize(rows: int, cols: int, xpx: int, ypx: int) -> bytes:
    clamp = lambda v: max(0, min(v, 0xFFFF))  # noqa: E731 - a winsize field is a u16
    return struct.pack("4H", clamp(rows), clamp(cols), clamp(xpx), clamp(ypx))


def applyModes(fd: int, modes: list[tuple[int, int]]) -> None:
    """Apply the client's RFC 4254 terminal modes to the PTY slave."""
    attr = termios.tcgetattr(fd)
    for opcode, value in modes:
        spec: Any = ttymodes.TTYMODES.get(opcode)
        if spec is None:
            continue
        if isinstance(spec, tuple):
            index, bitName = spec  # (termios attribute index, flag name)
            bit = getattr(termios, bitName, None)
            if bit is None:
                continue
            attr[index] = attr[index] | bit if value else attr[index] & ~bit
        elif spec in ("ISPEED", "OSPEED"):
            speed = getattr(termios, f"B{value}", None)
            if speed is not None:
                attr[4 if spec == "ISPEED" else 5] = speed
        else:
            index = getattr(termios, spec, None)
            if index is not None and 0 <= value < 256:
                attr[6][index] = bytes((value,))
    termios.tcsetattr(fd, termios.TCSANOW, attr)


def resizeTerminal(process: Any, rows: int, cols: int, xpx: int, ypx: int) -> None:
    """Tell the PTY of ``process`` its new size (raises :class:`OSError`)."""
    fcntl.ioctl(process.fileno(), termios.TIOCSWINSZ, packWinSize(rows, cols, xpx, ypx))


def spawnSession(
    context: Any,
    protocol: ProcessProtocol,
    *,
    command: str | None,
    pty: PtyRequest | None,
    clientEnvironment: list[tuple[str, str]],
    peer: Any,
    local: Any,
    sessionVariables: Mapping[str, str] | None = None,
) -> IProcessTransport:
    """Start ``command`` (``None``: a login shell) for a session of ``context``;
    ``sessionVariables`` are set over everything else (``SSH_ORIGINAL_COMMAND``)."""
    ctx = context
    shell = ctx.user.shell
    argv = [shell, "-l"] if command is None else [shell, "-c", command]
    envArgs: dict[str, Any] = dict(
        workspace=ctx.workspace,
        clientEnvironment=clientEnvironment,
        peer=(getattr(peer, "host", _NO_ADDRESS), getattr(peer, "port", 0)),
        local=(getattr(local, "host", _NO_ADDRESS), getattr(local, "port", 0)),
        session=sessionVariables,
    )
    directory = ctx.workspace.workingDirectory()
    if pty is None:
        env = sessionEnvironment(**envArgs)
        process: IProcessTransport = launch.spawnProcess(
            ctx.reactor, protocol, shell, argv, env=env, path=directory
        )
        return process
    master, slave = os.openpty()
    try:
        ttyName = os.ttyname(slave)
        applyModes(slave, pty.modes)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, packWinSize(*pty.winSize))
        env = sessionEnvironment(**envArgs, term=pty.term, ttyName=ttyName)
        process = launch.spawnProcess(
            ctx.reactor,
            protocol,
            shell,
            argv,
            env=env,
            path=directory,
            usePTY=(master, slave, ttyName),
        )
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return process
