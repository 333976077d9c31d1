"""The agent's log sinks: human, JSON, Stackdriver, the rotated log file, the recent lines.

Upstream writes any combination of three formats at once (``--log-human``,
``--log-json``, ``--log-stackdriver``, each a path) plus its own file in
``--log-dir``; so do we, from one Twisted log stream:

* human: ``2026-01-02 15:04:05.123 [info]  coderagent.ssh: message``, then the
  traceback of a logged failure (cdr.dev/slog's layout);
* JSON lines: ``{"ts", "level", "logger", "msg", "fields"}``;
* Stackdriver lines: ``severity``, ``message``, ``timestamp`` and the
  ``logging.googleapis.com/…`` fields Cloud Logging reads, the event's fields
  beside them;
* ``coder-agent.log`` in ``--log-dir``, human, rotated at 5 MB keeping 10;
* the last lines in memory, for the debug server.

Conch logs every channel open/close and, for SFTP, every packet at info; that
is noise to an operator and costs time on the hot path, so ``twisted.conch``
below warnings reaches no sink.  A sink that fails (a full disk, a closed
pipe) is skipped; logging never takes the agent down.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.application.service import MultiService, Service
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from coderagent.compat import CLIENT_SERVICE_LOG_NAMESPACE, PrivateLogFile
from coderagent.files import PRIVATE_FILE_MODE, makePrivateDirs

log = Logger()

_LEVELS = {
    LogLevel.debug: "debu",
    LogLevel.info: "info",
    LogLevel.warn: "warn",
    LogLevel.error: "erro",
    LogLevel.critical: "crit",
}
_JSON_LEVELS = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}
_SEVERITIES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARNING",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

#: The agent's own log file in ``--log-dir``, as upstream names it.
LOG_FILE_NAME = "coder-agent.log"
ROTATE_BYTES = 5 * 1000 * 1000
ROTATED_FILES = 10
#: Lines kept for the debug server.
RECENT_LINES = 500

#: Event keys that are the logging system's, not the event's fields.
_INTERNAL = frozenset({"format", "message", "isError", "why", "failure", "system", "time"})


def humanLine(when: float, level: LogLevel, namespace: str, text: str) -> str:
    """One line in upstream's human layout (cdr.dev/slog's sloghuman), newline included."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    millis = int((when % 1) * 1000)
    return f"{stamp}.{millis:03d} [{_LEVELS.get(level, 'info')}]  {namespace}: {text}\n"


def rfc3339(when: float) -> str:
    """UTC, microseconds, ``Z``: what both JSON formats carry as the time."""
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def eventFields(event: dict[str, Any]) -> dict[str, Any]:
    """The event's own keys, as JSON-ready values (repr for anything else)."""
    fields: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL:
            continue
        if value is None or isinstance(value, bool | int | float | str):
            fields[key] = value
        elif isinstance(value, bytes):
            fields[key] = value.decode("utf-8", "replace")
        else:
            fields[key] = str(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        fields["error"] = failure.getErrorMessage()
        fields["traceback"] = failure.getTraceback()
    return fields


def openSink(path: str) -> IO[str]:
    """Open a log destination; ``/dev/stdout`` and ``/dev/stderr`` use the process streams.

    A new file is created mode 0600: logs name peers, paths and commands.
    """
    if path == "/dev/stderr":
        return sys.stderr
    if path == "/dev/stdout":
        return sys.stdout
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    return open(fd, "a", encoding="utf-8", buffering=1)


def _safely(write: Callable[[str], Any], flush: Callable[[], Any], text: str) -> None:
    try:
        write(text)
        flush()
    except (OSError, ValueError):
        pass  # a closed or full log sink must never take the agent down


@implementer(ILogObserver)
class HumanLogObserver:
    """Writes one line per event, plus the traceback of a logged failure."""

    def __init__(self, out: IO[str] | LogFile) -> None:
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
        _safely(self.out.write, self.out.flush, line)


@implementer(ILogObserver)
class JSONLogObserver:
    """JSON lines: ``{"ts", "level", "logger", "msg", "fields"}``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        record = {
            "ts": rfc3339(event.get("log_time", time.time())),
            "level": _JSON_LEVELS.get(event.get("log_level", LogLevel.info), "INFO"),
            "logger": event.get("log_namespace", "?"),
            "msg": formatEvent(event) or "",
            "fields": eventFields(event),
        }
        _safely(self.out.write, self.out.flush, json.dumps(record) + "\n")


@implementer(ILogObserver)
class StackdriverLogObserver:
    """Google Cloud Logging's structured lines (what slog's stackdriver sink writes)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace", "?")
        record: dict[str, Any] = {
            **{k: v for k, v in eventFields(event).items() if k not in ("severity", "message")},
            "severity": _SEVERITIES.get(event.get("log_level", LogLevel.info), "DEFAULT"),
            "message": formatEvent(event) or "",
            "timestamp": rfc3339(event.get("log_time", time.time())),
            "logging.googleapis.com/operation": {"producer": namespace},
            "logging.googleapis.com/sourceLocation": {"function": namespace},
        }
        _safely(self.out.write, self.out.flush, json.dumps(record) + "\n")


