"""The ``session`` channel: shell, exec, PTY, env, signals, SFTP and exit status.

Written instead of using Conch's ``SSHSession`` for one reason above the
others: **the exit status must never be lost**.  Stock Conch answers the
client's CHANNEL_CLOSE at once, even while the child is still being reaped, so
under load ``ssh host cmd`` sometimes exits 255.  Like sshd, this channel keeps
itself open until the process has ended, then sends, in this order, any
buffered output, ``exit-status`` (or ``exit-signal``), EOF and CLOSE.

The channel also applies back-pressure both ways: process output pauses while
the client's window is exhausted, and the client's window is not re-opened
while the process is not reading its stdin.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ssh import channel, common, connection
from twisted.conch.ssh.filetransfer import FileTransferServer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IAddress, IPushProducer, ITransport
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderagent.descriptors import DescriptorReserve
from coderagent.netaddr import describePeer
from coderagent.observe.metrics import AgentMetrics
from coderagent.policy import (
    FILE_TRANSFER_BLOCKED_EXIT_STATUS,
    FILE_TRANSFER_BLOCKED_MESSAGE,
    Policy,
)
from coderagent.policy.keyoptions import KeyOptions
from coderagent.ssh.environment import MAGIC_SESSION_VARIABLES, UserInfo
from coderagent.ssh.events import (
    NoConnectionEvents,
    SessionStatus,
    sessionEnd,
    shown,
    subsystemRefusal,
    transferRefusal,
)
from coderagent.ssh.interfaces import IConnectionEvents, IWindowedChannel
from coderagent.ssh.limits import ConnectionLimits, SSHLimits
from coderagent.ssh.requests import (
    MalformedPayload,
    PtyRequest,
    parseEnv,
    parseExec,
    parsePtyReq,
    parseShell,
    parseSignal,
    parseSubsystem,
    parseWindowChange,
)
from coderagent.ssh.spawn import resizeTerminal, spawnSession
from coderagent.ssh.windows import CHANNEL_MAX_PACKET, CHANNEL_WINDOW
from coderagent.unixsocket import ServedSockets
from coderagent.workspaceenv import WorkspaceEnvironment

log = Logger()

#: Signals a client may send by name, as upstream maps them; anything else is KILL.
SIGNALS: Mapping[str, signal.Signals] = {
    name: getattr(signal, "SIG" + name)
    for name in (
        "ABRT",
        "ALRM",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "KILL",
        "PIPE",
        "QUIT",
        "SEGV",
        "TERM",
        "USR1",
        "USR2",
    )
}

#: Exit status for an internal failure to start the command (upstream's MagicSessionErrorCode).
SESSION_ERROR_EXIT_STATUS = 229


@dataclass
class SessionContext:
    """Everything a session needs from the rest of the agent.

    ``workspace`` is live: services that learn something later (the manifest,
    the boundary socket path) update it and new sessions see it.
    """

    policy: Policy
    reactor: Any
    user: UserInfo
    agentEnvironment: Mapping[str, str]
    workspace: WorkspaceEnvironment | None = None
    sftpServer: Callable[[str], ISFTPServer] | None = None
    metrics: AgentMetrics | None = None
    #: The agent's own socket paths, which forwards may not take.
    servedSockets: ServedSockets = field(default_factory=ServedSockets)
    #: What each connection may hold (see coderagent.ssh.limits).
    limits: SSHLimits = field(default_factory=SSHLimits)
    #: The descriptors forwarding must leave free (None: not enforced).
    descriptors: DescriptorReserve | None = None
    #: What a login shell on a terminal prints first (banners, MOTD: ``ssh.motd``).
    loginMessage: Callable[[], bytes] | None = None
    #: How forwarding resolves a host name (blocking, run in a thread; ``netaddr.resolve``).
    resolver: Callable[[str, int], list[str]] | None = None
    #: Told of every session's start and end and of every refusal (the connection log).
    events: IConnectionEvents = field(default_factory=NoConnectionEvents)

    def __post_init__(self) -> None:
        if self.workspace is None:
            self.workspace = WorkspaceEnvironment(self.agentEnvironment, self.user)


class _SessionProcessProtocol(ProcessProtocol):
    """Relays a child's output into its channel; holds no policy."""

    def __init__(self, chan: SessionChannel) -> None:
        self.chan = chan

    def outReceived(self, data: bytes) -> None:
        self.chan.write(data)

    def errReceived(self, data: bytes) -> None:
        self.chan.writeExtended(connection.EXTENDED_DATA_STDERR, data)

    def processEnded(self, reason: Failure) -> None:
        self.chan.processEnded(reason.value or ProcessTerminated())


