"""The deployment's announcement banners, which login shells show.

As upstream: fetched with ``GetAnnouncementBanners`` on every connection to
coderd (a failure there drops the connection, and the next one tries again)
and every :data:`REFRESH_INTERVAL` after that.  A refresh that fails keeps
the banners already known and is logged (upstream would reconnect).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.coderd.client import CoderdClient
from coderagent.pb import agent_pb2

log = Logger()

#: Upstream's ``ServiceBannerRefreshInterval``.
REFRESH_INTERVAL = 120.0


class AnnouncementBanners(Service):
    """The latest banners coderd gave (:attr:`current`), kept fresh."""

    def __init__(self, client: CoderdClient, clock: Any) -> None:
        self.client = client
        self.clock = clock
        self.current: list[agent_pb2.BannerConfig] = []
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self.client.onConnect(self._connected)
        self._loop.start(REFRESH_INTERVAL, now=False).addErrback(self._loopFailed)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _connected(self, client: CoderdClient) -> Deferred[None]:
        return self._fetch()

    def _fetch(self) -> Deferred[None]:
        d: Deferred[Any] = self.client.call(
            "GetAnnouncementBanners", agent_pb2.GetAnnouncementBannersRequest()
        )
        return d.addCallback(self._got)

    def _got(self, response: agent_pb2.GetAnnouncementBannersResponse) -> None:
        self.current = list(response.announcement_banners)

    def _refresh(self) -> None:
        if self.client.connected:
            self._fetch().addErrback(self._refreshFailed)

    def _refreshFailed(self, reason: Failure) -> None:
        log.warn("failed to update notification banners: {error}", error=reason.getErrorMessage())

    def _loopFailed(self, reason: Failure) -> None:
        log.failure("refreshing the announcement banners stopped", reason)
