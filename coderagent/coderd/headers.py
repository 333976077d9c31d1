"""The HTTP headers the agent sends coderd: token, ``--agent-header``, ``--agent-header-command``.

Upstream adds the same headers to every request its HTTP transport makes, the
RPC WebSocket included: the session token as the ``coder_session_token``
cookie and the ``Coder-Session-Token`` header, each ``--agent-header``
``key=value``, and each ``key=value`` line the header command prints.  A
header command is how deployments behind an authenticating proxy (Cloudflare
Access, IAP) hand the agent short-lived credentials, so it is run once per
connection attempt, not once per process: a credential that expired while
coderd was unreachable is refreshed by the next attempt.

Upstream adds these headers unchecked, and Go's net/http then refuses every
request of a header it cannot send.  :func:`validHeaderName` and
:func:`validHeaderValue` are its rule, the one both the options and the
header command are checked against, so that such a header is refused once,
clearly, instead of by every connection attempt.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from coderagent.deferreds import cancelCall
from coderagent.gotext import goQuote

#: How long the header command may run before the attempt counts as failed.
HEADER_COMMAND_TIMEOUT = 30.0

#: Most output accepted from it: headers, not a log.
MAX_HEADER_OUTPUT = 64 * 1024

#: RFC 7230 ``token``: ASCII letters, digits and ``!#$%&'*+-.^_`|~``.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def validHeaderName(name: str) -> bool:
    """Whether Go's net/http sends a header called ``name``: a non-empty RFC 7230 token.

    This is ``httpguts.ValidHeaderFieldName``; anything else fails the whole
    request with "net/http: invalid header field name".
    """
    return _TOKEN.fullmatch(name) is not None


def validHeaderValue(value: str) -> bool:
    """Whether Go's net/http sends ``value``: no control character but tab.

    This is ``httpguts.ValidHeaderFieldValue``: bytes from 0x80 up (non-ASCII
    text) are allowed; NUL, CR, LF, the other C0 controls and DEL are not.
    """
    return not any((c < " " and c != "\t") or c == "\x7f" for c in value)


class HeaderCommandError(Exception):
    """The header command failed or printed a line that is not ``key=value``."""


class _Collect(ProcessProtocol):
    """Keeps what the command prints on stdout (bounded), drops stderr."""

    def __init__(self, shown: str, done: Deferred[bytes], timeout: float) -> None:
        self.shown = shown
        self.done = done
        self.timeout = timeout
        self.out = bytearray()
        self.timer: IDelayedCall | None = None

    def outReceived(self, data: bytes) -> None:
        if len(self.out) + len(data) > MAX_HEADER_OUTPUT:
            self._fail(f"failed to run {self.shown}: more than {MAX_HEADER_OUTPUT} bytes of output")
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
            return
        self.out += data

    def timedOut(self) -> None:
        self.timer = None
        self._fail(f"failed to run {self.shown}: timed out after {self.timeout:g}s")
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        cancelCall(self.timer)
        value = reason.value
        if isinstance(value, ProcessTerminated):
            if value.signal is not None:
                status = f"signal: {signalName(value.signal)}"
            else:
                status = f"exit status {value.exitCode}"
            self._fail(f"failed to run {self.shown}: {status}")
        elif not self.done.called:
            self.done.callback(bytes(self.out))

    def _fail(self, message: str) -> None:
        if not self.done.called:
            self.done.errback(Failure(HeaderCommandError(message)))


def signalName(number: int) -> str:
    """Go's name for a signal in an exit error (``killed``, ``terminated``…)."""
    return _GO_SIGNAL_NAMES.get(number, f"signal {number}")


_GO_SIGNAL_NAMES: dict[int, str] = {
    signal.SIGKILL: "killed",
    signal.SIGTERM: "terminated",
    signal.SIGINT: "interrupt",
    signal.SIGHUP: "hangup",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
}


def runHeaderCommand(
    reactor: IReactorProcess,
    command: str,
    url: str,
    environ: Mapping[str, str],
    timeout: float = HEADER_COMMAND_TIMEOUT,
) -> Deferred[list[tuple[str, str]]]:
    """Run ``sh -c command`` with ``CODER_URL`` set; one header per stdout line.

    Errors read as upstream's: ``failed to run [sh -c …]: exit status N`` and
    ``split header "…" had less than two parts``.  stderr is discarded, as
    upstream does, so a chatty helper cannot fill the agent's log.  The
    command runs without blocking the reactor: SSH sessions go on meanwhile.
    """
    env = dict(environ)
    env["CODER_URL"] = url
    argv = ["sh", "-c", command]
    shown = "[" + " ".join(argv) + "]"
    done: Deferred[bytes] = Deferred()
    collector = _Collect(shown, done, timeout)
    try:
        reactor.spawnProcess(collector, "/bin/sh", argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as e:
        return fail(HeaderCommandError(f"failed to run {shown}: {e.strerror}"))
    clock: Any = reactor
    collector.timer = clock.callLater(timeout, collector.timedOut)
    return done.addCallback(lambda out: parseHeaderLines(out.decode("utf-8", "replace")))


def parseHeaderLines(output: str) -> list[tuple[str, str]]:
    """``key=value`` per line, split at the first ``=``; any other line is an error.

    Lines end at ``\n``, a ``\r`` before it dropped, as Go's ``bufio.ScanLines``
    reads them (not at every Unicode line boundary, as ``str.splitlines``
    would).  A header Go's net/http could not send is refused here.
    """
    lines = output.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a newline, or was empty
    headers = []
    for line in lines:
        line = line.removesuffix("\r")
        key, equals, value = line.partition("=")
        if not equals:
            raise HeaderCommandError(f"split header {goQuote(line)} had less than two parts")
        if not validHeaderName(key) or not validHeaderValue(value):
            raise HeaderCommandError(f"header {goQuote(line)} is not a valid HTTP header")
        headers.append((key, value))
    return headers


def dialHeaders(token: str, extra: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Every header of the RPC upgrade request, as wsproto wants them."""
    headers = [(k.encode("latin-1"), v.encode("utf-8")) for k, v in extra]
    headers.append((b"Coder-Session-Token", token.encode("utf-8")))
    headers.append((b"Cookie", b"coder_session_token=" + token.encode("utf-8")))
    return headers
