"""Random valid boundary frames, for the property tests of the audit log path.

"Valid" means what the agent's codec accepts: a V1 or V2 frame of at most
32768 bytes whose payload protobuf parses.  Within that, anything goes: a
session id or process name that fills most of the frame, NULs and control
characters and astral code points in the strings, no logs or 1200 of them,
fields protobuf keeps as unknown.  A seeded :class:`random.Random` makes every
run the same, so a failure is reproducible from the seed it prints.
"""

from __future__ import annotations

import random

from coderagent.boundary.codec import MAX_PAYLOAD, TAG_V1, TAG_V2, encodeFrame
from coderagent.pb import agent_pb2, boundary_pb2

_ALPHABETS = (
    "abcdef0123456789-",
    "\x00\x01\x1b\t\n \x7f\"'\\=",
    "é中文ß\u200b\ufeff\uffff",
    "\U0001f600\U0010ffff\U00020000",
)


def text(rng: random.Random, budget: int) -> str:
    """A string of valid code points (no surrogates: proto3 strings are UTF-8)."""
    if budget <= 0:
        return ""
    shape = rng.random()
    if shape < 0.3:
        return ""
    if shape < 0.85:
        n = rng.randint(1, min(64, budget))
    else:
        n = rng.randint(1, budget)  # most of the frame
    alphabet = rng.choice(_ALPHABETS)
    chunk = "".join(rng.choices(alphabet, k=min(n, 251)))
    return (chunk * (n // len(chunk) + 1))[:n]  # long strings repeat a random chunk


def unknownField(rng: random.Random) -> bytes:
    """A length-delimited field with a number the schema does not use, holding garbage."""
    number = rng.choice((15, 99, 1000, 536_870_911))
    data = rng.randbytes(rng.randint(0, 40))
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def request(rng: random.Random) -> tuple[agent_pb2.ReportBoundaryLogsRequest, bytes]:
    """A request and the bytes a writer sends for it (unknown fields included)."""
    req = agent_pb2.ReportBoundaryLogsRequest()
    room = MAX_PAYLOAD - 64
    req.session_id = text(rng, room // 3 if rng.random() < 0.5 else room)
    room -= len(req.session_id.encode())
    req.confined_process_name = text(rng, max(0, room // 2))
    shape = rng.random()
    count = 0 if shape < 0.1 else 1200 if shape < 0.15 else rng.randint(1, 60)
    for i in range(count):
        entry = req.logs.add(allowed=rng.random() < 0.5)
        if rng.random() < 0.9:
            entry.sequence_number = rng.choice((i, rng.randint(-(2**31), 2**31 - 1)))
        if rng.random() < 0.8:
            entry.time.FromNanoseconds(rng.randint(0, 2**62))
        if rng.random() < 0.9 and count < 1200:
            entry.http_request.method = rng.choice(("GET", "POST", "", "\x00"))
            entry.http_request.url = text(rng, 200)
            if entry.allowed:
                entry.http_request.matched_rule = text(rng, 40)
    encoded = req.SerializeToString()
    extra = unknownField(rng) if rng.random() < 0.2 else b""
    while len(encoded) + len(extra) > MAX_PAYLOAD - 8:  # room for the V2 envelope
        if len(req.logs) > 1 and len(req.logs) >= len(req.session_id) // 64:
            del req.logs[len(req.logs) // 2 :]
        elif len(req.session_id) >= len(req.confined_process_name):
            req.session_id = req.session_id[: len(req.session_id) // 2]
        else:
            req.confined_process_name = req.confined_process_name[
                : len(req.confined_process_name) // 2
            ]
        encoded = req.SerializeToString()
    return req, encoded + extra


def frame(rng: random.Random) -> tuple[agent_pb2.ReportBoundaryLogsRequest, bytes]:
    """A request and its whole frame, V1 or V2 at random."""
    req, payload = request(rng)
    if rng.random() < 0.5:
        return req, encodeFrame(TAG_V1, payload)
    envelope = b"\x0a" + _varint(len(payload)) + payload  # BoundaryMessage.logs = 1
    return req, encodeFrame(TAG_V2, envelope)


def exactFrame(
    session: str, tag: int = TAG_V1
) -> tuple[agent_pb2.ReportBoundaryLogsRequest, bytes]:
    """One log in a frame of exactly 32768 payload bytes, the process name taking the rest."""
    req = agent_pb2.ReportBoundaryLogsRequest(session_id=session)
    entry = req.logs.add(allowed=True, sequence_number=1)
    entry.http_request.method = "GET"
    entry.http_request.url = "https://example.com/long"
    entry.http_request.matched_rule = "*.example.com"

    def payload(nameLength: int) -> bytes:
        req.confined_process_name = "claude-" + "p" * nameLength
        if tag == TAG_V1:
            return req.SerializeToString()
        return boundary_pb2.BoundaryMessage(logs=req).SerializeToString()

    low, high = 0, MAX_PAYLOAD  # the payload grows with the name: search the length
    while low < high:
        mid = (low + high + 1) // 2
        if len(payload(mid)) <= MAX_PAYLOAD:
            low = mid
        else:
            high = mid - 1
    data = payload(low)
    assert len(data) == MAX_PAYLOAD, len(data)
    return req, encodeFrame(tag, data)
