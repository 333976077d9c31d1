"""The agent's DRPC client and coderd-dev's server against storj.io/drpc: Go's bytes, behaviour.

``coderagent.coderd.drpc`` and ``coderagent.devcoderd.drpcserver``, alone, back
to back and over yamux; the wire format itself is ``tests/test_drpcwire.py``'s.
Expected bytes are written out by hand from the drpc wire format, or taken from
the streams recorded from the real Go library (``tests/golden``), never from
our own encoder.  Both sides run over ``StringTransport``s, joined by an
in-memory pump where they talk to each other: no sockets, no sleeps.
"""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from coderagent.coderd.drpc import (
    DRPCCanceledError,
    DRPCClientProtocol,
    DRPCConnectionLost,
    DRPCEOFError,
)
from coderagent.coderd.drpcwire import DRPCError, ProtocolError, encodeVarint
from coderagent.coderd.yamux import YamuxSession
from coderagent.devcoderd.drpcserver import DRPCServerProtocol
from tests.drpcbytes import CHUNKINGS, METHOD, MIB, H, W, decodeFrames, hexOf, largeRequest
from tests.vectors import canonicalStreams, load, variants

# Every plain-DRPC vector (the *_over_yamux ones are at the end of this file).
PLAIN_VECTORS = [
    "drpc_unary",
    "drpc_error",
    "drpc_unknown_method",
    "drpc_large",
    "drpc_unary_metadata",
    "drpc_unary_nil_response",
    "drpc_plain_error",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class RecordingTransport(StringTransport):
    """A StringTransport that also remembers the size of every write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        super().write(data)


def feed(proto: Any, data: bytes, chunk: int | None) -> None:
    if chunk is None:
        proto.dataReceived(data)
        return
    for i in range(0, len(data), chunk):
        proto.dataReceived(data[i : i + chunk])


def take(t: StringTransport) -> bytes:
    value = t.value()
    t.clear()
    return value


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure for an error); fails if it has not fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def failureOf(d: Deferred[Any], kind: type[BaseException]) -> Any:
    result = outcome(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    assert isinstance(result.value, kind), repr(result.value)
    return result.value


def requestOf(vector: dict[str, Any]) -> bytes:
    if "request_hex" in vector:
        return H(vector["request_hex"])
    return largeRequest()


def canonicalVariant(name: str) -> dict[str, Any]:
    (variant,) = [v for v in variants(name) if v.get("canonical")]
    return variant


def goHandler(vector: dict[str, Any], seen: list[Any]) -> Any:
    """Our handler doing what the Go handler of ``vector`` did (its ``handler_returns``)."""
    returns = vector.get("handler_returns", "")

    def handler(request: bytes, metadata: dict[str, str]) -> bytes | None:
        seen.append((request, metadata))
        if returns.startswith("non-nil empty"):
            return b""
        if returns == "typed nil pointer":
            return None
        if returns == 'drpcerr.WithCode(errors.New("boom"), 7)':
            raise DRPCError(7, "boom")
        if returns == 'errors.New("boom")':
            raise Exception("boom")
        if returns == "echo of the request bytes":
            return request
        raise AssertionError(f"unexpected handler behaviour {returns!r}")

    return handler


def checkResult(result: Any, expected: dict[str, Any]) -> None:
    """Compare a call's outcome with a vector's ``client_side_result``."""
    if "error" in expected:
        assert isinstance(result, Failure), repr(result)
        exc = result.value
        if expected["error"] == "EOF":
            assert isinstance(exc, DRPCEOFError)
            assert str(exc) == "EOF"
        else:
            assert isinstance(exc, DRPCError)
            assert exc.message == expected["error"]
            assert exc.code == expected.get("error_code", 0)
        return
    assert isinstance(result, bytes), repr(result)
    assert len(result) == expected["response_len"]
    if "response_hex" in expected:
        assert result == H(expected["response_hex"])
    else:
        assert hashlib.sha256(result).hexdigest() == expected["response_sha256"]


def client() -> tuple[DRPCClientProtocol, RecordingTransport]:
    t = RecordingTransport()
    proto = DRPCClientProtocol()
    proto.makeConnection(t)
    return proto, t


def server(handlers: dict[str, Any], **kw: Any) -> tuple[DRPCServerProtocol, RecordingTransport]:
    t = RecordingTransport()
    proto = DRPCServerProtocol(handlers, **kw)
    proto.makeConnection(t)
    return proto, t


class Pair:
    """Our client and our server joined by an in-memory pump."""

    def __init__(self, handlers: dict[str, Any], **serverKw: Any) -> None:
        self.client, self.ct = client()
        self.server, self.st = server(handlers, **serverKw)
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.lost = False

    def pump(self) -> None:
        for _ in range(100000):
            c = take(self.ct)
            s = take(self.st)
            if not c and not s:
                if not self.lost and (self.ct.disconnecting or self.st.disconnecting):
                    self.lost = True
                    self.client.connectionLost(Failure(error.ConnectionDone()))
                    self.server.connectionLost(Failure(error.ConnectionDone()))
                return
            self.c2s += c
            self.s2c += s
            if c:
                self.server.dataReceived(c)
            if s:
                self.client.dataReceived(s)
        raise AssertionError("pump did not settle")

    def call(self, request: bytes, method: str = METHOD, **kw: Any) -> Any:
        d = self.client.invoke(method, request, **kw)
        self.pump()
        return outcome(d)



# ---------------------------------------------------------------------------
# golden vectors: our client against Go's server bytes, our server against Go's client
# ---------------------------------------------------------------------------


def _withoutTrailingClose(vector: dict[str, Any], c2s: bytes) -> bytes:
    """What the client has written before the response: all but a final Close."""
    last = vector["client_to_server_frames"][-1]
    if last["kind_name"] == "Close":
        assert c2s[last["offset"] :] == H(last["header_hex"])
        return c2s[: last["offset"]]
    return c2s


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("name", PLAIN_VECTORS)
def test_vector_client(name: str, chunk: int | None) -> None:
    vector = load(name)
    c2s, s2c = canonicalStreams(name)
    proto, t = client()
    d = proto.invoke(vector["method"], requestOf(vector), vector.get("metadata"))

    def closeLikeDrpcsdk(result: Any) -> Any:  # coder closes the drpc conn after Invoke
        t.loseConnection()
        return result

    d.addBoth(closeLikeDrpcsdk)
    assert t.value() == _withoutTrailingClose(vector, c2s)
    feed(proto, s2c, chunk)
    assert t.value() == c2s
    assert t.disconnecting
    variant = canonicalVariant(name)
    checkResult(outcome(d), variant["client_side_result"])
    assert t.writes in variant["write_call_sizes_client_side_seen"]
    proto.connectionLost(Failure(error.ConnectionDone()))


def _variantStreams(name: str, variant: dict[str, Any]) -> tuple[bytes, bytes]:
    """A variant's streams: its own hex, or (large scenario) the canonical streams
    less their optional last frame, picked by the recorded sha256."""
    c2s, s2c = canonicalStreams(name)
    out = []
    for direction, canonical in (("client_to_server", c2s), ("server_to_client", s2c)):
        if variant.get("canonical"):
            out.append(canonical)
        elif f"{direction}_hex" in variant:
            out.append(H(variant[f"{direction}_hex"]))
        else:
            wanted = variant[f"{direction}_sha256"]
            (match,) = [
                c for c in (canonical, canonical[:-4]) if hashlib.sha256(c).hexdigest() == wanted
            ]
            out.append(match)
    return out[0], out[1]


ALL_VARIANTS = [(n, i) for n in PLAIN_VECTORS for i in range(len(variants(n)))]


@pytest.mark.parametrize(("name", "index"), ALL_VARIANTS)
def test_vector_client_accepts_every_go_variant(name: str, index: int) -> None:
    """Every server stream Go produced is understood; our client writes the
    canonical client stream (Close included) whatever the server did."""
    vector = load(name)
    variant = variants(name)[index]
    _, s2c = _variantStreams(name, variant)
    proto, t = client()
    d = proto.invoke(vector["method"], requestOf(vector), vector.get("metadata"))
    feed(proto, s2c, 5)
    assert t.value() == canonicalStreams(name)[0]
    expected = variant.get("client_side_result") or canonicalVariant(name)["client_side_result"]
    checkResult(outcome(d), expected)


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("name", PLAIN_VECTORS)
def test_vector_server(name: str, chunk: int | None) -> None:
    vector = load(name)
    c2s, s2c = canonicalStreams(name)
    seen: list[Any] = []
    proto, t = server({METHOD: goHandler(vector, seen)}, passMetadata=True)
    feed(proto, c2s, chunk)
    assert t.value() == s2c
    assert not t.disconnecting  # Go's server closes only once it reads EOF
    if vector["method"] == METHOD:
        assert seen == [(requestOf(vector), vector.get("metadata", {}))]
    else:
        assert seen == []  # drpcmux answers an unknown method before reading the request
    assert t.writes in canonicalVariant(name)["write_call_sizes_server_side_seen"]
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert t.value() == s2c


@pytest.mark.parametrize(("name", "index"), ALL_VARIANTS)
def test_vector_server_accepts_every_go_variant(name: str, index: int) -> None:
    vector = load(name)
    c2s, _ = _variantStreams(name, variants(name)[index])
    proto, t = server({METHOD: goHandler(vector, [])}, passMetadata=True)
    feed(proto, c2s, 3)
    assert t.value() == canonicalStreams(name)[1]


def test_vector_metadata_reaches_a_plain_handler_only_when_asked() -> None:
    c2s, s2c = canonicalStreams("drpc_unary_metadata")
    seen: list[bytes] = []

    def handler(request: bytes) -> bytes:
        seen.append(request)
        return b""

    proto, t = server({METHOD: handler})
    proto.dataReceived(c2s)
    assert t.value() == s2c
    assert seen == [H(load("drpc_unary_metadata")["request_hex"])]


# ---------------------------------------------------------------------------
# our client and our server, back to back
# ---------------------------------------------------------------------------


def echo(request: bytes) -> bytes:
    return request


def test_200_sequential_calls_on_one_connection() -> None:
    pair = Pair({METHOD: echo})
    for i in range(200):
        request = b"req-%d" % i
        assert pair.call(request) == request
    frames = decodeFrames(bytes(pair.c2s))
    assert len(frames) == 800
    for i in range(200):
        stream = i + 1
        ids = [(c, s, m) for c, s, m, _ in frames[4 * i : 4 * i + 4]]
        assert ids == [(0x03, stream, 1), (0x05, stream, 2), (0x0D, stream, 3), (0x0B, stream, 4)]
    replies = decodeFrames(bytes(pair.s2c))
    assert [(c, s, m) for c, s, m, _ in replies[:4]] == [
        (0x05, 1, 1),
        (0x0D, 1, 2),
        (0x05, 2, 1),
        (0x0D, 2, 2),
    ]
    assert not pair.ct.disconnecting and not pair.st.disconnecting


def test_calls_made_together_go_out_one_at_a_time() -> None:
    pair = Pair({METHOD: echo})
    ds = [pair.client.invoke(METHOD, b"%d" % i) for i in range(3)]
    first = take(pair.ct)
    assert first == W("03 01 01 28" + hexOf(METHOD), "05 01 02 01 30", "0d 01 03 00")
    pair.server.dataReceived(first)
    pair.pump()
    assert [outcome(d) for d in ds] == [b"0", b"1", b"2"]
    assert [s for c, s, _, _ in decodeFrames(bytes(pair.c2s)) if c == 0x03] == [2, 3]


def test_three_mib_request_and_response() -> None:
    request = random.Random(1).randbytes(3 * MIB)
    pair = Pair({METHOD: lambda r: r[::-1]})
    assert pair.call(request) == request[::-1]
    sizes = [len(d) for c, _, _, d in decodeFrames(bytes(pair.c2s)) if c in (0x04, 0x05)]
    assert sizes == [65536] * 48


def test_handler_error_with_code() -> None:
    def fails(request: bytes) -> bytes:
        raise DRPCError(42, "nope")

    pair = Pair({METHOD: fails})
    result = pair.call(b"x")
    assert isinstance(result, Failure) and isinstance(result.value, DRPCError)
    assert (result.value.code, result.value.message) == (42, "nope")
    assert bytes(pair.s2c) == W("07 01 01 0c 000000000000002a" + hexOf("nope"))
    # no Close after an Error
    assert bytes(pair.c2s).endswith(W("0d 01 03 00"))


def test_unknown_method() -> None:
    pair = Pair({METHOD: echo})
    result = pair.call(b"x", method="/coder.agent.v2.Agent/Nope")
    assert isinstance(result, Failure) and isinstance(result.value, DRPCError)
    assert result.value.code == 0
    assert result.value.message == 'protocol error: unknown rpc: "/coder.agent.v2.Agent/Nope"'


def test_plain_exception_is_code_0() -> None:
    def fails(request: bytes) -> bytes:
        raise ValueError("bad request: 3")

    pair = Pair({METHOD: fails})
    result = pair.call(b"x")
    assert isinstance(result, Failure) and isinstance(result.value, DRPCError)
    assert (result.value.code, result.value.message) == (0, "bad request: 3")


def test_deferred_handler() -> None:
    clock = Clock()

    def later(request: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        clock.callLater(1, d.callback, b"later:" + request)
        return d

    pair = Pair({METHOD: later})
    d = pair.client.invoke(METHOD, b"x")
    pair.pump()
    assert not d.called
    clock.advance(1)
    pair.pump()
    assert outcome(d) == b"later:x"


def test_metadata_passed_to_the_handler() -> None:
    seen: list[Any] = []
    pair = Pair({METHOD: lambda r, md: seen.append(md) or b"ok"}, passMetadata=True)
    assert pair.call(b"x", metadata={"k": "v", "trace": "1"}) == b"ok"
    assert pair.call(b"y") == b"ok"
    assert pair.call(b"z", metadata={}) == b"ok"  # empty metadata: no InvokeMetadata (Go)
    assert seen == [{"k": "v", "trace": "1"}, {}, {}]
    kinds = [c for c, _, _, _ in decodeFrames(bytes(pair.c2s))]
    assert kinds.count(0x0F) == 1


def test_nil_response_is_eof() -> None:
    pair = Pair({METHOD: lambda r: None})
    result = pair.call(b"x")
    assert isinstance(result, Failure) and isinstance(result.value, DRPCEOFError)
    assert bytes(pair.s2c) == W("0d 01 01 00")
    assert bytes(pair.c2s).endswith(W("0d 01 03 00"))  # no Close


def test_response_of_exactly_4_mib_is_accepted() -> None:
    pair = Pair({METHOD: lambda r: bytes(4 * MIB)})
    assert pair.call(b"x") == bytes(4 * MIB)


def test_response_over_4_mib_is_a_protocol_error() -> None:
    pair = Pair({METHOD: lambda r: bytes(4 * MIB + 1)})
    d = pair.client.invoke(METHOD, b"x")
    pair.pump()
    e = failureOf(d, ProtocolError)
    assert str(e) == "data overflow"
    assert pair.ct.disconnecting
    later = failureOf(pair.client.invoke(METHOD, b"x"), ProtocolError)
    assert str(later) == "data overflow"


def test_request_over_4_mib_closes_the_server() -> None:
    called: list[bytes] = []
    pair = Pair({METHOD: lambda r: called.append(r) or b""})
    d = pair.client.invoke(METHOD, bytes(4 * MIB + 1))
    pair.pump()
    assert called == []
    assert pair.st.disconnecting
    assert bytes(pair.s2c) == b""
    failureOf(d, DRPCConnectionLost)


# ---------------------------------------------------------------------------
# client behaviour on hand-written server bytes
# ---------------------------------------------------------------------------

INVOKE_X = W("03 01 01 28" + hexOf(METHOD), "05 01 02 01 78", "0d 01 03 00")


def test_client_writes_one_call_in_one_write() -> None:
    proto, t = client()
    proto.invoke(METHOD, b"x")
    assert t.value() == INVOKE_X
    assert t.writes == [len(INVOKE_X)]


def test_client_connection_lost_before_the_response() -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    queued = proto.invoke(METHOD, b"y")
    proto.connectionLost(Failure(error.ConnectionDone()))
    e = failureOf(d, DRPCConnectionLost)
    assert isinstance(e, error.ConnectionLost)
    assert "closed before the call completed" in str(e)
    failureOf(queued, DRPCConnectionLost)
    failureOf(proto.invoke(METHOD, b"z"), DRPCConnectionLost)
    assert t.value() == INVOKE_X


def test_client_invoke_before_connection_made_waits() -> None:
    proto = DRPCClientProtocol()
    d = proto.invoke(METHOD, b"x")
    t = StringTransport()
    proto.makeConnection(t)
    assert t.value() == INVOKE_X
    proto.dataReceived(W("05 01 01 02 6f6b"))
    assert outcome(d) == b"ok"
    assert t.value() == INVOKE_X + W("0b 01 04 00")


def test_client_cancel_of_the_active_call_closes_the_connection() -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    queued = proto.invoke(METHOD, b"y")
    d.cancel()
    failureOf(d, CancelledError)
    failureOf(queued, DRPCCanceledError)
    assert t.disconnecting
    assert t.value() == INVOKE_X


def test_client_cancel_of_a_queued_call_sends_nothing() -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    queued = proto.invoke(METHOD, b"y")
    queued.cancel()
    failureOf(queued, CancelledError)
    proto.dataReceived(W("05 01 01 00"))
    assert outcome(d) == b""
    assert t.value() == INVOKE_X + W("0b 01 04 00")
    assert not t.disconnecting


@pytest.mark.parametrize(
    ("reply", "kind", "text"),
    [
        ("07 01 01 03 616263", DRPCError, "abc (drpcwire note: invalid error data)"),
        ("0b 01 01 00", DRPCEOFError, "EOF"),  # Close before a Message
        ("0d 01 01 00", DRPCEOFError, "EOF"),  # CloseSend before a Message
    ],
)
def test_client_terminal_replies(reply: str, kind: type[Exception], text: str) -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    proto.dataReceived(W(reply, "05 01 02 00"))  # anything after is ignored
    e = failureOf(d, kind)
    assert (e.message if isinstance(e, DRPCError) else str(e)) == text
    assert t.value() == INVOKE_X  # the stream is over: no Close
    assert not t.disconnecting


def test_client_ignores_control_frames_and_later_packets() -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    proto.dataReceived(W("91 01 01 00", "89 01 01 00", "05 01 01 02 6f6b", "0d 01 02 00"))
    assert outcome(d) == b"ok"
    proto.dataReceived(W("07 01 03 08 0000000000000000", "05 01 04 00"))
    assert t.value() == INVOKE_X + W("0b 01 04 00")
    assert not t.disconnecting


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ("03 01 01 00", "invoke on existing stream"),
        ("11 01 01 00", "unknown packet kind: Kind(8)"),
        ("0f 01 01 00", "unknown packet kind: InvokeMetadata"),
        ("04 01 02 01 61 05 01 01 00", "id monotonicity violation"),
        ("05" + "ff" * 10 + "01", "varint too long"),
        ("04 01 01 01 61 07 01 01 00", "packet kind change"),
    ],
)
def test_client_protocol_errors_close_the_connection(reply: str, text: str) -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    proto.dataReceived(W(reply))
    e = failureOf(d, ProtocolError)
    assert str(e) == text
    assert t.disconnecting
    assert t.value() == INVOKE_X
    assert str(failureOf(proto.invoke(METHOD, b"y"), ProtocolError)) == text


def test_client_packet_for_a_future_stream_cancels_and_waits_like_go() -> None:
    """drpcmanager: a non-invoke packet for a newer stream cancels the current
    one, then the reader waits until that stream exists and delivers it."""
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    proto.dataReceived(W("05 02 01 02 6f6b"))
    failureOf(d, DRPCCanceledError)
    assert t.value() == INVOKE_X  # canceled, not closed: no Close
    assert t.producerState == "paused"
    proto.dataReceived(W("0d 02 02 00"))  # buffered while waiting
    second = proto.invoke(METHOD, b"y")
    assert outcome(second) == b"ok"
    assert t.producerState == "producing"
    assert t.value() == INVOKE_X + W(
        "03 02 01 28" + hexOf(METHOD), "05 02 02 01 79", "0d 02 03 00", "0b 02 04 00"
    )


def test_client_invoke_from_the_server_cancels_and_stops_reading() -> None:
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    proto.dataReceived(W("03 02 01 00", "05 01 01 00"))
    failureOf(d, DRPCCanceledError)
    assert t.value() == INVOKE_X
    assert not t.disconnecting


@pytest.mark.parametrize("seed", range(40))
def test_client_garbage_never_crashes(seed: int) -> None:
    rng = random.Random(seed)
    proto, t = client()
    d = proto.invoke(METHOD, b"x")
    for _ in range(20):
        proto.dataReceived(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
    proto.connectionLost(Failure(error.ConnectionDone()))
    assert isinstance(outcome(d), bytes | Failure)
    decodeFrames(t.value())  # whatever we wrote is well-formed drpc


# ---------------------------------------------------------------------------
# server behaviour on hand-written client bytes
# ---------------------------------------------------------------------------

INVOKE_ONLY = W("03 01 01 28" + hexOf(METHOD))


def test_server_closesend_without_a_request_is_an_eof_error() -> None:
    proto, t = server({METHOD: echo})
    proto.dataReceived(INVOKE_ONLY + W("0d 01 02 00"))
    assert t.value() == W("07 01 01 0b 0000000000000000" + hexOf("EOF"))


def test_server_close_before_a_pending_handler_finishes() -> None:
    cancelled: list[bool] = []
    pending: Deferred[bytes] = Deferred(lambda d: cancelled.append(True))
    proto, t = server({METHOD: lambda r: pending})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 01 78", "0d 01 03 00"))
    assert t.value() == b""
    proto.dataReceived(W("0b 01 04 00"))
    assert cancelled == [True]
    assert t.value() == b""
    assert not t.disconnecting


def test_server_close_arriving_with_the_request_after_a_sync_handler() -> None:
    """The handler runs when the Message is read, before the Close is."""
    proto, t = server({METHOD: lambda r: b"ok"})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 01 78", "0d 01 03 00", "0b 01 04 00"))
    assert t.value() == W("05 01 01 02 6f6b", "0d 01 02 00")


def test_server_close_before_the_request() -> None:
    called: list[bytes] = []
    proto, t = server({METHOD: lambda r: called.append(r) or b""})
    proto.dataReceived(INVOKE_ONLY + W("0b 01 02 00", "05 01 03 01 78"))
    assert called == []
    assert t.value() == b""


def test_server_second_stream_on_the_same_connection() -> None:
    proto, t = server({METHOD: lambda r: b"<" + r + b">"})
    proto.dataReceived(
        W(
            "03 01 01 28" + hexOf(METHOD),
            "05 01 02 01 61",
            "0d 01 03 00",
            "0b 01 04 00",
            "03 02 01 28" + hexOf(METHOD),
            "05 02 02 01 62",
            "0d 02 03 00",
        )
    )
    assert t.value() == W("05 01 01 03 3c613e", "0d 01 02 00", "05 02 01 03 3c623e", "0d 02 02 00")


def test_server_new_invoke_cancels_a_pending_handler() -> None:
    cancelled: list[bool] = []
    first: Deferred[bytes] = Deferred(lambda d: cancelled.append(True))
    handlers = iter([lambda: first, lambda: b"two"])
    proto, t = server({METHOD: lambda r: next(handlers)()})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 01 61", "0d 01 03 00"))
    proto.dataReceived(W("03 02 01 28" + hexOf(METHOD), "05 02 02 01 62", "0d 02 03 00"))
    assert cancelled == [True]
    assert t.value() == W("05 02 01 03" + hexOf("two"), "0d 02 02 00")


def test_server_invoke_waits_for_a_handler_that_ignores_cancellation() -> None:
    """Go's reader holds the next Invoke until HandleRPC returns."""
    inner: Deferred[bytes] = Deferred()
    outer: Deferred[bytes] = Deferred()
    outer.addCallback(lambda _: inner)  # cancelling outer now waits on inner
    outer.callback(b"")
    inner.pause()
    results = iter([outer, b"two"])
    proto, t = server({METHOD: lambda r: next(results)})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 01 61", "0d 01 03 00"))
    proto.dataReceived(W("03 02 01 28" + hexOf(METHOD), "05 02 02 01 62", "0d 02 03 00"))
    assert t.value() == b""
    assert t.producerState == "paused"
    inner.unpause()
    inner.callback(b"one")  # too late: stream 1 was canceled
    assert t.producerState == "producing"
    assert t.value() == W("05 02 01 03" + hexOf("two"), "0d 02 02 00")


def test_server_unknown_method_is_quoted_like_go() -> None:
    name = b'/x"\n\xff\xe2\x82\xac\x01\xf0\x9f\x98\x80\t\\'
    proto, t = server({METHOD: echo})
    proto.dataReceived(b"\x03\x01\x01" + encodeVarint(len(name)) + name)
    text = 'protocol error: unknown rpc: "/x\\"\\n\\xff€\\x01😀\\t\\\\"'
    body = bytes(8) + text.encode()
    assert t.value() == b"\x07\x01\x01" + encodeVarint(len(body)) + body


def test_server_non_bytes_result() -> None:
    proto, t = server({METHOD: lambda r: "text"})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 00"))
    body = bytes(8) + b"drpc handler returned str, not bytes"
    assert t.value() == b"\x07\x01\x01" + encodeVarint(len(body)) + body


def test_server_invalid_metadata_closes_the_connection() -> None:
    called: list[bytes] = []
    proto, t = server({METHOD: lambda r: called.append(r) or b""})
    proto.dataReceived(W("0f 01 01 02 0a05") + W("03 01 02 28" + hexOf(METHOD), "05 01 03 00"))
    assert t.disconnecting
    assert t.value() == b""
    assert called == []


def test_server_metadata_for_another_stream_is_not_attached() -> None:
    seen: list[dict[str, str]] = []
    proto, t = server({METHOD: lambda r, md: seen.append(md) or b""}, passMetadata=True)
    proto.dataReceived(
        W("0f 01 01 08 0a060a016b120176", "03 02 01 28" + hexOf(METHOD), "05 02 02 00")
    )
    assert seen == [{}]
    assert t.value() == W("05 02 01 00", "0d 02 02 00")


@pytest.mark.parametrize(
    "after",
    [
        "03 01 02 00",  # Invoke on the existing stream
        "11 01 02 00",  # unknown kind 8
        "05 01 01 00",  # id going backwards
        "05" + "ff" * 10 + "01",  # varint too long
    ],
)
def test_server_protocol_errors_close_the_connection(after: str) -> None:
    pending: Deferred[bytes] = Deferred()
    proto, t = server({METHOD: lambda r: pending})
    proto.dataReceived(INVOKE_ONLY + W(after))
    assert t.disconnecting
    assert t.value() == b""


def test_server_packet_before_its_invoke_makes_go_stop_reading() -> None:
    proto, t = server({METHOD: echo})
    proto.dataReceived(W("05 01 01 00") + INVOKE_X)
    assert t.value() == b""
    assert not t.disconnecting


def test_server_extra_messages_are_dropped() -> None:
    proto, t = server({METHOD: echo})
    proto.dataReceived(INVOKE_ONLY + W("05 01 02 01 61", "05 01 03 01 62", "0d 01 04 00"))
    assert t.value() == W("05 01 01 01 61", "0d 01 02 00")


@pytest.mark.parametrize("seed", range(40))
def test_server_garbage_never_crashes(seed: int) -> None:
    rng = random.Random(seed)
    proto, t = server({METHOD: echo})
    proto.dataReceived(INVOKE_ONLY)
    for _ in range(20):
        proto.dataReceived(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
    proto.connectionLost(Failure(error.ConnectionDone()))
    for control, stream, _, _ in decodeFrames(t.value()):  # only well-formed replies
        assert control in (0x04, 0x05, 0x07, 0x0D) and stream >= 1


# ---------------------------------------------------------------------------
# over yamux (coderagent.coderd.yamux), as coder carries drpc
# ---------------------------------------------------------------------------


def yamuxSession(client: bool, **kw: Any) -> tuple[YamuxSession, StringTransport]:
    s = YamuxSession(client=client, clock=Clock(), **kw)
    t = StringTransport()
    s.makeConnection(t)
    return s, t


def drpcsdkInvoke(session: YamuxSession) -> tuple[Deferred[bytes], DRPCClientProtocol]:
    """coder's drpcsdk.MultiplexedConn: a new yamux stream and drpc conn per call,
    closed once Invoke returns."""
    vector = load("drpc_over_yamux")
    stream = session.openStream()
    proto = DRPCClientProtocol()
    stream.attach(proto)
    d = proto.invoke(vector["method"], H(vector["request_hex"]))

    def close(result: Any) -> Any:
        stream.loseConnection()
        return result

    d.addBoth(close)
    return d, proto


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_vector_drpc_over_yamux_client(chunk: int | None) -> None:
    c2s, s2c = canonicalStreams("drpc_over_yamux")
    session, t = yamuxSession(True)
    d, _ = drpcsdkInvoke(session)
    feed(session, s2c, chunk)
    assert t.value() == c2s
    assert outcome(d) == b""
    assert session.numStreams == 0


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_vector_drpc_over_yamux_server(chunk: int | None) -> None:
    c2s, s2c = canonicalStreams("drpc_over_yamux")
    seen: list[Any] = []
    handler = goHandler(load("drpc_over_yamux"), seen)
    session, t = yamuxSession(
        False,
        onStream=lambda s: s.attach(DRPCServerProtocol({METHOD: handler}, passMetadata=True)),
    )
    feed(session, c2s, chunk)
    assert t.value() == s2c
    assert seen == [(H(load("drpc_over_yamux")["request_hex"]), {})]


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_vector_drpc_over_yamux_two_calls_client(chunk: int | None) -> None:
    c2s, s2c = canonicalStreams("drpc_over_yamux_two_calls")
    session, t = yamuxSession(True)
    first, _ = drpcsdkInvoke(session)
    feed(session, s2c[:56], chunk)
    assert outcome(first) == b""
    second, _ = drpcsdkInvoke(session)
    feed(session, s2c[56:], chunk)
    assert outcome(second) == b""
    assert t.value() == c2s


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_vector_drpc_over_yamux_two_calls_server(chunk: int | None) -> None:
    c2s, s2c = canonicalStreams("drpc_over_yamux_two_calls")
    session, t = yamuxSession(
        False, onStream=lambda s: s.attach(DRPCServerProtocol({METHOD: lambda r: b""}))
    )
    feed(session, c2s, chunk)
    assert t.value() == s2c


def _yamuxDataFrames(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every yamux frame except flagless window
    updates, whose deltas and positions are race-dependent in Go (tests/golden/README.md)."""
    out = []
    pos = 0
    while pos < len(stream):
        _, msgType, flags, sid, length = struct.unpack_from(">BBHII", stream, pos)
        pos += 12
        payload = b""
        if msgType == 0:
            payload = stream[pos : pos + length]
            pos += length
        if not (msgType == 1 and flags == 0):
            out.append((msgType, flags, sid, payload))
    return out


@pytest.mark.parametrize("chunk", [None, 4099])
def test_vector_drpc_over_yamux_large_both_sides(chunk: int | None) -> None:
    """The 150 000-byte echo over yamux: our drpc writes become the same Data frames
    as Go's (compared structurally: window-update deltas vary between Go runs)."""
    c2s, s2c = canonicalStreams("drpc_over_yamux_large")
    request = largeRequest()
    session, t = yamuxSession(True)
    stream = session.openStream()
    proto = DRPCClientProtocol()
    stream.attach(proto)
    d = proto.invoke(METHOD, request)
    d.addBoth(lambda r: (stream.loseConnection(), r)[1])
    feed(session, s2c, chunk)
    assert outcome(d) == request
    assert _yamuxDataFrames(t.value()) == _yamuxDataFrames(c2s)

    srv, st = yamuxSession(False, onStream=lambda s: s.attach(DRPCServerProtocol({METHOD: echo})))
    feed(srv, c2s, chunk)
    assert _yamuxDataFrames(st.value()) == _yamuxDataFrames(s2c)


def test_over_yamux_back_to_back_many_calls() -> None:
    """Our agent side and our coderd side over our yamux: a stream per call."""
    client, ct = yamuxSession(True)
    server, st = yamuxSession(
        False, onStream=lambda s: s.attach(DRPCServerProtocol({METHOD: echo}))
    )

    def pump() -> None:
        while True:
            c, s = take(ct), take(st)
            if not c and not s:
                return
            if c:
                server.dataReceived(c)
            if s:
                client.dataReceived(s)

    for i in range(50):
        stream = client.openStream()
        proto = DRPCClientProtocol()
        stream.attach(proto)
        d = proto.invoke(METHOD, b"call %d" % i)
        d.addBoth(lambda r, stream=stream: (stream.loseConnection(), r)[1])
        pump()
        assert outcome(d) == b"call %d" % i
    assert client.numStreams == 0 and server.numStreams == 0


def _pumpRecording(
    client: YamuxSession, ct: StringTransport, server: YamuxSession, st: StringTransport
) -> list[tuple[str, int, int, int, int]]:
    """Move bytes both ways until both sides are quiet; every yamux frame that crossed,
    in wire order, as (direction, type, flags, stream id, length)."""
    frames = []
    while True:
        c, s = take(ct), take(st)
        if not c and not s:
            return frames
        for direction, chunk, receiver in (("c2s", c, server), ("s2c", s, client)):
            pos = 0
            while pos < len(chunk):  # every write of a session is whole frames
                _, msgType, flags, sid, length = struct.unpack_from(">BBHII", chunk, pos)
                frames.append((direction, msgType, flags, sid, length))
                pos += 12 + (length if msgType == 0 else 0)
            if chunk:
                receiver.dataReceived(chunk)


def test_over_yamux_a_refused_request_gets_no_credit_after_the_servers_fin() -> None:
    """A 5 MiB request is over the 4 MiB limit: the server's drpc closes its stream (FIN)
    and, like Go's drpc, whose reader stops there, reads nothing more, so the client is
    credited no more window.  A window update after that FIN could reach a Go client
    after it FIN'd in turn and forgot the stream ("frame for missing stream").  The
    client, told EOF, drops the rest of its request and FINs at once, as Go's Close
    abandons a Write still waiting for window."""
    client, ct = yamuxSession(True)
    server, st = yamuxSession(
        False, onStream=lambda s: s.attach(DRPCServerProtocol({METHOD: echo}))
    )
    stream = client.openStream()
    proto = DRPCClientProtocol()
    stream.attach(proto)
    d = proto.invoke(METHOD, b"x" * (5 * MIB))
    d.addBoth(lambda r: (stream.loseConnection(), r)[1])
    frames = _pumpRecording(client, ct, server, st)
    failureOf(d, DRPCConnectionLost)
    serverFin = frames.index(("s2c", 1, 4, 1, 0))
    clientFin = frames.index(("c2s", 1, 4, 1, 0))
    assert serverFin < clientFin
    assert [f for f in frames[serverFin + 1 :] if f[0] == "s2c"] == []
    assert frames[clientFin + 1 :] == []
    assert client.numStreams == 0 and server.numStreams == 0
    # The client sent what it was credited before that FIN, not its whole request.
    sent = sum(f[4] for f in frames if f[:2] == ("c2s", 0))
    credited = sum(f[4] for f in frames if f[:2] == ("s2c", 1) and f[3] == 1)
    assert sent == 256 * 1024 + credited < 5 * MIB
