"""Twisted services that need an order: :class:`StopInOrder`.

A ``MultiService`` stops all its children at once (in reverse order, but
without waiting for one before the next).  Where one service's shutdown
produces work for another, that is too early: the SSH server's goodbye to
its clients ends their sessions, and the connection log must still be
running to send those ends to coderd.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class StopInOrder(MultiService):
    """Children start in the order added and stop one at a time, the last added first,
    each once the one after it has finished stopping."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        done: Deferred[Any] = succeed(None)
        for service in reversed(list(self)):
            done.addCallback(_stop, service)
            done.addErrback(self._failed, service)
        return done.addCallback(lambda _: None)

    def _failed(self, reason: Failure, service: Any) -> None:
        log.failure("stopping {service} failed", reason, service=service)


def _stop(_: object, service: Any) -> Deferred[Any]:
    return maybeDeferred(service.stopService)
