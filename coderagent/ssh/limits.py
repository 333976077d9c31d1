"""What one SSH connection may hold, decided in one place.

sshd forks a process per connection: one connection's channels, listeners
and memory count against that process alone.  The agent serves every
connection in one process, so without bounds one authenticated client could
take the descriptors (and memory) every other user, the coderd connection
and the boundary socket need.  Each authenticated connection therefore has a
:class:`ConnectionLimits`, and the code that opens channels and sessions,
binds reverse listeners and stores ``env`` requests asks it before doing so;
that code holds no numbers and no policy of its own.

A refusal is explicit to the client (the channel open fails with "resource
shortage", the global or channel request fails), is counted in
``agent_ssh_limit_refused_total{limit}``, and is logged at WARN **once per
connection and limit**: a client hammering at its cap cannot flood the log.

=====================  ==========================  ===========================
limit                  default                     option
=====================  ==========================  ===========================
``sessions``           10 open session channels    ``--ssh-max-sessions``
``channels``           1024 open channels          ``--ssh-max-channels``
``reverse_forwards``   256 listeners (TCP + Unix)  ``--ssh-max-reverse-forwards``
``env_bytes``          256 KiB of ``env`` values   ``--ssh-max-env-bytes``
                       (1024 variables, each
                       at most 128 KiB)
``descriptors``        the process's reserve       (:mod:`coderagent.descriptors`)
=====================  ==========================  ===========================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from coderagent.descriptors import DescriptorReserve

if TYPE_CHECKING:
    from coderagent.observe.metrics import AgentMetrics

log = Logger()

#: sshd's ``MaxSessions``.
MAX_SESSIONS = 10
#: sshd allows 16384 channels per connection, but each forwarded channel
#: holds a socket, and an sshd connection's process usually runs with a soft
#: RLIMIT_NOFILE of 1024: in practice an sshd connection holds at most about
#: a thousand.  So do we: far more than VS Code, JetBrains or a browser behind
#: ``ssh -D`` open at once, and a bound one process can afford per connection.
MAX_CHANNELS = 1024
#: Reverse listeners (``tcpip-forward`` and ``streamlocal-forward``) per
#: connection: each is a descriptor for as long as the connection lasts, and
#: real clients ask for a handful (one per ``-R``).
MAX_REVERSE_FORWARDS = 256
#: Total bytes of the ``env`` values (and names) one session accepts.  A
#: session's environment must fit execve's limit (2 MiB with the usual 8 MiB
#: stack, 128 KiB per variable), and what clients send (``LANG``, ``LC_*``,
#: a few ``CODER_*``) is a few hundred bytes; the count alone (1024) let
#: 1024 values of 200 KB cost the agent 200 MiB.
MAX_ENV_BYTES = 256 * 1024

#: ``env`` requests one session keeps (the count was bounded before the size was).
MAX_ENV_VARIABLES = 1024
#: The longest ``NAME=value`` execve takes (Linux's MAX_ARG_STRLEN, 32 pages, with
#: its NUL): a session with a longer variable could not start at all.
MAX_ENV_VARIABLE = 32 * 4096 - 1

#: The reason a refusal gives the client (OpenSSH prints a channel open's after
#: "open failed: resource shortage:").
_REFUSALS = {
    "sessions": "too many sessions on this connection",
    "channels": "too many channels on this connection",
    "reverse_forwards": "too many reverse forwards on this connection",
    "env_bytes": "too much environment for this session",
    "descriptors": "the agent is short of file descriptors",
}

#: The option that sets each limit, for the log line.
_OPTIONS = {
    "sessions": "--ssh-max-sessions",
    "channels": "--ssh-max-channels",
    "reverse_forwards": "--ssh-max-reverse-forwards",
    "env_bytes": "--ssh-max-env-bytes",
}

@dataclass(frozen=True)
class SSHLimits:
    """The per-connection caps, resolved from the options by ``tap``."""

    maxSessions: int = MAX_SESSIONS
    maxChannels: int = MAX_CHANNELS
    maxReverseForwards: int = MAX_REVERSE_FORWARDS
    maxEnvBytes: int = MAX_ENV_BYTES


class ConnectionLimits:
    """One connection's caps: every "may it have one more?" is answered here.

    ``peer`` names the client in the log line; ``descriptors`` is the
    process-wide reserve that forwarding may not eat into (``None``: none).
    Each check returns ``None`` when the thing is allowed, or else the reason
    to give the client, the refusal having been logged (once) and counted.
    """

    def __init__(
        self,
        limits: SSHLimits | None = None,
        *,
        peer: Callable[[], str] = lambda: "?",
        metrics: AgentMetrics | None = None,
        descriptors: DescriptorReserve | None = None,
    ) -> None:
        self.limits = limits or SSHLimits()
        self.peer = peer
        self.metrics = metrics
        self.descriptors = descriptors
        #: The limits this connection has been told about in the log already.
        self._logged: set[tuple[str, str]] = set()

    def session(self, *, channels: int, sessions: int) -> str | None:
        """Another session channel, with ``channels`` open, ``sessions`` of them sessions.

        A session is not held to the descriptor reserve: the reserve is there
        for it.
        """
        if channels >= self.limits.maxChannels:
            return self._refuse("channels", self.limits.maxChannels, "open channels")
        if sessions >= self.limits.maxSessions:
            return self._refuse("sessions", self.limits.maxSessions, "open sessions")
        return None

    def forwardChannel(self, *, channels: int) -> str | None:
        """Another forwarding channel (``direct-*`` or ``forwarded-*``), ``channels`` open."""
        if channels >= self.limits.maxChannels:
            return self._refuse("channels", self.limits.maxChannels, "open channels")
        return self._reserve()

    def reverseForward(self, *, listeners: int) -> str | None:
        """Another reverse listener (TCP or Unix), with ``listeners`` bound."""
        if listeners >= self.limits.maxReverseForwards:
            return self._refuse(
                "reverse_forwards", self.limits.maxReverseForwards, "reverse forwards"
            )
        return self._reserve()

    def env(self, *, variables: int, used: int, adding: int) -> str | None:
        """One more ``env`` of ``adding`` bytes (name and value), in a session that
        keeps ``variables`` taking ``used`` bytes so far."""
        if variables >= MAX_ENV_VARIABLES:
            return self._refuse(
                "env_bytes", MAX_ENV_VARIABLES, "env variables in a session", "fixed"
            )
        if adding + 1 > MAX_ENV_VARIABLE:  # with the "="
            return self._refuse(
                "env_bytes", MAX_ENV_VARIABLE, "bytes in one env variable", "execve's"
            )
        if used + adding > self.limits.maxEnvBytes:
            return self._refuse("env_bytes", self.limits.maxEnvBytes, "bytes of env in a session")
        return None

    def _refuse(self, limit: str, cap: int, what: str, option: str = "") -> str:
        if (limit, what) not in self._logged:
            self._logged.add((limit, what))
            log.warn(
                "{peer} reached its limit of {cap} {what} ({option}); refusing more "
                "(logged once per connection)",
                peer=self.peer(),
                cap=cap,
                what=what,
                option=option or _OPTIONS[limit],
                limit=limit,
            )
        self._count(limit)
        return _REFUSALS[limit]

    def _reserve(self) -> str | None:
        if self.descriptors is None or self.descriptors.allows():
            return None
        if ("descriptors", "") not in self._logged:
            self._logged.add(("descriptors", ""))
            log.warn(
                "{peer}: only {free} file descriptors are left and {reserve} are kept for "
                "logins, sessions and coderd; refusing new forwards and forwarded connections "
                "(logged once per connection)",
                peer=self.peer(),
                free=self.descriptors.free(),
                reserve=self.descriptors.reserve,
                limit="descriptors",
            )
        self._count("descriptors")
        return _REFUSALS["descriptors"]

    def _count(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.limitRefused(limit)
