# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Each private Twisted name in ``coderagent.compat``, against the installed Twisted.

These tests are about Twisted, not about the agent: each checks that a name
``compat`` relies on still exists and still behaves as ``compat`` says.  A
failure here after a Twisted upgrade names what changed; fix ``compat`` (and
only ``compat``) before moving ``setup.cfg``'s upper bound.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import ClientService
from twisted.conch.ssh import transport
from twisted.conch.ssh.transport import SSHCiphers, SSHTransportBase
from twisted.internet import defer, error, protocol, reactor, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import (
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from coderagent import compat

MSG_CHANNEL_DATA = 94
MSG_SERVICE_ACCEPT = 6
MSG_KEXDH_INIT = 30


def _plain() -> SSHCiphers:
    ciphers = SSHCiphers(b"none", b"none", b"none", b"none")
    ciphers.setKeys(b"", b"", b"", b"", b"", b"")
    return ciphers


class _Recording(SSHTransportBase):
    """A Conch transport that counts how often a key exchange is started."""

    isClient = False
    supportedPublicKeys = [b"ssh-ed25519"]
    kexInits = 0

    def sendKexInit(self) -> None:
        self.kexInits += 1
        super().sendKexInit()


def _idle() -> tuple[_Recording, StringTransport]:
    """A transport between key exchanges, writing to ``wire``."""
    t = _Recording()
    wire = StringTransport()
    t.transport = wire
    t.currentEncryptions = _plain()
    t.outgoingPacketSequence = 0
    t.outgoingCompressionType = t.incomingCompressionType = b"none"
    return t, wire


def _packets(data: bytes) -> list[bytes]:
    """What Conch's own reader makes of ``data``: message type byte + payload each."""
    reader = SSHTransportBase()
    reader.currentEncryptions = _plain()
    reader.incomingPacketSequence = 0
    reader.buf = data
    out = []
    while (packet := reader.getPacket()) is not None:
        out.append(packet)
    assert reader.buf == b""
    return out


# -- key exchange ---------------------------------------------------------------


def test_a_key_exchange_runs_from_sendKexInit_to_newKeys_and_holds_packets_back() -> None:
    t, wire = _idle()
    assert compat.inKeyExchange(t) is False
    t.sendKexInit()
    assert compat.inKeyExchange(t) is True
    # Key exchange messages may go; connection-layer ones and a service
    # accept wait (RFC 4253 section 7.1).
    assert compat.holdForKeyExchange(t, MSG_KEXDH_INIT, [b"x"]) is False
    assert compat.holdForKeyExchange(t, MSG_CHANNEL_DATA, (b"ab", memoryview(b"cd"))) is True
    assert compat.holdForKeyExchange(t, MSG_SERVICE_ACCEPT, (b"svc",)) is True
    sent = len(wire.value())
    t.nextEncryptions = _plain()
    t._newKeys()
    assert compat.inKeyExchange(t) is False
    assert _packets(wire.value()[sent:]) == [bytes([MSG_CHANNEL_DATA]) + b"abcd", b"\x06svc"]


def test_the_peers_kexinit_starts_a_key_exchange_through_sendKexInit() -> None:
    peer, _ = _idle()
    peer.sendKexInit()
    t, _ = _idle()
    t.ssh_KEXINIT(peer.ourKexInitPayload[1:])
    assert t.kexInits == 1
    assert compat.inKeyExchange(t) is True


def test_answering_a_kexinit_is_what_conchs_ssh_KEXINIT_does() -> None:
    # Both sides send KEXINIT at once: ours went first, so the peer's
    # moves the exchange on without a second KEXINIT from us...
    peer, _ = _idle()
    peer.sendKexInit()
    for answer in (compat.answerKexInit, None):
        t, wire = _idle()
        t.sendKexInit()
        sent = len(wire.value())
        if answer is None:
            t.ssh_KEXINIT(peer.ourKexInitPayload[1:])  # Conch's own
        else:
            answer(t)
        assert (t.kexInits, len(wire.value()) == sent) == (1, True)
        assert t._keyExchangeState == t._KEY_EXCHANGE_PROGRESSING
    # ... and between exchanges the peer's KEXINIT is answered with ours.
    t, wire = _idle()
    compat.answerKexInit(t)
    assert t.kexInits == 1 and compat.inKeyExchange(t) is True
    assert [p[0] for p in _packets(wire.value())] == [transport.MSG_KEXINIT]


def test_ext_info_goes_only_to_a_peer_that_said_it_supports_it() -> None:
    for supported in (False, True):
        t, wire = _idle()
        compat.setPeerSupportsExtensions(t, supported)
        t.sendExtInfo([(b"server-sig-algs", b"ssh-ed25519")])
        expected = [b"\x07" + b"\0\0\0\x01" + b"\0\0\0\x0fserver-sig-algs\0\0\0\x0bssh-ed25519"]
        assert _packets(wire.value()) == (expected if supported else [])


def test_a_wrong_guess_drops_exactly_one_key_exchange_packet() -> None:
    t = transport.SSHServerTransport()
    t.transport = StringTransport()
    compat.skipNextKexPacket(t)
    t.ssh_KEX_DH_GEX_REQUEST_OLD(b"the guess")  # dropped: not even parsed
    assert not t.ignoreNextPacket and t.transport.value() == b""
    t.kexAlg = b"curve25519-sha256"
    # The next one is handled: it gets as far as looking up the host key.
    with pytest.raises(AttributeError, match="keyAlg"):
        t.ssh_KEX_DH_GEX_REQUEST_OLD(b"not a key")


def test_the_state_it_reads_is_conchs() -> None:
    assert SSHTransportBase._keyExchangeState == SSHTransportBase._KEY_EXCHANGE_NONE
    assert SSHTransportBase._blockedByKeyExchange is None
    allowed = SSHTransportBase()._allowedKeyExchangeMessageType
    assert [allowed(n) for n in (transport.MSG_KEXINIT, MSG_KEXDH_INIT, MSG_CHANNEL_DATA)] == [
        False,
        True,
        False,
    ]


# -- strports ---------------------------------------------------------------------


def test_server_descriptions_are_parsed_without_a_reactor() -> None:
    assert compat.parseServerDescription("tcp:2222:interface=127.0.0.1") == (
        "TCP",
        (2222, None),
        {"interface": "127.0.0.1", "backlog": 50},
    )
    assert compat.parseServerDescription("unix:/run/a.sock:mode=600") == (
        "UNIX",
        ("/run/a.sock", None),
        {"mode": 0o600, "backlog": 50, "wantPID": True},
    )
    with pytest.raises(ValueError, match="Unknown endpoint type"):
        compat.parseServerDescription("bogus:1")
    with pytest.raises(ValueError):
        compat.parseServerDescription("tcp:port")


# -- Unix listening ports ---------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="compat", dir="/tmp") as d:
        yield Path(d)


class _KeepsFile(unix.Port):
    def connectionLost(self, reason: Failure) -> None:
        compat.closeUnixPortKeepingFile(self, reason)


def _refused(path: Path) -> bool:
    """Whether connecting to ``path`` is refused: a socket file nobody listens on."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except ConnectionRefusedError:
            return True
        return False


@pytest_twisted.inlineCallbacks
def test_a_unix_port_closes_fully_but_keeps_its_file(sockdir: Path) -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    assert issubclass(unix.Port, tcp.Port)
    factory = Factory.forProtocol(Protocol)
    kept, removed = sockdir / "kept.sock", sockdir / "removed.sock"
    port = _KeepsFile(os.fsencode(kept), factory, reactor=reactor)
    port.startListening()
    plain = unix.Port(os.fsencode(removed), factory, reactor=reactor)
    plain.startListening()
    yield port.stopListening()
    yield plain.stopListening()
    assert stat.S_ISSOCK(os.lstat(kept).st_mode) and _refused(kept)
    assert not port.connected and port.fileno() == -1
    assert not removed.exists()  # what unix.Port itself would have done


# -- child processes ----------------------------------------------------------------


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest_twisted.inlineCallbacks
def test_the_reactors_children_are_known_until_reaped() -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    protocol = _Ended()
    child = reactor.spawnProcess(protocol, "/bin/cat", ["cat"], env={})
    assert child.pid in compat.reactorChildren()
    child.closeStdin()
    yield protocol.ended
    assert child.pid not in compat.reactorChildren()


def _posixSpawn(calls: list[tuple[Any, ...]]) -> Any:
    """A starter on os.posix_spawn that records what Twisted asked for."""

    def start(
        executable: bytes,
        args: list[bytes],
        environment: dict[bytes, bytes],
        path: bytes | None,
        fdmap: dict[int, int] | None,
        tty: bytes | None,
    ) -> int:
        calls.append((executable, args, environment, path, fdmap, tty))
        if tty is not None:
            actions = [(os.POSIX_SPAWN_OPEN, 0, tty, os.O_RDWR, 0)]
            actions += [(os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
        else:
            assert fdmap is not None
            actions = [(os.POSIX_SPAWN_DUP2, fdmap[n], n) for n in (0, 1, 2)]
        return os.posix_spawn(executable, args, environment, file_actions=actions)

    return start


class _Output(_Ended):
    def __init__(self) -> None:
        super().__init__()
        self.out = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data


@pytest_twisted.inlineCallbacks
def test_a_child_spawned_in_a_new_session_leads_its_own_group() -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    protocol = _Output()
    # /proc/self/stat of the shell: fields 5 and 6 (after the command) are pgrp and sid.
    script = 'read -r stat < /proc/self/stat; set -- ${stat##*) }; echo "$$ $3 $4"; cat'
    child = compat.spawnInNewSession(
        reactor, protocol, "/bin/sh", ["sh", "-c", script], {"PATH": "/bin:/usr/bin"}, "/"
    )
    assert child.pid in compat.reactorChildren()
    child.write(b"through stdin\n")
    child.closeStdin()
    yield protocol.ended
    pid, pgrp, sid = protocol.out.split(b"\n")[0].split()
    assert pid == pgrp == sid != str(os.getpid()).encode()
    assert protocol.out.endswith(b"through stdin\n")


@pytest_twisted.inlineCallbacks
def test_a_process_can_be_started_by_another_hand_than_fork() -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    calls: list[tuple[Any, ...]] = []
    protocol = _Output()
    child = compat.StartedProcess(
        _posixSpawn(calls), reactor, b"/bin/cat", [b"cat"], {b"A": b"1"}, b"/tmp", protocol
    )
    ((executable, args, environment, path, fdmap, tty),) = calls
    assert (executable, args, environment, path, tty) == (
        b"/bin/cat",
        [b"cat"],
        {b"A": b"1"},
        b"/tmp",
        None,
    )
    assert sorted(fdmap) == [0, 1, 2]
    assert child.pid in compat.reactorChildren()
    child.write(b"piped")
    child.closeStdin()
    yield protocol.ended
    assert protocol.out == b"piped"
    assert child.pid not in compat.reactorChildren()


@pytest_twisted.inlineCallbacks
def test_a_pty_process_can_be_started_by_another_hand_than_fork() -> Iterator[Deferred[Any]]:
    from twisted.internet import reactor

    calls: list[tuple[Any, ...]] = []
    protocol = _Output()
    master, slave = os.openpty()
    name = os.ttyname(slave)
    child = compat.StartedPTYProcess(
        _posixSpawn(calls),
        reactor,
        b"/bin/echo",
        [b"echo", b"on-the-pty"],
        {},
        None,
        protocol,
        usePTY=(master, slave, name),
    )
    assert calls[0][-1] == os.fsencode(name)
    assert child.fileno() == master
    with pytest.raises(OSError):
        os.fstat(slave)  # the parent's slave is closed once the child runs
    yield protocol.ended
    assert protocol.out == b"on-the-pty\r\n"


def test_spawn_file_actions_relocate_before_overwriting() -> None:
    # The child wants the parent's 1 on 0 and the parent's 0 on 1: a swap.
    close, dup2 = 0, 1
    actions = compat.spawnFileActions(
        [(0, False), (1, False), (5, False)], {0: 1, 1: 0}, close, dup2
    )
    fds = {0: "a", 1: "b", 5: "c"}
    for action in actions:
        if action[0] == dup2:
            fds[action[2]] = fds[action[1]]
        else:
            del fds[action[1]]
    assert (fds[0], fds[1]) == ("b", "a")
    assert 5 not in fds  # an inheritable descriptor nobody asked for is closed


class _Collecting(Protocol):
    def __init__(self, want: int) -> None:
        self.want = want
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.want and not self.done.called:
            self.done.callback(self.received)


@pytest_twisted.inlineCallbacks
def _connectedPair(want: int) -> Iterator[Any]:
    from twisted.internet import endpoints, reactor

    server = _Collecting(want)
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: server)
    )
    client = yield endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
    )
    return port, server, client


@pytest_twisted.inlineCallbacks
def test_send_now_writes_an_idle_socket_at_once_and_keeps_order() -> Iterator[Deferred[Any]]:
    pieces = [b"first ", memoryview(b"second ").tobytes(), b"third"]
    port, server, client = yield _connectedPair(len(b"".join(pieces)) + 5)
    try:
        transport = client.transport
        assert compat.canSendNow(transport)
        compat.sendNow(transport, pieces)
        # Nothing was left to Twisted's buffers: it went out in this call.
        assert transport.dataBuffer == b"" and transport._tempDataBuffer == []
        # Behind data Twisted still holds, pieces queue up in order.
        transport.write(b"[q]")
        compat.sendNow(transport, [b"!!"])
        assert transport._tempDataBuffer == [b"[q]", b"!!"]
        received = yield server.done
        assert received == b"first second third[q]!!"
    finally:
        client.transport.loseConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_what_the_kernel_does_not_take_is_left_to_twisted_in_order() -> Iterator[Deferred[Any]]:
    big = bytes(range(256)) * 16384  # 4 MiB: more than loopback's buffers hold
    pieces = [b"<", big, b">"]
    port, server, client = yield _connectedPair(len(big) + 2)
    try:
        server.transport.pauseProducing()  # the peer reads nothing for now
        compat.sendNow(client.transport, pieces)
        assert client.transport._tempDataBuffer  # only part of it went out
        server.transport.resumeProducing()
        received = yield server.done
        assert received == b"<" + big + b">"
    finally:
        client.transport.loseConnection()
        yield port.stopListening()


def test_send_now_is_only_for_plain_sockets() -> None:
    assert not compat.canSendNow(StringTransport())


# -- log namespaces -----------------------------------------------------------------


class _Refusing:
    def connect(self, factory: Any) -> Deferred[Any]:
        return defer.fail(error.ConnectionRefusedError())


def test_client_service_logs_its_retries_under_the_namespace() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    service = ClientService(_Refusing(), Factory.forProtocol(Protocol), clock=Clock())
    try:
        service.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
        service.stopService()
    [retry] = [e for e in events if "Scheduling retry" in e.get("log_format", "")]
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    levels.setLogLevelForNamespace(compat.CLIENT_SERVICE_LOG_NAMESPACE, LogLevel.warn)
    assert levels(retry) == PredicateResult.no


# -- countWrites -------------------------------------------------------------------


class _Counter:
    txBytes = 0


class _Sink(protocol.Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.done: defer.Deferred[int] = defer.Deferred()
        self.want = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.want and not self.done.called:
            self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_bytes_written_are_counted_as_they_leave_the_socket() -> None:
    sink = _Sink()
    sink.want = 3 * 1024 * 1024
    factory = protocol.Factory.forProtocol(lambda: sink)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        counter = _Counter()
        assert compat.countWrites(client.transport, counter)
        for _ in range(48):
            client.transport.write(b"x" * 65536)
        assert counter.txBytes < sink.want  # buffered, not yet sent
        await sink.done
        assert counter.txBytes == sink.want
        client.transport.loseConnection()
    finally:
        await port.stopListening()


def test_log_files_are_opened_through_open_file_first_and_after_each_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PrivateLogFile replaces ``LogFile._openFile``; it must be how every file is opened."""
    umasks: list[int] = []
    realUmask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: umasks.append(mask) or realUmask(mask))
    old = realUmask(0)
    try:
        logFile = compat.PrivateLogFile("agent.log", str(tmp_path), rotateLength=10)
        logFile.write("0123456789")
        logFile.write("rotated")  # over rotateLength: rotates first
        logFile.close()
    finally:
        realUmask(old)
    assert umasks == []  # LogFile's own _openFile flips the process's umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.log", "agent.log.1"]
    assert (tmp_path / "agent.log").read_text() == "rotated"
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_twisteds_log_file_still_flips_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why PrivateLogFile exists: if this fails, Twisted fixed it and it can go."""
    from twisted.python.logfile import LogFile

    umasks: list[int] = []
    realUmask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: umasks.append(mask) or realUmask(mask))
    LogFile("agent.log", str(tmp_path), defaultMode=0o600).close()
    assert umasks[0] == 0o777