@implementer(ILogObserver)
class RecentLines:
    """The last lines, human-formatted, for the debug server."""

    def __init__(self, size: int = RECENT_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=size)

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(
            humanLine(
                event.get("log_time", time.time()),
                event.get("log_level", LogLevel.info),
                event.get("log_namespace", "?"),
                formatEvent(event) or "",
            )
        )


@implementer(ILogObserver)
class _Fanout:
    def __init__(self, observers: Iterable[ILogObserver]) -> None:
        self.observers = list(observers)

    def __call__(self, event: dict[str, Any]) -> None:
        for observer in self.observers:
            observer(event)


def _fromConch(source: object) -> bool:
    return any(c.__module__.startswith("twisted.conch") for c in type(source).__mro__)


@implementer(ILogFilterPredicate)
class QuietConch:
    """Drops Conch's below-warning events.

    Conch's classes log through class-level ``Logger`` attributes, whose
    namespace is the *subclass's* (``coderagent.ssh.connection.AgentConnection``),
    so a namespace filter misses them; the event's source object does not lie.
    """

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        source = event.get("log_source")
        level = event.get("log_level", LogLevel.info)
        if source is not None and level < LogLevel.warn and _fromConch(source):
            return cast(PredicateResult, PredicateResult.no)
        return cast(PredicateResult, PredicateResult.maybe)


def rotatingLogFile(directory: str) -> LogFile:
    """``coder-agent.log`` in ``directory``, rotated at 5 MB, 10 kept, mode 0600."""
    makePrivateDirs(directory)
    return PrivateLogFile(
        LOG_FILE_NAME,
        directory,
        rotateLength=ROTATE_BYTES,
        maxRotatedFiles=ROTATED_FILES,
        defaultMode=PRIVATE_FILE_MODE,
    )


def agentLogObserver(
    human: IO[str] | None = None,
    *,
    jsonOut: IO[str] | None = None,
    stackdriver: IO[str] | None = None,
    logFile: LogFile | None = None,
    recent: RecentLines | None = None,
) -> ILogObserver:
    """The agent's observer: every sink asked for, Conch's chatter filtered out."""
    sinks: list[ILogObserver] = []
    if human is not None:
        sinks.append(HumanLogObserver(human))
    if jsonOut is not None:
        sinks.append(JSONLogObserver(jsonOut))
    if stackdriver is not None:
        sinks.append(StackdriverLogObserver(stackdriver))
    if logFile is not None:
        sinks.append(HumanLogObserver(logFile))
    if recent is not None:
        sinks.append(recent)
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    levels.setLogLevelForNamespace("twisted.conch", LogLevel.warn)
    # ClientService's own "Scheduling retry" line; the coderd client says it better.
    levels.setLogLevelForNamespace(CLIENT_SERVICE_LOG_NAMESPACE, LogLevel.warn)
    return FilteringLogObserver(_Fanout(sinks), [QuietConch(), levels])


@dataclass(frozen=True)
class LogDestinations:
    """Where the agent logs, from its options (empty: that sink is off)."""

    human: str = ""
    json: str = ""
    stackdriver: str = ""
    #: The directory of the rotated ``coder-agent.log``.
    directory: str = ""

    def open(self, recent: RecentLines | None = None) -> ILogObserver:
        """Open every sink; one that cannot be opened stops start-up with one line."""
        sinks: dict[str, Any] = {}
        for option, path, name in (
            ("log-human", self.human, "human"),
            ("log-json", self.json, "jsonOut"),
            ("log-stackdriver", self.stackdriver, "stackdriver"),
        ):
            if not path:
                continue
            try:
                sinks[name] = openSink(path)
            except OSError as e:
                why = f"--{option}: cannot open {path}: {e.strerror}"
                raise SystemExit(f"coder-agent: {why}") from e
        logFile = None
        if self.directory:
            try:
                logFile = rotatingLogFile(self.directory)
            except OSError as e:
                raise SystemExit(
                    f"coder-agent: --log-dir: cannot write {self.directory}: {e.strerror}"
                ) from e
        return agentLogObserver(**sinks, logFile=logFile, recent=recent)


class LoggingRoot(MultiService):
    """A twistd application's top service that also says where the process logs.

    twistd asks the application for an ``ILogObserver`` before it starts
    logging, so registering one here makes ``--log-human`` (or coderd-dev's
    stderr) the destination however twistd was started.  The observer is made
    (its files opened) only then, when twistd adopts this service, never
    when the service is built.
    """

    def __init__(self, observer: Callable[[], ILogObserver] | None) -> None:
        super().__init__()
        self.makeObserver = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        setComponent = getattr(parent, "setComponent", None)
        if self.makeObserver is not None and setComponent is not None:
            setComponent(ILogObserver, self.makeObserver())


class StartupReport(Service):
    """Says once, at start-up, which of the given options this agent ignores."""

    def __init__(self, ignored: Iterable[str]) -> None:
        self.ignored = list(ignored)

    def startService(self) -> None:
        super().startService()
        if self.ignored:
            log.info(
                "options accepted for compatibility but ignored by coderagent: {names}",
                names=", ".join(f"--{name}" for name in self.ignored),
            )
