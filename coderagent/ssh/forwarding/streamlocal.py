"""Unix-socket forwarding: ``direct-streamlocal@openssh.com`` and
``streamlocal-forward@openssh.com`` (``ssh -L``/``-R`` with socket paths).

Behaviour follows upstream (agentssh ``forward.go`` after coder#11631) and
OpenSSH's ``PROTOCOL`` §2.4, except for what a forward may replace:

* ``direct-streamlocal``: payload ``{path, reserved string, reserved uint32}``;
  the socket is connected before the open is answered, and a failure reads
  ``dial unix socket "<path>": <why>``.  A path too long for a socket address
  fails at once, as Go's dialer does (``connect: invalid argument``).
* ``streamlocal-forward``: payload ``{path}``, and the listener is keyed by
  this SSH connection and path: asking for the same path twice on one
  connection succeeds (so ``ExitOnForwardFailure`` keeps working).  Each
  accepted connection opens ``forwarded-streamlocal@openssh.com`` with
  ``{path, reserved string}``.
* What is at the path is never destroyed.  Upstream unlinks whatever is
  there (a regular file, a symbolic link, a socket another process, another
  connection or the agent itself serves); sshd refuses any existing path
  (``StreamLocalBindUnlink no``).  Here only a **stale socket** (one on
  which a connect is refused) is replaced, and a path the agent serves
  itself (:class:`~coderagent.unixsocket.ServedSockets`: the boundary audit
  socket, the control socket) is refused even while nothing is bound there.
  Every such refusal is the request failure and a WARN line naming the path.
* A path longer than a socket address allows is refused before anything is
  created; the missing parent directories are created, each 0700.
* The socket file goes when the forward is cancelled or the SSH connection
  ends, but only while it is still ours (someone may have removed it and
  bound another socket there since).
* Sockets are created mode 0600, like sshd (``StreamLocalBindMask 0177``):
  only the agent's user may connect to a forwarded socket.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderagent.compat import closeUnixPortKeepingFile
from coderagent.files import (
    PRIVATE_SOCKET_MODE,  # sshd's default StreamLocalBindMask 0177
    makePrivateDirs,
)
from coderagent.gotext import goQuote
from coderagent.policy.engine import normalisePath
from coderagent.ssh.forwarding.registry import UNPARSED, Forwards
from coderagent.ssh.forwarding.relay import RelayChannel
from coderagent.ssh.forwarding.sockets import (
    CONNECT_TIMEOUT,
    AcceptedSocket,
    ForwardedFactory,
    describeConnectError,
    dial,
)
from coderagent.ssh.wire import MalformedPayload, Payload
from coderagent.unixsocket import SUN_PATH_MAX, PrivateUnixPort, fitsSunPath, removeStale

log = Logger()


def displayPath(path: str) -> str:
    """``path`` made safe to log and to put on the wire (undecodable bytes replaced)."""
    return os.fsencode(path).decode("utf-8", "replace")


class _AcceptedUnix(AcceptedSocket):
    """A connection to a ``streamlocal-forward@openssh.com`` listener."""

    channelName = b"forwarded-streamlocal@openssh.com"

    def channelData(self) -> bytes:
        return common.NS(os.fsencode(self.factory.address)) + common.NS(b"")


class UnixForwardPort(PrivateUnixPort):
    """A Unix listener that unlinks its socket file only if the file is still its own."""

    identity: tuple[int, int] | None = None

    def __init__(self, path: str, factory: Factory, reactor: Any) -> None:
        super().__init__(os.fsencode(path), factory, mode=PRIVATE_SOCKET_MODE, reactor=reactor)
        self.path = path
        self.description = displayPath(path)

    def startListening(self) -> None:
        super().startListening()
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)

    def connectionLost(self, reason: Failure) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass
        # Not unix.Port's: it unlinks the path unconditionally.
        closeUnixPortKeepingFile(self, reason)

    def close(self) -> Deferred[None] | None:
        closing: Deferred[None] | None = self.stopListening()
        return closing


class StreamLocalForwarding:
    """The Unix-socket half of one SSH connection's forwarding."""

    def __init__(self, forwards: Forwards) -> None:
        self.forwards = forwards

    # -- direct-streamlocal@openssh.com -----------------------------------------

    def openDirect(
        self, *, remoteWindow: int, remoteMaxPacket: int, data: bytes, avatar: Any
    ) -> Deferred[RelayChannel]:
        f = self.forwards
        # Decided before the payload is parsed, as upstream does.
        target = _peekPath(data)
        f.checkLocal("unix", target, f"direct-streamlocal to {target}")
        try:
            payload = Payload(data)
            path = payload.path()
            payload.string()  # reserved
            payload.uint32()  # reserved
            payload.end()
        except MalformedPayload as e:
            f.malformed("direct-streamlocal@openssh.com", e)
            raise ConchError(
                "could not parse direct-streamlocal@openssh.com channel payload",
                connection.OPEN_CONNECT_FAILED,
            ) from None
        f.requireDeferredOpens()
        shown = displayPath(path)

        def failureText(e: BaseException | None) -> str:
            why = describeConnectError(e, shown)
            return f"dial unix socket {goQuote(path)}: dial unix {shown}: {why}"

        # Decided on, and connected to, the same normalised path (no "..", symlinks
        # in its directory resolved): "/allowed/../etc/x" is "/etc/x".
        real = normalisePath(path)
        decision = f.policy.localUnix(real, f.key)
        what = f"direct-streamlocal to {displayPath(real)}"
        if not f.decided("local", "unix", decision, what, path):
            raise ConchError(decision.reason, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
        if not fitsSunPath(real):
            # Twisted would only fail inside its connect, after the timeout.
            message = failureText(error.ConnectError(osError=errno.EINVAL))
            log.info(
                "direct-streamlocal from {peer} failed: {message}",
                peer=f.peer(),
                message=message,
            )
            raise ConchError(message, connection.OPEN_CONNECT_FAILED)
        return dial(
            f,
            UNIXClientEndpoint(f.reactor, real, timeout=CONNECT_TIMEOUT),
            request="direct-streamlocal",
            failureText=failureText,
            remoteWindow=remoteWindow,
            remoteMaxPacket=remoteMaxPacket,
            avatar=avatar,
        )

    # -- streamlocal-forward@openssh.com / cancel --------------------------------

    def forward(self, data: bytes) -> int:
        f = self.forwards
        target = _peekPath(data)
        if not f.allowsReverse("unix", target, f"streamlocal-forward on {target}"):
            return 0
        path = _bindRequest(f, data, "streamlocal-forward@openssh.com")
        if path is None:
            return 0
        key = ("unix", path, 0)
        if key in f.listeners:
            return 1  # as OpenSSH: a repeat on the same connection is not an error
        real = normalisePath(path)  # decided on and bound: see openDirect
        decision = f.policy.reverseUnix(real, f.key)
        what = f"streamlocal-forward on {displayPath(real)}"
        if not f.decided("reverse", "unix", decision, what, path):
            return 0
        if not f.admitsReverseForward():
            return 0
        refusal = _refusal(f, real)
        if refusal is not None:
            log.warn(
                "streamlocal-forward on {path} from {peer} refused: {why}",
                path=displayPath(path),
                peer=f.peer(),
                why=refusal,
            )
            return 0
        port = UnixForwardPort(real, ForwardedFactory(f, _AcceptedUnix, path), f.reactor)
        try:
            parent = os.path.dirname(real)
            if parent:
                makePrivateDirs(parent)
            found = removeStale(real)
            if not found.replaceable:
                log.warn(
                    "streamlocal-forward on {path} from {peer} refused: {found} is there "
                    "(only a stale socket is replaced)",
                    path=displayPath(path),
                    peer=f.peer(),
                    found=found.value,
                )
                return 0
            port.startListening()
        except (OSError, error.CannotListenError) as e:
            log.info(
                "streamlocal-forward on {path} from {peer} failed: {error}",
                path=displayPath(path),
                peer=f.peer(),
                error=e,
            )
            return 0
        f.add(key, port)
        log.info("forwarding {path} to {peer}", path=displayPath(path), peer=f.peer())
        return 1

    def cancel(self, data: bytes) -> int:
        f = self.forwards
        path = _bindRequest(f, data, "cancel-streamlocal-forward@openssh.com")
        if path is None:
            return 0
        if not f.remove(("unix", path, 0)):
            log.info("SSH unix forward not found in cache: {path}", path=displayPath(path))
        return 1


def _refusal(f: Forwards, path: str) -> str | None:
    """Why a forward may not listen at ``path`` whatever is there (``None``: it may try)."""
    if not fitsSunPath(path):
        return (
            f"the path is {len(os.fsencode(path))} bytes, longer than a Unix socket "
            f"address allows ({SUN_PATH_MAX})"
        )
    what = f.servedSockets.servedAs(path)
    if what is not None:
        return f"the agent serves its {what} there"
    return None


def _bindRequest(f: Forwards, data: bytes, request: str) -> str | None:
    """The path of a ``streamlocal-forward`` or its cancel (``None``: malformed)."""
    try:
        payload = Payload(data)
        path = payload.path()
        payload.end()
    except MalformedPayload as e:
        f.malformed(request, e)
        return None
    return path


def _peekPath(data: bytes) -> str:
    try:
        return displayPath(os.fsdecode(Payload(data).string()))
    except MalformedPayload:
        return UNPARSED
