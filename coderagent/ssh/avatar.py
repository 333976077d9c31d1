"""The authenticated user: which channels and global requests it may use.

Dispatch is by explicit tables keyed on the exact wire names.  Conch's stock
``global_<name>`` lookup cannot reach names such as
``streamlocal-forward@openssh.com``; a table can, and it shows at a glance
what the agent serves.  Forwarding handlers plug into these tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import connection
from twisted.cred.portal import IRealm
from zope.interface import implementer

from coderagent.netaddr import UNKNOWN, describePeer
from coderagent.policy.keyoptions import KeyOptions
from coderagent.ssh.auth import KeyIdentity
from coderagent.ssh.forwarding import installForwarding
from coderagent.ssh.limits import ConnectionLimits
from coderagent.ssh.session import SessionChannel, SessionContext

GlobalHandler = Callable[[bytes], Any]


class AgentAvatar(ConchUser):
    """One authenticated SSH connection's user; runs everything as the agent's user."""

    def __init__(
        self, username: str, context: SessionContext, keyOptions: KeyOptions | None = None
    ) -> None:
        super().__init__()
        self.username = username
        self.context = context
        #: What the key this user logged in with may do (its authorized_keys options).
        self.keyOptions = keyOptions
        #: What this connection may hold; everything that opens something asks it.
        self.limits = ConnectionLimits(
            context.limits,
            peer=self._peer,
            metrics=context.metrics,
            descriptors=context.descriptors,
        )
        self.channelLookup = {b"session": self._openSession}
        self.globalRequests: dict[bytes, GlobalHandler] = {}
        self.forwards = installForwarding(self)

    def _peer(self) -> str:
        conn = getattr(self, "conn", None)
        return describePeer(conn.transport.transport) if conn is not None else UNKNOWN

    def _openSession(self, **kw: Any) -> SessionChannel:
        return SessionChannel(self.context, self.limits, **kw)

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        opener = self.channelLookup.get(channelType)
        if opener is None:
            raise ConchError("unsupported channel type", connection.OPEN_UNKNOWN_CHANNEL_TYPE)
        channels = self.conn.openChannels()
        if channelType == b"session":
            sessions = sum(isinstance(c, SessionChannel) for c in self.conn.channels.values())
            refusal = self.limits.session(channels=channels, sessions=sessions)
        else:
            refusal = self.limits.forwardChannel(channels=channels)
        if refusal is not None:
            raise ConchError(refusal, connection.OPEN_RESOURCE_SHORTAGE)
        return opener(remoteWindow=windowSize, remoteMaxPacket=maxPacket, data=data, avatar=self)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        # keepalive@openssh.com, no-more-sessions@openssh.com and anything
        # unknown get REQUEST_FAILURE, which OpenSSH still reads as "alive".
        handler = self.globalRequests.get(requestType)
        return handler(data) if handler is not None else 0

    def logout(self) -> None:
        """Called by the portal when the connection ends."""
        self.forwards.close()  # every listener and socket file this connection made


@implementer(IRealm)
class AgentRealm:
    """Hands every authenticated user an :class:`AgentAvatar` over one context."""

    def __init__(self, context: SessionContext) -> None:
        self.context = context

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, AgentAvatar, Callable[[], None]]:
        if IConchUser not in interfaces:
            raise NotImplementedError("coderagent only serves SSH users")
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("coderagent only serves SSH users")
        options = avatarId.options if isinstance(avatarId, KeyIdentity) else None
        avatar = AgentAvatar(avatarId.decode("utf-8", "replace"), self.context, options)
        return IConchUser, avatar, avatar.logout
