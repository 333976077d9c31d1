"""``twistd coderd-dev``: options and wiring of the development coderd.

It is what the README's run command starts next to the agent and what the
tests talk to: a listener on ``--listen`` serving the agent API for one
workspace agent whose token is ``--token`` and whose manifest is
``--manifest`` (or built-in defaults).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.python import usage

from coderagent.devcoderd.api import DevAgentAPI, resourcesMonitoring
from coderagent.devcoderd.scriptlogs import LOG_LIMIT
from coderagent.devcoderd.server import DevCoderdFactory
from coderagent.devcoderd.statefile import StateFile
from coderagent.devcoderd.workspace import ManifestError, Workspace
from coderagent.listening import ListeningService
from coderagent.observe.logs import LoggingRoot, agentLogObserver
from coderagent.options.values import parseDuration

__all__ = ["Options", "makeService"]

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"


class Options(usage.Options):
    """Options of ``twistd coderd-dev``."""

    optFlags = [
        ["monitor-memory", None, "Resources monitoring: watch the workspace's memory."],
    ]

    longdesc = (
        "A development coderd: serves the Coder agent API (WebSocket, yamux, DRPC) in memory "
        "for one agent, and writes every boundary audit log to stderr as coderd does."
    )
    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Where to listen (a Twisted endpoint description)."],
        [
            "token",
            None,
            "",
            "The agent token to accept [$CODERD_DEV_TOKEN]; generated and printed if not given.",
        ],
        ["manifest", None, "", "JSON file with the workspace's manifest (defaults built in)."],
        [
            "log-limit",
            None,
            str(LOG_LIMIT),
            "Bytes of script log output to take from the agent before answering "
            "log_limit_exceeded, as coderd does (coderd's limit by default).",
            int,
        ],
        [
            "state-file",
            None,
            "",
            "Keep what the agent reported (lifecycle, logs, stats, ...) in this JSON file.",
        ],
        [
            "report-interval",
            None,
            "30s",
            "The stats report interval UpdateStats answers, a Go duration (coderd's "
            "--agent-stats-refresh-interval).",
        ],
        [
            "monitor-interval",
            None,
            10,
            "Resources monitoring: seconds between datapoints (coderd's default 10).",
            int,
        ],
        [
            "monitor-datapoints",
            None,
            20,
            "Resources monitoring: datapoints sent at once (coderd's default 20).",
            int,
        ],
    ]

    def opt_monitor_volume(self, path: str) -> None:
        """Resources monitoring: watch the volume holding PATH (may be repeated)."""
        self.volumes.append(path)

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.volumes: list[str] = []

    def postOptions(self) -> None:
        if not self["token"]:
            self["token"] = self.environ.get("CODERD_DEV_TOKEN", "")
        try:
            self["report-interval"] = parseDuration(self["report-interval"])
        except ValueError as e:
            raise usage.UsageError(f"--report-interval: {e}") from e
        if self["report-interval"] <= 0:
            raise usage.UsageError("--report-interval: must be positive")
        self.generatedToken = not self["token"]
        if self.generatedToken:
            self["token"] = secrets.token_urlsafe(24)
        path = self["manifest"]
        if path:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as e:
                raise SystemExit(f"coderd-dev: --manifest {path}: {e.strerror}") from e
            try:
                self.workspace = Workspace.fromJSON(text, f"--manifest {path}")
            except ManifestError as e:
                raise SystemExit(f"coderd-dev: {e}") from e
        else:
            self.workspace = Workspace()


class DevCoderdService(LoggingRoot):
    """coderd-dev's top service; ``api`` is its in-memory state (tests read it)."""

    def __init__(self, api: DevAgentAPI) -> None:
        super().__init__(lambda: agentLogObserver(sys.stderr))
        self.api = api


def makeService(options: Options, reactor: Any = None) -> DevCoderdService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    api = DevAgentAPI(
        getattr(options, "workspace", None) or Workspace(),
        logLimit=int(options["log-limit"]),
        reportInterval=options["report-interval"],
        monitoring=resourcesMonitoring(
            memory=bool(options["monitor-memory"]),
            volumes=getattr(options, "volumes", []),
            interval=options["monitor-interval"],
            datapoints=options["monitor-datapoints"],
        ),
    )
    if getattr(options, "generatedToken", False):
        # Printed, not logged: it is what the operator copies into the agent.
        print(f"coderd-dev: agent token: {options['token']}", file=sys.stderr, flush=True)
    top = DevCoderdService(api)
    ListeningService(
        reactor=reactor,
        description=options["listen"],
        factory=DevCoderdFactory(api, options["token"], reactor),
        what="coderd-dev",
        required=True,
    ).setServiceParent(top)
    if options["state-file"]:
        StateFile(api, options["state-file"], reactor).setServiceParent(top)
    return top
