"""How a session's end and a refusal are worded for coderd's connection log."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from coderagent.reporting.activity import SSHActivity
from coderagent.ssh.events import (
    MAX_SHOWN,
    NoConnectionEvents,
    forwardRefusal,
    sessionEnd,
    shown,
    signalText,
    subsystemRefusal,
    transferRefusal,
)
from coderagent.ssh.interfaces import IConnectionEvents


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (0, None, (0, "graceful")),
        (3, None, (3, "process exited with error status: 3")),
        (("KILL", False), None, (255, "signal: killed")),
        (("SEGV", True), None, (255, "signal: segmentation fault (core dumped)")),
        (("TERM", False), None, (255, "signal: terminated")),
        (None, None, (1, "connection lost")),
        (65, "file transfer blocked: exec", (65, "file transfer blocked: exec")),
        (229, "start command: [Errno 2] nope", (229, "start command: [Errno 2] nope")),
    ],
)
def test_a_session_end_is_a_code_and_a_reason(
    status: int | tuple[str, bool] | None, reason: str | None, expected: tuple[int, str]
) -> None:
    assert sessionEnd(status, reason) == expected


def test_signals_read_as_go_prints_them() -> None:
    assert signalText("HUP") == "signal: hangup"
    assert signalText("USR1") == "signal: user defined signal 1"
    assert signalText("NOSUCH") == "signal: NOSUCH"


def test_refusals_name_what_and_where() -> None:
    assert forwardRefusal("local", "tcp", "10.0.0.5:5432") == (
        "local port forwarding blocked: direct-tcpip 10.0.0.5:5432"
    )
    assert forwardRefusal("local", "unix", "/run/docker.sock") == (
        "local port forwarding blocked: direct-streamlocal@openssh.com /run/docker.sock"
    )
    assert forwardRefusal("reverse", "tcp", "0.0.0.0:8080") == (
        "reverse port forwarding blocked: tcpip-forward 0.0.0.0:8080"
    )
    assert forwardRefusal("reverse", "unix", "/tmp/s") == (
        "reverse port forwarding blocked: streamlocal-forward@openssh.com /tmp/s"
    )
    assert transferRefusal("sftp", None) == "file transfer blocked: subsystem sftp"
    assert subsystemRefusal("x11-portal") == "unsupported subsystem: x11-portal"
    assert subsystemRefusal("a\x00b") == 'unsupported subsystem: "a\\x00b"'
    assert transferRefusal(None, 'scp -t "a b"') == (
        'file transfer blocked: exec "scp -t \\"a b\\""'
    )


def test_the_clients_text_is_bounded_and_printable() -> None:
    assert shown("x" * 10_000) == "x" * MAX_SHOWN + "…"
    assert shown("evil\nhost:22") == '"evil\\nhost:22"'
    assert len(transferRefusal(None, "scp " + "y" * 10_000)) < MAX_SHOWN + 40


def test_both_implementations_provide_the_interface() -> None:
    assert verifyObject(IConnectionEvents, NoConnectionEvents())
    assert verifyObject(IConnectionEvents, SSHActivity())
    NoConnectionEvents().sessionStarted("ssh", None)(0, "graceful")
