"""Starting a child (a session's process, a script) without copying the agent.

Twisted's ``spawnProcess`` forks the agent and execs in the copy, except
for a child without a PTY that runs in the agent's own working directory,
which it starts with ``posix_spawnp``.  A workspace agent's sessions run
elsewhere (``$HOME``, the workspace directory), so every session forked
the whole interpreter: page tables for tens of MiB, then a copy-on-write
fault for each page the agent touched before the child had exec'd.  On the
project machine that was about 11 ms of CPU per exec against under 1 ms for
the rest of starting a shell.

This module starts the child with the C library's ``posix_spawnp``, which
copies nothing (a ``vfork``-like clone that execs at once), and gives it
what Twisted's forked child set up itself:

* its working directory (``posix_spawn_file_actions_addchdir_np``: glibc
  2.29, musl 1.1.24, macOS 10.15);
* the pipes on 0, 1 and 2 and no other inherited descriptor (Twisted's own
  mapping, :func:`~coderagent.compat.spawnFileActions`);
* for a PTY, a new session whose controlling terminal is the PTY: the
  slave is opened by name in the child after ``setsid``, which on Linux and
  the BSDs makes it the controlling terminal, then copied to 1 and 2;
* default dispositions for the signals the agent ignores (Python ignores
  ``SIGPIPE``), and an empty signal mask.

Python's ``os.posix_spawn`` cannot change directory, so the C functions are
called through :mod:`ctypes`, loaded on first use.  A script is started the
same way, in a new session of its own (``newSession``) without a terminal,
so that everything it starts can be signalled as one process group.  Where the C library lacks
one of them, or the reactor is not Twisted's POSIX reactor (tests' fakes),
:func:`spawnProcess` leaves the child to ``reactor.spawnProcess`` as before.
A child that cannot be started (no such shell or directory) raises
:class:`OSError` here, in the agent, instead of failing after a fork.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from functools import partial
from typing import Any

from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol

from coderagent.compat import (
    StartedProcess,
    StartedPTYProcess,
    spawnFileActions,
    spawnInNewSession,
)

try:
    import _signal
except ImportError:  # not CPython: the same functions, slower
    import signal as _signal

# posix_spawn's flags, the same in glibc, musl and the BSDs.
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80

# Opaque C types, over-allocated: glibc's are 80 and 336 bytes, sigset_t 128.
_FILE_ACTIONS_SIZE = 512
_ATTR_SIZE = 1024
_SIGSET_SIZE = 256

_CLOSE = 0
_DUP2 = 1

_P = ctypes.c_void_p
_I = ctypes.c_int
_S = ctypes.c_char_p

#: Each C function used, with its argument types.
_FUNCTIONS: dict[str, list[Any]] = {
    "posix_spawnp": [_P, _S, _P, _P, _P, _P],
    "posix_spawn_file_actions_init": [_P],
    "posix_spawn_file_actions_destroy": [_P],
    "posix_spawn_file_actions_addclose": [_P, _I],
    "posix_spawn_file_actions_adddup2": [_P, _I, _I],
    "posix_spawn_file_actions_addopen": [_P, _I, _S, _I, ctypes.c_uint],
    "posix_spawn_file_actions_addchdir_np": [_P, _S],
    "posix_spawnattr_init": [_P],
    "posix_spawnattr_destroy": [_P],
    "posix_spawnattr_setflags": [_P, ctypes.c_short],
    "posix_spawnattr_setsigdefault": [_P, _P],
    "posix_spawnattr_setsigmask": [_P, _P],
    "sigemptyset": [_P],
    "sigaddset": [_P, _I],
}


class _Libc:
    """The C library's ``posix_spawn`` family, or ``None`` where something is missing."""

    _loaded: Any = None
    _tried = False

    @classmethod
    def get(cls) -> Any:
        if not cls._tried:
            cls._tried = True
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                for name, argtypes in _FUNCTIONS.items():
                    function = getattr(lib, name)
                    function.argtypes = argtypes
                    function.restype = ctypes.c_int
            except (OSError, AttributeError):
                return None
            cls._loaded = lib
        return cls._loaded


def available() -> bool:
    """Whether children can be started without forking on this system."""
    return _Libc.get() is not None


