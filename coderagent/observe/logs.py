"""Human-readable log sink, in the layout of upstream's ``--log-human``.

Lines look like ``2026-01-02 15:04:05.123 [info]  coderagent.ssh: message``.
Conch logs every channel open/close and, for SFTP, every packet at info; that
is noise to an operator and costs time on the hot path, so ``twisted.conch``
is filtered to warnings.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, cast

from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer

_LEVELS = {
    LogLevel.debug: "debu",
    LogLevel.info: "info",
    LogLevel.warn: "warn",
    LogLevel.error: "erro",
    LogLevel.critical: "crit",
}


def humanLine(when: float, level: LogLevel, namespace: str, text: str) -> str:
    """One line in upstream's human layout (cdr.dev/slog's sloghuman), newline included."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    millis = int((when % 1) * 1000)
    return f"{stamp}.{millis:03d} [{_LEVELS.get(level, 'info')}]  {namespace}: {text}\n"


def openSink(path: str) -> IO[str]:
    """Open a log destination; ``/dev/stdout`` and ``/dev/stderr`` use the process streams."""
    if path == "/dev/stderr":
        return sys.stderr
    if path == "/dev/stdout":
        return sys.stdout
    return open(path, "a", encoding="utf-8", buffering=1)


@implementer(ILogObserver)
class HumanLogObserver:
    """Writes one line per event, plus the traceback of a logged failure."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        line = humanLine(
            event.get("log_time", time.time()),
            event.get("log_level", LogLevel.info),
            event.get("log_namespace", "?"),
            formatEvent(event) or "",
        )
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            line += failure.getTraceback()
        try:
            self.out.write(line)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed or full log sink must never take the agent down


def _fromConch(source: object) -> bool:
    return any(c.__module__.startswith("twisted.conch") for c in type(source).__mro__)


@implementer(ILogFilterPredicate)
class QuietConch:
    """Drops Conch's below-warning events.

    Conch's classes log through class-level ``Logger`` attributes, whose
    namespace is the *subclass's* (``coderagent.ssh.factory.AgentConnection``),
    so a namespace filter misses them; the event's source object does not lie.
    """

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        source = event.get("log_source")
        level = event.get("log_level", LogLevel.info)
        if source is not None and level < LogLevel.warn and _fromConch(source):
            return cast(PredicateResult, PredicateResult.no)
        return cast(PredicateResult, PredicateResult.maybe)


def agentLogObserver(out: IO[str]) -> ILogObserver:
    """The agent's observer: human lines, Conch's per-channel chatter filtered out."""
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    levels.setLogLevelForNamespace("twisted.conch", LogLevel.warn)
    # ClientService's own "Scheduling retry" line; the coderd client says it better.
    levels.setLogLevelForNamespace("twisted.application._client_service", LogLevel.warn)
    return FilteringLogObserver(HumanLogObserver(out), [QuietConch(), levels])


class LoggingRoot(MultiService):
    """A twistd application's top service that also says where the process logs.

    twistd asks the application for an ``ILogObserver`` before it starts
    logging, so registering one here makes ``--log-human`` (or coderd-dev's
    stderr) the destination however twistd was started.
    """

    def __init__(self, observer: ILogObserver | None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        setComponent = getattr(parent, "setComponent", None)
        if self.observer is not None and setComponent is not None:
            setComponent(ILogObserver, self.observer)
