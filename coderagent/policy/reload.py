"""``--forwarding-policy-file``: loaded when the agent starts, reloaded while it runs.

At start-up a file that cannot be read or is invalid stops the agent with every error and its
line: a policy that was meant to restrict must not silently allow everything.  While it runs,
SIGHUP or a change of the file's content (checked every ``interval`` seconds) reloads it.  An
invalid file then keeps the policy in force, logs one error naming each line and reason, and
counts in ``agent_policy_reload_errors_total``; a good one replaces it at once for every new
request, and ``onChange`` runs (it closes the reverse listeners the new policy forbids:
an open listener is an open door).  Channels already established are left alone.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from coderagent.policy.engine import Policy
from coderagent.policy.policyfile import PolicyFile, PolicyFileError, loadPolicy

log = Logger()

#: How often the file's content is compared with the policy in force.
CHECK_INTERVAL = 2.0


class PolicyFileService(Service):
    """Keeps ``policy.rules`` the content of ``path``."""

    def __init__(
        self,
        path: str,
        policy: Policy,
        *,
        reactor: Any,
        clock: Any = None,
        interval: float = CHECK_INTERVAL,
        onLoaded: Callable[[PolicyFile, float], None] | None = None,
        onError: Callable[[], None] | None = None,
        onChange: Callable[[], None] | None = None,
    ) -> None:
        """``onLoaded(rules, when)`` reports each policy put in force (metrics),
        ``onError()`` each reload refused; ``onChange()`` runs after a reload."""
        self.path = Path(path)
        self.policy = policy
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.interval = interval
        self.onLoaded = onLoaded or (lambda rules, when: None)
        self.onError = onError or (lambda: None)
        self.onChange = onChange or (lambda: None)
        self._check: LoopingCall | None = None
        self._previousHandler: Any = None
        #: The digest of the last invalid content, so that it is reported once.
        self._lastBad = ""

    def load(self) -> None:
        """The first load: a file that cannot be used stops the agent, with every error."""
        try:
            rules = loadPolicy(self.path.read_bytes())
        except OSError as e:
            raise SystemExit(
                f"coder-agent: --forwarding-policy-file {self.path}: {e.strerror}"
            ) from e
        except PolicyFileError as e:
            lines = "\n".join(f"  {error}" for error in e.errors)
            raise SystemExit(
                f"coder-agent: --forwarding-policy-file {self.path} is invalid:\n{lines}"
            ) from e
        self._install(rules, "loaded")

    def privilegedStartService(self) -> None:
        # twistd calls this first (a test's MultiService only startService): load,
        # and take SIGHUP now, not once the reactor runs. Twisted installs no SIGHUP
        # handler of its own, and until this one is in place SIGHUP ends the agent.
        super().privilegedStartService()
        self._prepare()

    def startService(self) -> None:
        super().startService()
        self._prepare()
        self._check = LoopingCall(self.reload, "its content changed")
        self._check.clock = self.clock
        self._check.start(self.interval, now=False)

    def _prepare(self) -> None:
        if self.policy.rules.digest == "":
            self.load()
        if self._previousHandler is None:
            self._installSignal()

    def stopService(self) -> None:
        super().stopService()
        if self._check is not None and self._check.running:
            self._check.stop()
        self._check = None
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None

    def _installSignal(self) -> None:
        self._previousHandler = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, number: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP", True)

    def reload(self, why: str, always: bool = False) -> bool:
        """Read the file again; put it in force if it changed (or ``always``) and is valid."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self._refused(why, [f"cannot read it: {e.strerror}"])
            return False
        try:
            rules = loadPolicy(data)
        except PolicyFileError as e:
            if always or _digest(data) != self._lastBad:
                self._refused(why, e.errors)
            self._lastBad = _digest(data)
            return False
        self._lastBad = ""
        if rules.digest == self.policy.rules.digest and not always:
            return False
        self._install(rules, f"reloaded ({why})")
        self.onChange()
        return True

    def _install(self, rules: PolicyFile, what: str) -> None:
        self.policy.rules = rules
        self.onLoaded(rules, self.clock.seconds())
        log.info(
            "forwarding policy {path} {what}: {mode}, sha256 {digest}",
            path=str(self.path),
            what=what,
            mode=rules.mode,
            digest=rules.digest[:16],
        )

    def _refused(self, why: str, errors: list[str]) -> None:
        self.onError()
        log.error(
            "forwarding policy {path} not reloaded ({why}), the previous one stays in force: "
            "{errors}",
            path=str(self.path),
            why=why,
            errors="; ".join(errors),
        )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
