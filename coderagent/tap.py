"""``twistd coder-agent``: parse the options and wire the services together.

Wiring only.  Each concept is built by its own package (``ssh``, ``policy``,
``coderd``, ``observe``) and added to one ``MultiService``: the SSH server
first (it serves whether or not coderd is reachable), then the coderd client
with the services that talk through it as its children.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger

from coderagent.boundary.service import BoundaryService
from coderagent.boundary.spool import Spool
from coderagent.coderd.client import CoderdClient
from coderagent.coderd.credentials import CredentialsError, resolveCredentials
from coderagent.coderd.lifecycle import Reporter, sessionVariables
from coderagent.control.server import SOCKET_MODE as CONTROL_SOCKET_MODE
from coderagent.control.server import ControlFactory
from coderagent.listening import ListeningService
from coderagent.observe.connections import describeConnections
from coderagent.observe.debug import debugSite, isLoopback, profilingSite
from coderagent.observe.http import metricsSite, strportsFor
from coderagent.observe.logs import (
    LoggingRoot,
    RecentLines,
    agentLogObserver,
    openSink,
    rotatingLogFile,
)
from coderagent.observe.metrics import AgentMetrics
from coderagent.observe.status import AgentStatus
from coderagent.options import Options
from coderagent.policy import Policy
from coderagent.reaper import Reaper
from coderagent.signals import GracefulSignals
from coderagent.ssh.auth import makePortal
from coderagent.ssh.avatar import AgentRealm
from coderagent.ssh.environment import UserInfo
from coderagent.ssh.factory import AgentSSHFactory, SSHConfig
from coderagent.ssh.hostkeys import HostKeyError, loadHostKeys
from coderagent.ssh.session import SessionContext
from coderagent.ssh.sftp import AgentSFTPServer
from coderagent.unixsocket import removeStaleSocket

__all__ = ["Options", "makeService"]

log = Logger()


class StartupReport(Service):
    """Says once, at start-up, which of the given options this agent ignores."""

    def __init__(self, ignored: list[str]) -> None:
        self.ignored = ignored

    def startService(self) -> None:
        super().startService()
        if self.ignored:
            log.info(
                "options accepted for compatibility but ignored by coderagent: {names}",
                names=", ".join(f"--{name}" for name in self.ignored),
            )


def _fail(message: str) -> SystemExit:
    return SystemExit(f"coder-agent: {message}")


def makeService(
    options: Mapping[str, Any],
    reactor: Any = None,
    environ: Mapping[str, str] | None = None,
) -> MultiService:
    """Build the agent from parsed :class:`Options`."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    environ = dict(os.environ if environ is None else environ)

    try:
        credentials = resolveCredentials(
            auth=options["auth"],
            url=options["agent-url"],
            token=options["agent-token"],
            tokenFile=options["agent-token-file"],
        )
        hostKeys = loadHostKeys(options["ssh-host-key-dir"])
    except (CredentialsError, HostKeyError) as e:
        raise _fail(str(e)) from e

    policy = Policy(
        blockFileTransfer=options["block-file-transfer"],
        blockLocalPortForwarding=options["block-local-port-forwarding"],
        blockReversePortForwarding=options["block-reverse-port-forwarding"],
    )
    metrics = AgentMetrics()
    context = SessionContext(
        policy=policy,
        reactor=reactor,
        user=UserInfo.current(environ),
        agentEnvironment=environ,
        sftpServer=AgentSFTPServer,
        metrics=metrics,
    )
    factory = AgentSSHFactory(
        config=SSHConfig(
            loginGraceTime=options["ssh-login-grace-time"],
            maxAuthTries=options["ssh-max-auth-tries"],
            maxTimeout=options["ssh-max-timeout"],
        ),
        portal=makePortal(AgentRealm(context), options["ssh-authorized-keys"]),
        hostKeys=hostKeys,
        reactor=reactor,
        metrics=metrics,
    )

    recent = RecentLines()
    top = LoggingRoot(_logObserver(options, recent))
    status = AgentStatus(clock=reactor.seconds)
    StartupReport(_ignored(options)).setServiceParent(top)
    GracefulSignals(reactor).setServiceParent(top)
    ListeningService(
        reactor=reactor,
        description=options["ssh-endpoint"],
        factory=factory,
        what="SSH server",
        required=True,
        drain=factory.shutdown,
    ).setServiceParent(top)
    status.add("ssh", lambda: {"connections": len(factory.connections)})
    Reaper(enabled=not options["no-reap"], clock=reactor).setServiceParent(top)

    coderd = CoderdClient(
        url=credentials.url,
        token=credentials.token,
        headers=options["agent-header"],
        headerCommand=options["agent-header-command"],
        reactor=reactor,
        environ=environ,
    )
    reporter = Reporter(coderd, environ, reactor)
    reporter.onManifest(lambda manifest: context.overrides.update(sessionVariables(manifest)))
    reporter.setServiceParent(coderd)
    _boundary(options, reactor, metrics, context, status, coderd).setServiceParent(coderd)
    coderd.setServiceParent(top)
    status.add(
        "coderd",
        lambda: {
            "url": coderd.target.url,
            "connected": coderd.connected,
            "lifecycle": reporter.reportedState,
        },
    )

    servers = (
        ("prometheus-address", "Prometheus metrics", lambda: metricsSite(metrics)),
        (
            "debug-address",
            "debug server",
            lambda: debugSite(
                status=status,
                manifest=lambda: reporter.manifest,
                connections=lambda: describeConnections(factory.connections, reactor),
                recent=recent,
            ),
        ),
        ("pprof-address", "profiling server", lambda: profilingSite(reactor)),
    )
    for option, what, site in servers:
        address = options[option]
        if not address:
            continue
        if option == "pprof-address" and not isLoopback(address):
            log.error("not serving profiling data on {address}: loopback only", address=address)
            continue
        ListeningService(
            reactor=reactor,
            description=strportsFor(address),
            factory=site(),
            what=what,
            required=False,
        ).setServiceParent(top)
    if options["socket-server-enabled"]:
        _controlSocket(options["socket-path"], reactor, status).setServiceParent(top)
    return top


