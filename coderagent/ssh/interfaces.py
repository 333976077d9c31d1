"""The flow-control contract between the SSH connection and its channels.

Conch re-opens a channel's window as soon as data arrives, so a consumer
that cannot keep up (a full socket, a child not reading its stdin) would make
the agent buffer without bound.  The agent's connection re-opens a window
only while the channel's consumer keeps up, and shares one budget among all
of a connection's channels.  That takes co-operation from both sides, spelled
out here so that it is checked (``zope.interface.verify``) instead of being
a set of attribute names each side has to guess.
"""

from __future__ import annotations

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
