"""A boundary process, as far as the agent can tell: writes audit log frames to the socket.

    python -m tests.boundarywriter --socket PATH --session S --logs N [--per-frame K]
        [--tag 1|2] [--first SEQ] [--connections C]

Sequence numbers run from ``--first``; log i's URL is
``https://example.com/<session>/<i>``, every third log is denied, the others
allowed by ``*.example.com``.  ``--connections`` spreads the frames over that
many concurrent connections (each gets whole frames, in order).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coderagent.boundary.codec import TAG_V1, TAG_V2, encodeFrame
from coderagent.pb import agent_pb2, boundary_pb2

EPOCH_NS = 1_767_366_245_000_000_000  # 2026-01-02T15:04:05Z


def frame(session: str, first: int, n: int, tag: int) -> bytes:
    request = agent_pb2.ReportBoundaryLogsRequest(
        session_id=session, confined_process_name="claude"
    )
    for seq in range(first, first + n):
        entry = request.logs.add(allowed=seq % 3 != 0, sequence_number=seq)
        entry.http_request.method = "GET"
        entry.http_request.url = f"https://example.com/{session}/{seq}"
        if entry.allowed:
            entry.http_request.matched_rule = "*.example.com"
        entry.time.FromNanoseconds(EPOCH_NS + seq * 1_000_000)
    if tag == TAG_V1:
        return encodeFrame(TAG_V1, request.SerializeToString())
    return encodeFrame(TAG_V2, boundary_pb2.BoundaryMessage(logs=request).SerializeToString())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--logs", type=int, required=True)
    p.add_argument("--per-frame", type=int, default=10)
    p.add_argument("--tag", type=int, default=TAG_V1, choices=[TAG_V1, TAG_V2])
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--connections", type=int, default=1)
    a = p.parse_args()
    frames = [
        frame(a.session, seq, min(a.per_frame, a.first + a.logs - seq), a.tag)
        for seq in range(a.first, a.first + a.logs, a.per_frame)
    ]
    conns = []
    for _ in range(a.connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.socket)
        conns.append(s)
    # Frames go to the connections in turn; order across connections is the
    # agent's arrival order, so a single connection keeps strict order.
    for i, data in enumerate(frames):
        conns[i % len(conns)].sendall(data)
    for s in conns:
        s.close()
    print(f"wrote {a.logs} logs in {len(frames)} frames", flush=True)


if __name__ == "__main__":
    main()
