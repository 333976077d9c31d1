"""What the agent tells coderd about itself on every connection.

Upstream's agent, once connected, fetches the manifest, reports its startup
(version and expanded directory) the first time, and reports each lifecycle
transition once, in order, however often the connection drops in between.
This agent runs no startup scripts, so it goes ``STARTING`` then ``READY``
as soon as it has a manifest, and ``SHUTTING_DOWN`` then ``OFF`` when it is
stopped (bounded: a coderd that is gone does not hold up the shutdown).

The manifest is kept for whoever needs it (sessions, the boundary proxy):
:attr:`Reporter.manifest` and :meth:`Reporter.onManifest`.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent import __version__
from coderagent.coderd.client import CoderdClient, CoderdUnavailable
from coderagent.pb import agent_pb2

log = Logger()

State = agent_pb2.Lifecycle.State

#: How long stopping may spend telling coderd, a report already on its way included.
SHUTDOWN_REPORT_TIMEOUT = 5.0


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expandDirectory(directory: str, environ: Mapping[str, str]) -> str:
    """The manifest's directory as sessions see it: ``~`` and ``$VARS`` expanded, else $HOME.

    Unset variables expand to nothing, as Go's ``os.ExpandEnv`` does.
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    if not directory:
        return home
    if directory == "~" or directory.startswith("~/"):
        directory = home + directory[1:]
    return _VARIABLE.sub(lambda m: environ.get(m.group(1) or m.group(2), ""), directory)


def sessionVariables(manifest: agent_pb2.Manifest) -> dict[str, str]:
    """What sessions learn from the manifest: upstream's ``CODER_*`` identity variables."""
    variables = {
        "CODER_WORKSPACE_NAME": manifest.workspace_name,
        "CODER_WORKSPACE_AGENT_NAME": manifest.agent_name,
        "CODER_WORKSPACE_OWNER_NAME": manifest.owner_username,
    }
    if len(manifest.workspace_id) == 16:
        variables["CODER_WORKSPACE_ID"] = str(uuid.UUID(bytes=manifest.workspace_id))
    return {k: v for k, v in variables.items() if v}


class Reporter(Service):
    """Manifest in; startup and lifecycle out, each delivered once and in order."""

    def __init__(self, client: CoderdClient, environ: Mapping[str, str], clock: Any) -> None:
        self.client = client
        self.environ = dict(environ)
        self.clock = clock
        self.manifest: agent_pb2.Manifest | None = None
        self._listeners: list[Callable[[agent_pb2.Manifest], None]] = []
        self._pending: deque[agent_pb2.Lifecycle] = deque()
        self._sending = False
        self._waiters: list[Deferred[None]] = []
        self._startupSent = False
        self._started = False
        #: The last lifecycle state coderd acknowledged (a ``Lifecycle.State`` name).
        self.reportedState = "CREATED"

    def onManifest(self, listener: Callable[[agent_pb2.Manifest], None]) -> None:
        """Call ``listener`` with each manifest received (and the current one, if any)."""
        self._listeners.append(listener)
        if self.manifest is not None:
            listener(self.manifest)

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self._started:
            return succeed(None)
        self._transition(State.SHUTTING_DOWN)
        self._transition(State.OFF)
        return self.report(timeout=SHUTDOWN_REPORT_TIMEOUT).addErrback(self._shutdownFailed)

    def _shutdownFailed(self, reason: Failure) -> None:
        log.warn(
            "could not report shutdown to coderd: {error}", error=reason.getErrorMessage()
        )

    # -- on every connection -----------------------------------------------------

    def _connected(self, client: CoderdClient) -> Deferred[None]:
        d: Deferred[Any] = client.call("GetManifest", agent_pb2.GetManifestRequest())
        d.addCallback(self._gotManifest)
        d.addCallback(lambda _: self._reportStartup())
        d.addCallback(lambda _: self.report())
        return d

    def _gotManifest(self, manifest: agent_pb2.Manifest) -> None:
        first = self.manifest is None
        self.manifest = manifest
        if first:
            log.info(
                "manifest received: agent {agent} of workspace {owner}/{workspace}",
                agent=manifest.agent_name,
                owner=manifest.owner_username,
                workspace=manifest.workspace_name,
            )
        for listener in list(self._listeners):
            listener(manifest)

    def _reportStartup(self) -> Deferred[Any]:
        if self._startupSent or self.manifest is None:
            return succeed(None)
        startup = agent_pb2.Startup(
            version=__version__,
            expanded_directory=expandDirectory(self.manifest.directory, self.environ),
        )

        def sent(_: object) -> None:
            self._startupSent = True
            if not self._started:
                # No startup scripts to run: ready as soon as coderd knows us.
                self._started = True
                self._transition(State.STARTING)
                self._transition(State.READY)

        d: Deferred[Any] = self.client.call(
            "UpdateStartup", agent_pb2.UpdateStartupRequest(startup=startup)
        )
        return d.addCallback(sent)

    # -- lifecycle: every transition, once, in order ------------------------------

    def _transition(self, state: int) -> None:
        changed = timestamp_pb2.Timestamp()
        changed.FromNanoseconds(int(time.time() * 1e9))
        lifecycle = agent_pb2.Lifecycle(changed_at=changed)
        lifecycle.state = state  # type: ignore[assignment]
        self._pending.append(lifecycle)

    def report(self, timeout: float | None = None) -> Deferred[None]:
        """Report what is pending, oldest first; fires when all went, fails at the first error.

        A call while reports are on their way waits for those (and for what
        was added meanwhile, which the same pass sends).  ``timeout`` bounds
        this caller's wait either way: a pass already on its way may have been
        started with a longer one (or none), and stopping must not wait for
        it.  Giving up does not stop the pass; what it does not deliver is
        sent again on the next connection.
        """
        waiter: Deferred[None] = Deferred(self._forget)
        if not self._pending and not self._sending:
            waiter.callback(None)
            return waiter
        self._waiters.append(waiter)
        if timeout is not None:

            def timedOut(result: object, seconds: float) -> Failure:
                return Failure(
                    CoderdUnavailable(f"UpdateLifecycle: no answer from coderd within {seconds:g}s")
                )

            waiter.addTimeout(timeout, self.clock, onTimeoutCancel=timedOut)
        if self._sending:
            return waiter
        self._sending = True

        def finish(outcome: Failure | None) -> None:
            self._sending = False
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if outcome is None:
                    w.callback(None)
                else:
                    w.errback(outcome)

        def sendHead() -> None:
            if not self._pending:
                finish(None)
                return
            head = self._pending[0]
            request = agent_pb2.UpdateLifecycleRequest(lifecycle=head)
            d: Deferred[Any] = self.client.call("UpdateLifecycle", request, timeout=timeout)
            d.addCallbacks(reported, finish, callbackArgs=(head,))

        def reported(_: object, head: agent_pb2.Lifecycle) -> None:
            self._pending.popleft()
            self.reportedState = State.Name(head.state)
            log.info("lifecycle reported to coderd: {state}", state=State.Name(head.state))
            sendHead()

        # A failed report stays at the head: the next connection sends it again.
        sendHead()
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        """A waiter was cancelled (its timeout, or its caller): the pass goes on without it."""
        self._waiters.remove(waiter)
