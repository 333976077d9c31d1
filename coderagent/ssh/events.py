"""How the SSH server words its :class:`~coderagent.ssh.interfaces.IConnectionEvents`.

A session's end becomes a status code and a reason as upstream reports them
to coderd's connection log: the exit status and ``graceful`` or ``process
exited with error status: N``; for a process killed by a signal, 255 (what
upstream sends instead of Go's -1) and Go's text of the wait error
(``signal: killed``); for a session whose connection went before it ended,
1 (upstream's code for a session closed without an exit status).  Refusals
are named with what was refused and the target the client asked for, shown
printable and bounded, since both are the client's text.

:class:`NoConnectionEvents` is what a :class:`~coderagent.ssh.session.SessionContext`
has when nothing listens (tests, tools).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from zope.interface import implementer

from coderagent.gotext import goQuote
from coderagent.gotext import signalText as goSignalText
from coderagent.ssh.interfaces import IConnectionEvents

#: What a session reports when its process was killed by a signal (upstream maps Go's -1).
SIGNALLED_STATUS = 255
#: What a session reports when it ended without an exit status (its connection went).
NO_STATUS = 1
#: Longest client-supplied text (a target, a command) put in a reason.
MAX_SHOWN = 256

GRACEFUL = "graceful"
CONNECTION_LOST = "connection lost"
FILE_TRANSFER_BLOCKED = "file transfer blocked"

#: A session's end: an exit code, ``(signal name, core dumped)``, or ``None`` if unknown.
SessionStatus = int | tuple[str, bool] | None


def bounded(text: str) -> str:
    """``text`` cut to :data:`MAX_SHOWN` characters (an ellipsis says it was)."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def shown(text: str) -> str:
    """Client-supplied ``text`` for a reason: as is if printable, else Go-quoted; bounded."""
    text = bounded(text)
    return text if text.isprintable() else goQuote(text)


def signalText(name: str, coreDumped: bool = False) -> str:
    """Go's ``ExitError`` text for a process killed by signal ``name`` (``KILL``)."""
    number = getattr(signal, f"SIG{name}", None)
    if number is None:
        return f"signal: {name}"
    return goSignalText(number, coreDumped)


def sessionEnd(status: SessionStatus, reason: str | None = None) -> tuple[int, str]:
    """The status code and reason of a session that ended with ``status``.

    ``reason``, when given, says why instead of the exit status (a refusal,
    a command that could not start).
    """
    if status is None:
        return NO_STATUS, reason or CONNECTION_LOST
    if isinstance(status, tuple):
        return SIGNALLED_STATUS, reason or signalText(*status)
    if reason:
        return status, reason
    return status, GRACEFUL if status == 0 else f"process exited with error status: {status}"


def transferRefusal(subsystem: str | None, command: str | None) -> str:
    """The reason of a session refused by ``--block-file-transfer``: upstream's text, and what."""
    if subsystem is not None:
        return f"{FILE_TRANSFER_BLOCKED}: subsystem {shown(subsystem)}"
    return f"{FILE_TRANSFER_BLOCKED}: exec {goQuote(bounded(command or ''))}"


def subsystemRefusal(subsystem: str) -> str:
    """The reason of a subsystem the agent does not have: upstream's text."""
    return f"unsupported subsystem: {shown(subsystem)}"


#: The wire name of each kind of forward, by (direction, transport).
FORWARD_REQUESTS = {
    ("local", "tcp"): "direct-tcpip",
    ("local", "unix"): "direct-streamlocal@openssh.com",
    ("reverse", "tcp"): "tcpip-forward",
    ("reverse", "unix"): "streamlocal-forward@openssh.com",
}


def forwardRefusal(direction: str, transport: str, target: str, why: str | None = None) -> str:
    """The reason of a refused forward.

    For example ``reverse port forwarding blocked: tcpip-forward 0.0.0.0:8080``, and
    with ``why`` (what refused it, when not a block flag), ``local port forwarding
    blocked: direct-tcpip db:5432 (refused by policy rule 'no-db')``.
    """
    request = FORWARD_REQUESTS[direction, transport]
    text = f"{direction} port forwarding blocked: {request} {shown(target)}"
    return f"{text} ({why})" if why else text


@implementer(IConnectionEvents)
class NoConnectionEvents:
    """Events nobody listens to."""

    def sessionStarted(self, sessionType: str, peer: object) -> Callable[[int, str], None]:
        return _ignore

    def refused(self, peer: object, reason: str) -> None:
        pass


def _ignore(code: int, reason: str) -> None:
    pass