@implementer(ITransport)
class _SubsystemTransport:
    """Presents the channel as a transport to a subsystem protocol (SFTP)."""

    def __init__(self, chan: SessionChannel) -> None:
        self.chan = chan

    def write(self, data: bytes) -> None:
        self.chan.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.chan.write(b"".join(data))

    def loseConnection(self) -> None:
        self.chan.finish(0)

    def getPeer(self) -> IAddress:
        peer: IAddress = self.chan.conn.transport.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        host: IAddress = self.chan.conn.transport.transport.getHost()
        return host


@implementer(IPushProducer, IWindowedChannel)
class SessionChannel(channel.SSHChannel):
    """One SSH ``session`` channel and the process or subsystem it runs."""

    name = b"session"
    #: The AgentConnection this channel lives on (Conch types it loosely).
    conn: Any

    def __init__(
        self, context: SessionContext, limits: ConnectionLimits | None = None, **kw: Any
    ) -> None:
        """``limits`` are the connection's (default: a connection of its own)."""
        kw.setdefault("localWindow", CHANNEL_WINDOW)
        kw.setdefault("localMaxPacket", CHANNEL_MAX_PACKET)
        super().__init__(**kw)
        self.context = context
        self.limits = limits if limits is not None else ConnectionLimits(context.limits)
        self.clientEnvironment: list[tuple[str, str]] = []
        #: Bytes of the env requests accepted so far (names and values).
        self.environmentBytes = 0
        self.sessionType = "ssh"
        self.pty: PtyRequest | None = None
        self.process: Any = None
        self.subsystem: Protocol | None = None
        self.sftp: Any = None
        self.command: str | None = None
        #: What the client asked to run when the key's ``command=`` replaced it.
        self.originalCommand: str | None = None
        self.consumerPaused = False
        self.windowCap = self.localWindowSize
        self._started = False
        self._ended = False
        self._finishing: int | tuple[str, bool] | None = None
        self._finished = False
        self._gone = False
        #: Tells the connection log this session ended (see _reportStart).
        self._reportEnd: Callable[[int, str], None] | None = None
        self._endReason: str | None = None

    # -- requests ---------------------------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        handler = self._requestHandlers.get(requestType)
        if handler is None:
            return 0
        try:
            return handler(self, data)
        except MalformedPayload as e:
            log.warn(
                "malformed {request} request on session channel from {peer} refused: {error}",
                request=requestType.decode("ascii", "replace"),
                peer=self._peerText(),
                error=str(e),
            )
            return 0
        except Exception:
            # Conch would turn this into a silent failure reply; a bug of
            # ours must leave a traceback in the log.
            log.failure(
                "session request {request} failed",
                request=requestType.decode("ascii", "replace"),
            )
            return 0

    def _requestEnv(self, data: bytes) -> int:
        name, value = parseEnv(data)
        if self._started:
            return 0
        key = os.fsdecode(name)
        if not key or "=" in key or "\0" in key:
            return 0
        size = len(name) + len(value)
        variables = len(self.clientEnvironment)
        if self.limits.env(variables=variables, used=self.environmentBytes, adding=size):
            return 0
        self.environmentBytes += size
        text = os.fsdecode(value)
        if key == "CODER_SSH_SESSION_TYPE":
            self.sessionType = text.lower() or "ssh"
        if key not in MAGIC_SESSION_VARIABLES:
            self.clientEnvironment.append((key, text))
        return 1

    @property
    def _key(self) -> KeyOptions | None:
        """The options of the key this session's user logged in with."""
        options: KeyOptions | None = getattr(self.avatar, "keyOptions", None)
        return options

    def _requestPty(self, data: bytes) -> int:
        pty = parsePtyReq(data)
        if self._started:
            return 0
        decision = self.context.policy.allowPty(self._key)
        if not decision.allowed:
            log.info(
                "pty-req refused for {peer}: {reason}",
                peer=self._peerText(),
                reason=decision.reason,
            )
            return 0
        self.pty = pty
        return 1

    def _requestWindowChange(self, data: bytes) -> int:
        rows, cols, xpx, ypx = parseWindowChange(data)
        if self.pty is None:
            return 0
        self.pty.winSize = (rows, cols, xpx, ypx)
        if self.process is not None and not self._ended:
            try:
                resizeTerminal(self.process, rows, cols, xpx, ypx)
            except OSError as e:
                log.warn("cannot resize terminal: {error}", error=e)
                return 0
        return 1

    def _requestShell(self, data: bytes) -> int:
        parseShell(data)
        return self._start(None)

    def _requestExec(self, data: bytes) -> int:
        return self._start(parseExec(data))

    def _requestSubsystem(self, data: bytes) -> int:
        name = parseSubsystem(data)
        if self._key is not None and self._key.command is not None:
            # As sshd: a forced command runs instead, SSH_ORIGINAL_COMMAND says what was asked.
            return self._start(None, original=name)
        if self._started:
            return 0
        if name != "sftp":
            self._refuseSubsystem(name)
            return 0
        if self.context.sftpServer is None:
            return 0
        self._started = True
        self._counted(lambda m: m.sessionStarted(self.sessionType, self.pty is not None))
        self._reportStart()
        decision = self.context.policy.allowSubsystem(name)
        if not decision.allowed:
            self._endReason = transferRefusal(name, None)
            log.warn(
                "{reason}: subsystem {subsystem} refused for {peer}",
                reason=decision.reason,
                subsystem=name,
                peer=self._peerText(),
            )
            self._counted(lambda m: m.fileTransfersBlocked.labels("sftp").inc())
            # Nothing is written: sftp would report a garbage packet length.
            self._afterReply(lambda: self.finish(FILE_TRANSFER_BLOCKED_EXIT_STATUS))
            return 1
        self._counted(lambda m: m.sftpConnections.inc())
        self.sftp = self.context.sftpServer(self.context.user.home)
        server = FileTransferServer(avatar=self.sftp)
        self.subsystem = server
        server.makeConnection(_SubsystemTransport(self))
        return 1

    def _refuseSubsystem(self, name: str) -> None:
        """A subsystem we do not have: refused, as sshd does, and in the connection log.

        Upstream accepts the request and ends the session with status 1; the
        reason it reports is the same.
        """
        log.warn(
            "unsupported subsystem {subsystem} refused for {peer}",
            subsystem=shown(name),
            peer=self._peerText(),
        )
        peer = self.conn.transport.transport.getPeer()
        self.context.events.refused(peer, subsystemRefusal(name))

    def _requestSignal(self, data: bytes) -> int:
        name = parseSignal(data)
        sig = SIGNALS.get(name, signal.SIGKILL)
        if self.process is None or self._ended:
            return 0
        try:
            self.process.signalProcess(int(sig))
        except (OSError, ProcessLookupError) as e:
            log.info("signal {name} not delivered: {error}", name=name, error=e)
            return 0
        return 1

    _requestHandlers: Mapping[bytes, Callable[[SessionChannel, bytes], int]] = {
        b"env": _requestEnv,
        b"pty-req": _requestPty,
        b"window-change": _requestWindowChange,
        b"shell": _requestShell,
        b"exec": _requestExec,
        b"subsystem": _requestSubsystem,
        b"signal": _requestSignal,
    }

    # -- starting the process ---------------------------------------------

    def _afterReply(self, f: Callable[[], None]) -> None:
        """Run ``f`` once the reply to the current request has been sent."""
        self.context.reactor.callLater(0, f)

    def _counted(self, count: Callable[[AgentMetrics], None]) -> None:
        if self.context.metrics is not None:
            count(self.context.metrics)

    def _peerText(self) -> str:
        return describePeer(self.conn.transport.transport)

    def _reportStart(self) -> None:
        peer = self.conn.transport.transport.getPeer()
        self._reportEnd = self.context.events.sessionStarted(self.sessionType, peer)

    def _reported(self, status: SessionStatus) -> None:
        """Tell the connection log, once, how the session ended."""
        report, self._reportEnd = self._reportEnd, None
        if report is not None:
            report(*sessionEnd(status, self._endReason))

    def _start(self, requested: str | None, original: str | None = None) -> int:
        if self._started:
            return 0
        self._started = True
        command, forcedOver = self.context.policy.sessionCommand(requested, self._key)
        self.originalCommand = original if original is not None else forcedOver
        self.command = command
        self._counted(lambda m: m.sessionStarted(self.sessionType, self.pty is not None))
        self._reportStart()
        decision = self.context.policy.allowCommand(command)
        if not decision.allowed:
            self._endReason = transferRefusal(None, command)
            self._counted(lambda m: m.fileTransfersBlocked.labels("exec").inc())
            log.warn(
                "{reason}: command {command!r} refused for {peer}",
                reason=decision.reason,
                command=command,
                peer=self._peerText(),
            )

            def refuse() -> None:
                self.write(FILE_TRANSFER_BLOCKED_MESSAGE)
                self.finish(FILE_TRANSFER_BLOCKED_EXIT_STATUS)

            self._afterReply(refuse)
            return 1
        try:
            self._spawn(command)
        except (OSError, ConchError) as e:
            log.error("cannot start session command: {error}", error=e)
            self._counted(
                lambda m: m.sessionFailed(self.sessionType, self.pty is not None, "start_command")
            )
            message = f"coder-agent: cannot start {self.context.user.shell}: {e}\n"
            self._endReason = f"start command: {e}"

            def fail() -> None:
                self.writeExtended(connection.EXTENDED_DATA_STDERR, message.encode())
                self.finish(SESSION_ERROR_EXIT_STATUS)

            self._afterReply(fail)
        return 1

    def _spawn(self, command: str | None) -> None:
        transport = self.conn.transport.transport
        if command is None and self.pty is not None and self.context.loginMessage is not None:
            self.write(self.context.loginMessage())
        forced = self._key is not None and self._key.command is not None
        self.process = spawnSession(
            self.context,
            _SessionProcessProtocol(self),
            command=command,
            pty=self.pty,
            clientEnvironment=self.clientEnvironment,
            peer=transport.getPeer(),
            local=transport.getHost(),
            sessionVariables=(
                {"SSH_ORIGINAL_COMMAND": self.originalCommand}
                if forced and self.originalCommand is not None
                else None
            ),
        )
        # Stdin back-pressure: while the child is not reading, the client's
        # window stays shut (see AgentConnection.reopenWindow).
        self.process.registerProducer(self, True)

    # -- IPushProducer, for the child's stdin --------------------------------

    def pauseProducing(self) -> None:
        self.consumerPaused = True

    def resumeProducing(self) -> None:
        self.consumerPaused = False
        if not self._gone:
            self.conn.reopenWindow(self)

    def stopProducing(self) -> None:
        self.consumerPaused = False

    def _releaseStdin(self) -> None:
        """Stop being the stdin producer before closing it.

        Twisted's FileDescriptor, when drained with a paused producer,
        resumes the producer instead of finishing a pending close; so the
        producer must be gone first or the close never completes.
        """
        self.consumerPaused = False
        self.process.unregisterProducer()

    def _closeStdin(self) -> None:
        self._releaseStdin()
        if self.pty is None:
            self.process.closeStdin()
        else:
            self.process.loseConnection()  # a PTY has one fd: closing it hangs up

    # -- data from the client -----------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.subsystem is not None:
            try:
                self.subsystem.dataReceived(data)
            except Exception:
                # A packet the SFTP server could not take: upstream's "sftp
                # server error", exit status 1.
                log.failure("SFTP session failed")
                self._counted(lambda m: m.sftpErrors.inc())
                self._endReason = "sftp server error"
                self.finish(1)
        elif self.process is not None and not self._ended:
            self.process.write(data)

    def eofReceived(self) -> None:
        if self.subsystem is not None:
            # The SFTP client is done (this is also what keeps Debian's
            # "SendEnv LANG LC_*" from hanging sftp at exit).
            self.finish(0)
        elif self.process is not None and not self._ended:
            if self.pty is None:
                self._closeStdin()
        elif not self._started:
            self.loseConnection()

    # -- back-pressure on output ----------------------------------------------

    def stopWriting(self) -> None:
        if self.process is not None and not self._ended:
            self.process.pauseProducing()

    def startWriting(self) -> None:
        if self.process is not None and not self._ended:
            self.process.resumeProducing()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        if self._finishing is not None and not self.buf and not self.extBuf:
            self._sendFinish()

    # -- ending ----------------------------------------------------------------

    def processEnded(self, reason: BaseException) -> None:
        self._ended = True
        if isinstance(reason, ProcessDone | ProcessTerminated):
            sig = reason.signal
            if sig is not None:
                core = bool(reason.status is not None and os.WCOREDUMP(reason.status))
                try:
                    name = signal.Signals(sig).name[3:]
                except ValueError:
                    name = "KILL"
                self.finish((name, core))
                return
            self.finish(reason.exitCode or 0)
            return
        self.finish(SESSION_ERROR_EXIT_STATUS)

    def finish(self, status: int | tuple[str, bool]) -> None:
        """End the channel with ``status``: an exit code or ``(signal, coreDumped)``.

        Pending output goes first; the status is sent before EOF and CLOSE so
        the client always learns it.
        """
        if self._finishing is not None or self._gone:
            return
        self._finishing = status
        if not self.buf and not self.extBuf:
            self._sendFinish()

    def _sendFinish(self) -> None:
        if self._finished or self._gone:
            return
        self._finished = True
        status = self._finishing
        self._reported(status)
        if isinstance(status, tuple):
            name, core = status
            payload = (
                common.NS(name.encode())
                + (b"\x01" if core else b"\x00")
                + common.NS(b"")
                + common.NS(b"")
            )
            self.conn.sendRequest(self, b"exit-signal", payload)
        else:
            self.conn.sendRequest(
                self, b"exit-status", struct.pack(">L", int(status or 0) & 0xFFFFFFFF)
            )
        self.conn.sendEOF(self)
        self.loseConnection()

    def closeReceived(self) -> None:
        # sshd's rule: the channel outlives the client's CLOSE until the
        # child has been reaped and its status sent.
        if self.process is not None and not self._ended:
            self._closeStdin()
            return
        if self.subsystem is not None:
            self.finish(0)
            return
        self.loseConnection()

    def closed(self) -> None:
        self._gone = True
        self._reported(self._finishing)  # if the status could not be sent
        if self.process is not None and not self._ended:
            # Connection gone: hang up a terminal; close a plain command's
            # pipes and let it finish, as sshd does.
            self._releaseStdin()
            self.process.loseConnection()
        if self.subsystem is not None:
            subsystem, self.subsystem = self.subsystem, None
            subsystem.connectionLost(Failure(ConchError("session closed")))
        if self.sftp is not None:
            # Also closes files whose OPEN was still running in a thread.
            self.sftp.connectionLost()
