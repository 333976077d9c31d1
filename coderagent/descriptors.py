"""The agent's file descriptors: the limit raised at start-up, and a reserve kept free.

sshd forks per connection, so what one connection holds counts against its
own process's limit.  The agent is one process for every connection, the
coderd connection and the boundary socket, so:

* at start-up the soft ``RLIMIT_NOFILE`` is raised to the hard limit, as
  Go's runtime does for every Go program (upstream's agent included), and
  logged (:class:`OpenFileLimit`);
* forwarding (reverse listeners, forwarded connections) may not use the last
  :data:`DESCRIPTOR_RESERVE` descriptors (:class:`DescriptorReserve`), so
  that however many forwards the connections hold, an SSH login, a session's
  process and the coderd connection still get theirs.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: Descriptors forwarding leaves free: an SSH login (its socket, the
#: authorized_keys file), a session (a PTY, or three pipes while it starts),
#: the coderd connection (a socket, a resolver's), the spool and log files, and
#: room for several of each at once.
DESCRIPTOR_RESERVE = 64

#: Where the kernel lists this process's open descriptors (Linux; /dev/fd elsewhere).
_FD_DIRECTORIES = ("/proc/self/fd", "/dev/fd")


def softLimit() -> int:
    """The soft ``RLIMIT_NOFILE`` now (unlimited counts as very large)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def openDescriptors() -> int | None:
    """How many descriptors this process has open (``None``: the system does not say)."""
    for directory in _FD_DIRECTORIES:
        try:
            # listdir's own descriptor on the directory is listed too.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


def raiseOpenFileLimit() -> tuple[int, int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (before, after, hard).

    Leaves the limit as it was if the system refuses (``after == before``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        # macOS refuses RLIM_INFINITY and anything over OPEN_MAX for the soft limit.
        return soft, soft, hard
    return soft, hard, hard


class OpenFileLimit(Service):
    """Raises the open file limit when the agent starts, and says so."""

    def __init__(self, raiseLimit: Callable[[], tuple[int, int, int]] = raiseOpenFileLimit):
        self._raise = raiseLimit
        self._done = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._raiseOnce()

    def startService(self) -> None:
        super().startService()
        self._raiseOnce()

    def _raiseOnce(self) -> None:
        if self._done:
            return
        self._done = True
        before, after, hard = self._raise()
        if after != before:
            log.info(
                "raised the open file limit from {before} to {after} (the hard limit)",
                before=_show(before),
                after=_show(after),
            )
        elif before == hard:
            log.info("open file limit: {limit} (the hard limit)", limit=_show(before))
        else:
            log.warn(
                "open file limit: {limit}; it could not be raised to the hard limit {hard}",
                limit=_show(before),
                hard=_show(hard),
            )


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


class DescriptorReserve:
    """Says whether forwarding may open another descriptor: not into the reserve."""

    def __init__(
        self,
        reserve: int = DESCRIPTOR_RESERVE,
        *,
        limit: Callable[[], int] = softLimit,
        inUse: Callable[[], int | None] = openDescriptors,
    ) -> None:
        self.reserve = reserve
        self._limit = limit
        self._inUse = inUse

    def free(self) -> int | None:
        """Descriptors that could still be opened (``None``: unknown here)."""
        used = self._inUse()
        return None if used is None else self._limit() - used

    def allows(self) -> bool:
        """Whether one more descriptor leaves the reserve untouched (unknown: yes)."""
        free = self.free()
        return free is None or free > self.reserve
