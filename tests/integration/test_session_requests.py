# paramiko is unannotated.
# mypy: disallow-untyped-calls=False
"""Malformed session requests against the real agent, sent raw with paramiko.

OpenSSH's client cannot send a request whose string lies about its length;
paramiko can, through its transport.  Each malformed request must be a
request failure that runs nothing, and the connection must go on working.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from tests.agentproc import TIMEOUT, Agent, ClientKeys
from tests.integration.test_forwarding import execWorks, paramikoTransport
from tests.test_requests import MALFORMED, SIZE


def u32(n: int) -> bytes:
    return struct.pack(">L", n)


def rawRequest(chan: paramiko.Channel, kind: str, payload: bytes) -> bool:
    """A channel request with a hand-made payload; True on CHANNEL_SUCCESS.

    On CHANNEL_FAILURE paramiko closes the channel, so a channel serves one
    refused request.
    """
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string(kind)
    m.add_boolean(True)
    m.add_bytes(payload)
    chan._event_pending()
    chan.transport._send_user_message(m)
    try:
        chan._wait_for_event()
    except paramiko.SSHException:
        return False
    return True


OTHERS = [
    ("window-change", SIZE[:12]),
    ("window-change", SIZE + b"\x00"),
    ("subsystem", u32(10) + b"sftp"),
    ("subsystem", b"\x00\x00\x00\x04sftp" + b"x"),
    ("signal", u32(4) + b"KI"),
    ("shell", b"\x00"),
]


@pytest.mark.parametrize(
    ("kind", "payload"),
    [(kind, data) for kind, (_, forms) in MALFORMED.items() for data in forms] + OTHERS,
)
def test_a_malformed_session_request_fails_and_the_connection_lives(
    agent: Agent, clientKeys: ClientKeys, kind: str, payload: bytes
) -> None:
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        chan = transport.open_session(timeout=TIMEOUT)
        assert rawRequest(chan, kind, payload) is False
        assert execWorks(transport)
    finally:
        transport.close()
    agent.waitForLog(
        rf"\[warn\].*malformed {re.escape(kind)} request on session channel from "
        r"127\.0\.0\.1:\d+ refused: "
    )


def test_an_exec_whose_string_claims_more_than_is_there_runs_nothing(
    agent: Agent, clientKeys: ClientKeys, tmp_path: Path
) -> None:
    """Conch read the bytes that were there and ran them."""
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        chan = transport.open_session(timeout=TIMEOUT)
        assert rawRequest(chan, "exec", u32(len(command) + 100) + command) is False
        assert execWorks(transport)  # a later command has run: the first one had its chance
    finally:
        transport.close()
    assert not marker.exists()


def test_well_formed_raw_requests_still_succeed(agent: Agent, clientKeys: ClientKeys) -> None:
    """The raw sender itself: what the strict reader accepts is a success."""
    transport = paramikoTransport(agent, clientKeys.key)
    try:
        chan = transport.open_session(timeout=TIMEOUT)
        chan.settimeout(TIMEOUT)
        term = b"\x00\x00\x00\x05xterm"
        modes = b"\x00\x00\x00\x01\x00"  # just TTY_OP_END
        assert rawRequest(chan, "pty-req", term + SIZE + modes)
        assert rawRequest(chan, "env", b"\x00\x00\x00\x01A" + b"\x00\x00\x00\x01b")
        assert rawRequest(chan, "window-change", SIZE)
        command = b"echo $A"
        assert rawRequest(chan, "exec", u32(len(command)) + command)
        out = b""
        while data := chan.recv(4096):
            out += data
        assert (out, chan.recv_exit_status()) == (b"b\r\n", 0)  # a terminal: CR LF
    finally:
        transport.close()
