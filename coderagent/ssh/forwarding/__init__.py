"""Port and Unix-socket forwarding: the four paths upstream serves.

=========================================  ===========  =========================
request                                    direction    module
=========================================  ===========  =========================
``direct-tcpip`` channel                   local        :mod:`.tcp`
``tcpip-forward`` / ``cancel-…`` global    reverse      :mod:`.tcp`
``direct-streamlocal@openssh.com``         local        :mod:`.streamlocal`
``streamlocal-forward@openssh.com`` / …    reverse      :mod:`.streamlocal`
=========================================  ===========  =========================

Every path asks the :class:`~coderagent.policy.Policy` first and moves bytes
through :mod:`.relay` (half-close, back-pressure); :mod:`.sockets` dials the
socket of a ``direct-*`` open and accepts those of a reverse forward.  What
one SSH connection creates is tracked in its :class:`~.registry.Forwards` and
closed with it.
``direct-*`` opens answer only once connected, which needs the connection
class from :mod:`.opening`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coderagent.ssh.forwarding.registry import Forwards
from coderagent.ssh.forwarding.streamlocal import StreamLocalForwarding
from coderagent.ssh.forwarding.tcp import TCPForwarding

__all__ = ["installForwarding", "recheckReverseForwards"]


def installForwarding(avatar: Any) -> Forwards:
    """Serve the four forwarding paths on ``avatar``'s dispatch tables.

    Returns the connection's :class:`~.registry.Forwards`; call its
    ``close()`` when the connection ends.
    """
    forwards = Forwards(avatar)
    tcp = TCPForwarding(forwards)
    unix = StreamLocalForwarding(forwards)
    avatar.channelLookup[b"direct-tcpip"] = tcp.openDirect
    avatar.channelLookup[b"direct-streamlocal@openssh.com"] = unix.openDirect
    avatar.globalRequests[b"tcpip-forward"] = tcp.forward
    avatar.globalRequests[b"cancel-tcpip-forward"] = tcp.cancel
    avatar.globalRequests[b"streamlocal-forward@openssh.com"] = unix.forward
    avatar.globalRequests[b"cancel-streamlocal-forward@openssh.com"] = unix.cancel
    return forwards


def recheckReverseForwards(connections: Iterable[Any]) -> None:
    """After a policy reload: every connection closes the reverse listeners it no longer may
    hold (``connections``: the SSH transports; unauthenticated ones hold none)."""
    for transport in list(connections):
        forwards = getattr(getattr(transport, "avatar", None), "forwards", None)
        if isinstance(forwards, Forwards):
            forwards.recheck()
