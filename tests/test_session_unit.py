"""Pieces of the session channel that need no SSH connection."""

from __future__ import annotations

import os
import termios

from twisted.conch import ttymodes

from coderagent.ssh.spawn import applyModes, packWinSize


def test_every_rfc4254_mode_applies_without_error() -> None:
    master, slave = os.openpty()
    try:
        modes = [(opcode, 1) for opcode in ttymodes.TTYMODES] + [(128, 9600), (129, 9600), (250, 7)]
        applyModes(slave, modes)
        applyModes(slave, [(1, 0x07), (53, 0)])  # VINTR = ^G, ECHO off
        attr = termios.tcgetattr(slave)
        assert attr[6][termios.VINTR] == b"\x07"
        assert not attr[3] & termios.ECHO
        assert attr[4] == termios.B9600 and attr[5] == termios.B9600
    finally:
        os.close(master)
        os.close(slave)


def test_window_size_fields_are_clamped_to_u16() -> None:
    assert packWinSize(24, 80, 0, 0) == packWinSize(24, 80, -5, 0)
    assert packWinSize(1 << 20, 80, 0, 0) == packWinSize(0xFFFF, 80, 0, 0)
