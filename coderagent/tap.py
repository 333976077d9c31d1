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
from twisted.logger import Logger

from coderagent.boundary.forwarder import Forwarder
from coderagent.boundary.server import BoundaryLogProxy
from coderagent.boundary.spool import Spool
from coderagent.coderd.client import CoderdClient
from coderagent.coderd.credentials import CredentialsError, resolveCredentials
from coderagent.coderd.lifecycle import Reporter, sessionVariables
from coderagent.listening import ListeningService
from coderagent.observe.http import metricsSite, strportsFor
from coderagent.observe.logs import LoggingRoot, agentLogObserver, openSink
from coderagent.observe.metrics import AgentMetrics
from coderagent.options import Options
from coderagent.policy import Policy
from coderagent.ssh.auth import makePortal
from coderagent.ssh.avatar import AgentRealm
from coderagent.ssh.environment import UserInfo
from coderagent.ssh.factory import AgentSSHFactory, SSHConfig
from coderagent.ssh.hostkeys import HostKeyError, loadHostKeys
from coderagent.ssh.session import SessionContext
from coderagent.ssh.sftp import AgentSFTPServer

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
    )

    logPath = options["log-human"]
    top = LoggingRoot(agentLogObserver(openSink(logPath)) if logPath else None)
    StartupReport(_ignored(options)).setServiceParent(top)
    ListeningService(
        reactor=reactor,
        description=options["ssh-endpoint"],
        factory=factory,
        what="SSH server",
        required=True,
    ).setServiceParent(top)
    spool = Spool(
        options["boundary-log-spool-dir"],
        reactor=reactor,
        maxBytes=options["boundary-log-spool-max-bytes"],
        commitInterval=options["boundary-log-commit-interval"],
        onDrop=metrics.boundaryDropped,
    )
    spool.open()
    metrics.watchSpool(
        lambda: spool.pendingRecords, lambda: spool.pendingLogs, lambda: spool.pendingBytes
    )
    socketPath = options["boundary-log-proxy-socket-path"]
    if socketPath:
        BoundaryLogProxy(
            path=socketPath,
            spool=spool,
            metrics=metrics,
            reactor=reactor,
            announce=lambda path: context.overrides.update(CODER_BOUNDARY_LOG_SOCKET=path),
        ).setServiceParent(top)
    else:
        log.warn("boundary log proxy socket path not defined; not starting proxy")

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
    Forwarder(spool=spool, client=coderd, metrics=metrics, clock=reactor).setServiceParent(coderd)
    coderd.setServiceParent(top)

    if options["prometheus-address"]:
        ListeningService(
            reactor=reactor,
            description=strportsFor(options["prometheus-address"]),
            factory=metricsSite(metrics),
            what="Prometheus metrics",
            required=False,
        ).setServiceParent(top)
    return top


def _ignored(options: Mapping[str, Any]) -> list[str]:
    ignoredInUse = getattr(options, "ignoredOptionsInUse", None)
    return list(ignoredInUse()) if ignoredInUse is not None else []