def _boundary(
    options: Mapping[str, Any],
    reactor: Any,
    metrics: AgentMetrics,
    context: SessionContext,
    status: AgentStatus,
    coderd: CoderdClient,
) -> BoundaryService:
    """The spool, the socket that fills it and the forwarder that empties it."""
    spool = Spool(
        options["boundary-log-spool-dir"],
        reactor=reactor,
        maxBytes=options["boundary-log-spool-max-bytes"],
        commitInterval=options["boundary-log-commit-interval"],
        onDrop=metrics.boundaryDropped,
    )
    socketPath = options["boundary-log-proxy-socket-path"]
    boundary = BoundaryService(
        spool=spool,
        client=coderd,
        metrics=metrics,
        reactor=reactor,
        socketPath=socketPath,
        announce=lambda path: context.overrides.update(CODER_BOUNDARY_LOG_SOCKET=path),
    )
    status.add(
        "boundary",
        lambda: {
            "socket": socketPath or None,
            "serving": boundary.serving,
            "spooled_batches": spool.pendingRecords,
            "spooled_logs": spool.pendingLogs,
            "spooled_bytes": spool.pendingBytes,
        },
    )
    return boundary


def _controlSocket(path: str, reactor: Any, status: AgentStatus) -> ListeningService:
    return ListeningService(
        reactor=reactor,
        description=path,
        factory=ControlFactory(status),
        what="control socket",
        required=False,
        endpoint=UNIXServerEndpoint(reactor, path, mode=CONTROL_SOCKET_MODE),
        prepare=lambda: removeStaleSocket(path, "control socket"),
    )


def _logObserver(options: Mapping[str, Any], recent: RecentLines) -> Any:
    """Every log sink the options ask for; one that cannot be opened stops start-up."""
    sinks: dict[str, Any] = {}
    for option, name in (
        ("log-human", "human"),
        ("log-json", "jsonOut"),
        ("log-stackdriver", "stackdriver"),
    ):
        path = options[option]
        if not path:
            continue
        try:
            sinks[name] = openSink(path)
        except OSError as e:
            raise _fail(f"--{option}: cannot open {path}: {e.strerror}") from e
    try:
        logFile = rotatingLogFile(options["log-dir"])
    except OSError as e:
        raise _fail(f"--log-dir: cannot write {options['log-dir']}: {e.strerror}") from e
    return agentLogObserver(**sinks, logFile=logFile, recent=recent)


def _ignored(options: Mapping[str, Any]) -> list[str]:
    ignoredInUse = getattr(options, "ignoredOptionsInUse", None)
    return list(ignoredInUse()) if ignoredInUse is not None else []
