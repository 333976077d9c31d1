"""``twistd coder-agent``: parse the options and wire the services together.

Wiring only: each concept is built by its own package (``ssh``, ``policy``,
``coderd``, ``scripts``, ``reporting``, ``boundary``, ``observe``,
``control``), which also does its own I/O when its service starts (host
keys, the token file, log files, the spool), never here.  Everything goes
into one ``MultiService``; the SSH server (it serves whether or not coderd
is reachable) and the coderd client (with the services that talk through it
as its children) are started, and stopped in upstream's order, by
:class:`~coderagent.agentlifecycle.AgentLifecycle`: the SSH server first, so
that what its sessions' ends report still reaches coderd.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService

from coderagent.agentlifecycle import AgentLifecycle
from coderagent.boundary.service import BoundaryService
from coderagent.boundary.spool import Spool
from coderagent.coderd.banners import AnnouncementBanners
from coderagent.coderd.client import CoderdClient
from coderagent.coderd.credentials import CredentialsError, checkCredentials
from coderagent.coderd.lifecycle import Reporter
from coderagent.control.server import controlSocket
from coderagent.descriptors import DescriptorReserve, OpenFileLimit
from coderagent.listening import ListeningService
from coderagent.observe.connections import describeConnections
from coderagent.observe.logs import LogDestinations, LoggingRoot, RecentLines, StartupReport
from coderagent.observe.metrics import AgentMetrics
from coderagent.observe.servers import httpServers
from coderagent.observe.status import AgentStatus, serving
from coderagent.options import Options
from coderagent.policy import Policy
from coderagent.policy.reload import PolicyFileService
from coderagent.reaper import Reaper
from coderagent.reporting.activity import SSHActivity, connectionsByProto
from coderagent.reporting.apphealth import AppHealthReporter, httpProbe
from coderagent.reporting.command import CommandRunner
from coderagent.reporting.connlog import ConnectionLog
from coderagent.reporting.metadata import MetadataReporter
from coderagent.reporting.resources import ResourcesMonitor
from coderagent.reporting.stats import StatsReporter, StatsSources
from coderagent.scripts.logsender import LogSender
from coderagent.scripts.runner import ScriptRunner, scriptBinDir
from coderagent.scripts.timings import TimingReporter
from coderagent.signals import GracefulSignals
from coderagent.ssh.auth import makePortal
from coderagent.ssh.avatar import AgentRealm
from coderagent.ssh.factory import AgentSSHFactory, SSHConfig
from coderagent.ssh.forwarding import recheckReverseForwards
from coderagent.ssh.hostkeys import HostKeyError, loadHostKeys
from coderagent.ssh.limits import SSHLimits
from coderagent.ssh.motd import LoginMessage
from coderagent.ssh.session import SessionContext
from coderagent.ssh.sftp import AgentSFTPServer
from coderagent.startup import Preflight
from coderagent.unixsocket import ServedSockets
from coderagent.workspaceenv import UserInfo, WorkspaceEnvironment

__all__ = ["Options", "makeService"]


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
        credentials = checkCredentials(
            auth=options["auth"],
            url=options["agent-url"],
            token=options["agent-token"],
            tokenFile=options["agent-token-file"],
        )
    except CredentialsError as e:
        raise SystemExit(f"coder-agent: {e}") from e

    metrics = AgentMetrics()
    recent = RecentLines()
    destinations = LogDestinations(
        human=options["log-human"],
        json=options["log-json"],
        stackdriver=options["log-stackdriver"],
        directory=options["log-dir"],
    )
    top = LoggingRoot(lambda: destinations.open(recent))
    preflight = Preflight()
    preflight.setServiceParent(top)
    OpenFileLimit().setServiceParent(top)
    status = AgentStatus(clock=reactor.seconds)
    StartupReport(_ignored(options)).setServiceParent(top)
    GracefulSignals(reactor).setServiceParent(top)

    #: Every Unix socket path the agent serves: SSH forwards may not take them.
    served = ServedSockets()
    token = credentials.token or preflight.load(credentials.readToken, CredentialsError)
    hostKeyDir = options["ssh-host-key-dir"]
    hostKeys = preflight.load(lambda: loadHostKeys(hostKeyDir), HostKeyError)
    workspace = WorkspaceEnvironment(
        agentEnvironment=environ,
        user=UserInfo.current(environ),
        scriptBinDir=scriptBinDir(options["script-data-dir"]),
    )
    coderd = CoderdClient(
        url=credentials.url,
        token=token,
        headers=options["agent-header"],
        headerCommand=options["agent-header-command"],
        reactor=reactor,
        environ=environ,
    )
    banners = AnnouncementBanners(coderd, reactor)
    banners.setServiceParent(coderd)
    login = LoginMessage(workspace, lambda: banners.current)
    policy = Policy(
        blockFileTransfer=options["block-file-transfer"],
        blockLocalPortForwarding=options["block-local-port-forwarding"],
        blockReversePortForwarding=options["block-reverse-port-forwarding"],
    )
    connectionLog = ConnectionLog(coderd, clock=reactor)
    activity = SSHActivity(connectionLog)
    factory = _ssh(options, reactor, policy, workspace, metrics, hostKeys, login, served, activity)
    if options["forwarding-policy-file"]:
        PolicyFileService(
            options["forwarding-policy-file"],
            policy,
            reactor=reactor,
            onLoaded=lambda rules, when: metrics.policyLoadedNow(rules.digest, rules.mode, when),
            onError=metrics.policyReloadErrors.inc,
            onChange=lambda: recheckReverseForwards(factory.connections),
        ).setServiceParent(top)  # loaded before the SSH server starts: it listens under it
    ssh = ListeningService(
        reactor=reactor,
        description=options["ssh-endpoint"],
        factory=factory,
        what="SSH server",
        required=True,
        drain=factory.shutdown,
        prepare=factory.loadHostKeys,
    )
    status.add("ssh", lambda: {"serving": ssh.listening, "connections": len(factory.connections)})
    status.check(serving(ssh, "SSH"))

    reporter = Reporter(coderd, workspace.expandDirectory, reactor)
    # First of the manifest's listeners: the scripts that AgentLifecycle starts see it.
    reporter.onManifest(lambda manifest, first: workspace.update(manifest))
    reporter.setServiceParent(coderd)
    _boundary(options, reactor, metrics, workspace, status, coderd, served).setServiceParent(coderd)
    scripts = _scripts(options, reactor, metrics, workspace, status, coderd)
    AgentLifecycle(
        reporter=reporter,
        ssh=ssh,
        coderd=coderd,
        clock=reactor,
        scripts=scripts,
        drains=[scripts.drain, connectionLog.drain],
    ).setServiceParent(top)
    Reaper(enabled=not options["no-reap"], clock=reactor).setServiceParent(top)
    stats = _reporting(
        coderd, reporter, connectionLog, activity, factory, workspace, metrics, status
    )
    status.add(
        "coderd",
        lambda: {
            "url": coderd.target.url,
            "connected": coderd.connected,
            "lifecycle": reporter.reportedState,
            "last_stats_report_seconds_ago": stats.lastReportAge(),
        },
    )

    for server in httpServers(
        reactor=reactor,
        metricsAddress=options["prometheus-address"],
        debugAddress=options["debug-address"],
        pprofAddress=options["pprof-address"],
        metrics=metrics,
        status=status,
        manifest=lambda: reporter.manifest,
        connections=lambda: describeConnections(factory.connections, reactor),
        recent=recent,
    ):
        server.setServiceParent(top)
    if options["socket-server-enabled"]:
        controlSocket(options["socket-path"], reactor, status, served=served).setServiceParent(top)
    return top


def _ssh(
    options: Mapping[str, Any],
    reactor: Any,
    policy: Policy,
    workspace: WorkspaceEnvironment,
    metrics: AgentMetrics,
    hostKeys: Callable[[], Mapping[bytes, Any]],
    loginMessage: Callable[[], bytes],
    served: ServedSockets,
    events: SSHActivity,
) -> AgentSSHFactory:
    """The SSH server: what its sessions see, and the factory (host keys load on start)."""
    context = SessionContext(
        policy=policy,
        reactor=reactor,
        user=workspace.user,
        agentEnvironment=workspace.agentEnvironment,
        workspace=workspace,
        sftpServer=AgentSFTPServer,
        metrics=metrics,
        loginMessage=loginMessage,
        servedSockets=served,
        limits=SSHLimits(
            maxSessions=options["ssh-max-sessions"],
            maxChannels=options["ssh-max-channels"],
            maxReverseForwards=options["ssh-max-reverse-forwards"],
            maxEnvBytes=options["ssh-max-env-bytes"],
        ),
        descriptors=DescriptorReserve(),
        events=events,
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
    return factory


def _scripts(
    options: Mapping[str, Any],
    reactor: Any,
    metrics: AgentMetrics,
    workspace: WorkspaceEnvironment,
    status: AgentStatus,
    coderd: CoderdClient,
) -> ScriptRunner:
    """The ``coder_script`` runner, and what carries its logs and timings to coderd."""
    logs = LogSender(coderd, reactor, onDrop=metrics.scriptLogLinesDroppedBy)
    logs.setServiceParent(coderd)
    timings = TimingReporter(coderd, reactor)
    timings.setServiceParent(coderd)
    runner = ScriptRunner(
        reactor=reactor,
        workspace=workspace,
        dataDirBase=options["script-data-dir"],
        logDir=options["log-dir"],
        logs=logs,
        timings=timings,
        metrics=metrics,
    )
    status.add("scripts", runner.status)
    return runner


def _boundary(
    options: Mapping[str, Any],
    reactor: Any,
    metrics: AgentMetrics,
    workspace: WorkspaceEnvironment,
    status: AgentStatus,
    coderd: CoderdClient,
    served: ServedSockets,
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
        served=served,
        announce=lambda path: workspace.setVariable("CODER_BOUNDARY_LOG_SOCKET", path),
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


def _reporting(
    coderd: CoderdClient,
    reporter: Reporter,
    connectionLog: ConnectionLog,
    activity: SSHActivity,
    factory: AgentSSHFactory,
    workspace: WorkspaceEnvironment,
    metrics: AgentMetrics,
    status: AgentStatus,
) -> StatsReporter:
    """What the agent reports to coderd besides its lifecycle (``coderagent.reporting``)."""
    reactor = factory.reactor
    connectionLog.setServiceParent(coderd)
    stats = StatsReporter(
        coderd,
        StatsSources(
            traffic=factory.traffic.totals,
            connections=lambda: connectionsByProto(factory.connections),
            sessions=activity.sessionCounts,
            registry=metrics.registry,
        ),
        clock=reactor,
    )
    stats.setServiceParent(coderd)
    metadata = MetadataReporter(
        coderd,
        manifest=lambda: reporter.manifest,
        runner=CommandRunner(
            reactor=reactor,
            shell=workspace.user.shell,
            home=workspace.home,
            # What upstream's metadata commands get: a session's environment, no client.
            environment=lambda: workspace.commandEnvironment(workspace.baseEnvironment()),
            directory=workspace.workingDirectory,
        ),
        clock=reactor,
    )
    metadata.setServiceParent(coderd)
    resources = ResourcesMonitor(coderd, clock=reactor)
    resources.setServiceParent(coderd)
    appHealth = AppHealthReporter(coderd, clock=reactor, probe=httpProbe(reactor))
    appHealth.setServiceParent(coderd)
    reporter.onManifest(lambda manifest, first: appHealth.manifestReceived(manifest))
    status.add(
        "reporting",
        lambda: {
            "stats": stats.status(),
            "connection_log": connectionLog.status(),
            "metadata": metadata.status(),
            "resources": resources.status(),
            "apps": appHealth.status(),
        },
    )
    return stats


def _ignored(options: Mapping[str, Any]) -> list[str]:
    ignoredInUse = getattr(options, "ignoredOptionsInUse", None)
    return list(ignoredInUse()) if ignoredInUse is not None else []
