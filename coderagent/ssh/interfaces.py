"""The SSH server's contracts: flow control between the connection and its channels,
and the events it reports to the rest of the agent.

Conch re-opens a channel's window as soon as data arrives, so a consumer
that cannot keep up (a full socket, a child not reading its stdin) would make
the agent buffer without bound.  The agent's connection re-opens a window
only while the channel's consumer keeps up, and shares one budget among all
of a connection's channels.  That takes co-operation from both sides, spelled
out here so that it is checked (``zope.interface.verify``) instead of being
a set of attribute names each side has to guess.
"""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import Attribute, Interface


class IWindowedChannel(Interface):
    """A channel whose window the connection opens only while its consumer keeps up.

    The connection reads these attributes on every CHANNEL_DATA; the last
    three are Conch's ``SSHChannel``'s own.
    """

    consumerPaused = Attribute(
        """True while the consumer of the client's data cannot take more.

        While it is set the connection leaves the window shut; the channel
        calls :meth:`IChannelWindows.reopenWindow` once it clears."""
    )
    windowCap = Attribute(
        """The largest window this channel may have, in bytes.

        Starts as the window the channel asked for; the connection's
        :meth:`IChannelWindows.sizeWindow` sets it when the channel opens."""
    )
    localWindowSize = Attribute("The window granted to the peer, in bytes.")
    localWindowLeft = Attribute("What the peer may still send before the window is re-opened.")
    localClosed = Attribute("True once we have sent CHANNEL_CLOSE.")


class IChannelWindows(Interface):
    """What the connection does with the windows of its :class:`IWindowedChannel` s."""

    def sizeWindow(channel: IWindowedChannel) -> None:
        """Set ``channel``'s first window (and ``windowCap``) before its open is confirmed."""

    def reopenWindow(channel: IWindowedChannel) -> None:
        """Give the peer more window on ``channel`` if its consumer keeps up.

        Called by the connection after each CHANNEL_DATA and by a channel
        whose consumer has just drained (``consumerPaused`` cleared)."""


class IConnectionEvents(Interface):
    """What the SSH server tells the rest of the agent about who used it and what it refused.

    The SSH side calls these; :mod:`coderagent.reporting` implements them (the
    connection log coderd keeps for auditing, the session counts coderd's
    activity tracking reads).  They must be cheap and must not raise: they
    are called from channel handling, once per session start, session end
    and refusal, never per packet.
    """

    def sessionStarted(sessionType: str, peer: object) -> Callable[[int, str], None]:
        """A session channel started a shell, a command or a subsystem.

        ``sessionType`` is the client's ``CODER_SSH_SESSION_TYPE`` in lower
        case (``ssh`` when it sent none); ``peer`` is the client's
        ``IAddress``.  Returns the function to call exactly once when the
        session has ended, with the status code it ended with and why.
        """

    def refused(peer: object, reason: str) -> None:
        """The policy refused a request of the client at ``peer``.

        ``reason`` names what was refused and where to, for example
        ``reverse port forwarding blocked: tcpip-forward 0.0.0.0:8080``.
        """