def _openDescriptors() -> list[tuple[int, bool]]:
    """Every open descriptor of the agent and whether it is close-on-exec."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = os.listdir("/dev/fd")
    state = []
    for name in names:
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:  # the directory listing's own descriptor, now closed
            continue
        state.append((fd, bool(flags & fcntl.FD_CLOEXEC)))
    return state


def _ignoredSignals() -> list[int]:
    """The signals the agent ignores (an ignored signal stays ignored across exec)."""
    # The C module's getsignal returns plain numbers; the signal module's
    # wraps each in an enum, which made this loop 30 times slower.
    return [sig for sig in _signal.valid_signals() if _signal.getsignal(sig) == _signal.SIG_IGN]


def _check(result: int, what: bytes) -> None:
    if result != 0:
        raise OSError(result, os.strerror(result), os.fsdecode(what))


def startChild(
    executable: bytes,
    args: list[bytes],
    environment: dict[bytes, bytes],
    path: bytes | None,
    fdmap: dict[int, int] | None,
    tty: bytes | None,
    *,
    newSession: bool = False,
) -> int:
    """``posix_spawnp`` ``executable``: in ``path``, on ``fdmap``'s pipes or on PTY ``tty``
    (always in a new session), on pipes in a new session of its own if ``newSession``.

    Returns the child's PID; raises :class:`OSError` when it cannot start.
    """
    lib = _Libc.get()
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _check(lib.posix_spawn_file_actions_init(actions), executable)
    try:
        _check(lib.posix_spawnattr_init(attr), executable)
        try:
            flags = _SETSIGDEF | _SETSIGMASK
            if newSession:
                flags |= _SETSID
            if tty is not None:
                # After setsid the child has no controlling terminal: the
                # first terminal it opens (without O_NOCTTY) becomes it.
                flags |= _SETSID
                lib.posix_spawn_file_actions_addopen(actions, 0, tty, os.O_RDWR, 0)
                lib.posix_spawn_file_actions_adddup2(actions, 0, 1)
                lib.posix_spawn_file_actions_adddup2(actions, 0, 2)
                for fd, closeOnExec in _openDescriptors():
                    if fd > 2 and not closeOnExec:
                        lib.posix_spawn_file_actions_addclose(actions, fd)
            else:
                for action in spawnFileActions(_openDescriptors(), fdmap or {}, _CLOSE, _DUP2):
                    if action[0] == _CLOSE:
                        lib.posix_spawn_file_actions_addclose(actions, action[1])
                    else:
                        lib.posix_spawn_file_actions_adddup2(actions, action[1], action[2])
            if path is not None:
                lib.posix_spawn_file_actions_addchdir_np(actions, path)
            lib.posix_spawnattr_setflags(attr, flags)
            empty = ctypes.create_string_buffer(_SIGSET_SIZE)
            lib.sigemptyset(empty)
            lib.posix_spawnattr_setsigmask(attr, empty)
            default = ctypes.create_string_buffer(_SIGSET_SIZE)
            lib.sigemptyset(default)
            for sig in _ignoredSignals():
                lib.sigaddset(default, sig)
            lib.posix_spawnattr_setsigdefault(attr, default)
            argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
            envItems = [k + b"=" + v for k, v in environment.items()]
            envp = (ctypes.c_char_p * (len(envItems) + 1))(*envItems, None)
            pid = ctypes.c_int(0)
            _check(
                lib.posix_spawnp(ctypes.byref(pid), executable, actions, attr, argv, envp),
                executable,
            )
            return pid.value
        finally:
            lib.posix_spawnattr_destroy(attr)
    finally:
        lib.posix_spawn_file_actions_destroy(actions)


def spawnProcess(
    reactor: Any,
    protocol: ProcessProtocol,
    executable: str,
    args: list[str],
    *,
    env: dict[str, str],
    path: str | None,
    usePTY: tuple[int, int, str] | None = None,
    newSession: bool = False,
) -> IProcessTransport:
    """``reactor.spawnProcess`` without forking the agent where it can.

    ``usePTY`` is ``(master, slave, slave's path)``; the caller keeps both
    descriptors until this returns, as with Twisted's.  ``newSession`` (pipes
    only) makes the child the leader of a new session and process group.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if not isinstance(reactor, PosixReactorBase) or not available():
        if newSession:
            leader: IProcessTransport = spawnInNewSession(
                reactor, protocol, executable, args, env, path
            )
            return leader
        fallback: IProcessTransport = reactor.spawnProcess(
            protocol, executable, args, env=env, path=path, usePTY=usePTY or False
        )
        return fallback
    encode = os.fsencode
    argv = [encode(a) for a in args]
    environment = {encode(k): encode(v) for k, v in env.items()}
    where = None if path is None else encode(path)
    process: IProcessTransport
    if usePTY is None:
        start = partial(startChild, newSession=True) if newSession else startChild
        process = StartedProcess(
            start, reactor, encode(executable), argv, environment, where, protocol
        )
    else:
        process = StartedPTYProcess(
            startChild, reactor, encode(executable), argv, environment, where, protocol, usePTY
        )
    return process
