"""Bytes and packets of every SSH connection, for the stats coderd receives.

Upstream counts what its tailnet carries; this agent has no tailnet, so the
SSH stream is what carries everything a user does (sessions, file transfer,
forwards).  The counting costs nothing per packet:

* bytes read: the transport adds the size of each read from the socket
  (``AgentServerTransport.rxBytes``, up to 256 KiB a read);
* bytes written: each ``send`` system call adds what it sent (``txBytes``:
  Twisted's sends through :func:`coderagent.compat.countWrites`, the
  transport's own immediate ones in :func:`coderagent.compat.sendNow`);
* packets: the SSH sequence numbers, which the transport keeps anyway, are
  the number of packets each way.  A key exchange that restarts them (strict
  key exchange) is noticed as a decrease, and what had been counted is kept.

:class:`TrafficLedger` adds live connections and those that have ended into
totals that only grow; a reporter takes differences of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from coderagent.compat import countWrites


class Counted(Protocol):
    """What the ledger reads on an SSH transport."""

    rxBytes: int
    txBytes: int
    incomingPacketSequence: int
    outgoingPacketSequence: int


@dataclass(frozen=True)
class Traffic:
    """Bytes and packets, each way (rx: from clients, tx: to clients)."""

    rxBytes: int = 0
    txBytes: int = 0
    rxPackets: int = 0
    txPackets: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.rxBytes + other.rxBytes,
            self.txBytes + other.txBytes,
            self.rxPackets + other.rxPackets,
            self.txPackets + other.txPackets,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.rxBytes - other.rxBytes,
            self.txBytes - other.txBytes,
            self.rxPackets - other.rxPackets,
            self.txPackets - other.txPackets,
        )


class _Packets:
    """One connection's packet counts, across restarts of its sequence numbers."""

    __slots__ = ("rx", "rxSeen", "tx", "txSeen")

    def __init__(self) -> None:
        self.rx = self.tx = 0  # counted before the numbers last restarted
        self.rxSeen = self.txSeen = 0

    def read(self, t: Counted) -> tuple[int, int]:
        rx, tx = t.incomingPacketSequence, t.outgoingPacketSequence
        if rx < self.rxSeen:
            self.rx += self.rxSeen
        if tx < self.txSeen:
            self.tx += self.txSeen
        self.rxSeen, self.txSeen = rx, tx
        return self.rx + rx, self.tx + tx


class TrafficLedger:
    """Totals since the agent started, of connections live and ended."""

    def __init__(self) -> None:
        self._ended = Traffic()
        self._live: dict[Counted, _Packets] = {}

    def connectionStarted(self, t: Counted, socket: Any) -> None:
        """Count ``t`` from now on; ``socket`` is its transport (what it writes to)."""
        self._live[t] = _Packets()
        countWrites(socket, t)

    def connectionEnded(self, t: Counted) -> None:
        packets = self._live.pop(t, None)
        if packets is not None:
            self._ended = self._ended + _read(t, packets)

    def totals(self) -> Traffic:
        """Everything counted so far; never smaller than an earlier answer."""
        total = self._ended
        for t, packets in self._live.items():
            total = total + _read(t, packets)
        return total


def _read(t: Counted, packets: _Packets) -> Traffic:
    rx, tx = packets.read(t)
    return Traffic(t.rxBytes, t.txBytes, rx, tx)
