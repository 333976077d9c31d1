"""The transport protocol's rules against a client that breaks them (tests/sshclient.py).

Each message that may not arrive where it does, or whose fields do not
parse, must end the connection with a DISCONNECT carrying the right reason
code and a description, leave exactly one line in the agent's log, and never
a traceback.  Strict key exchange (``kex-strict-c-v00@openssh.com``) is here
too, since its rules are the same kind of rule.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.agentproc import Agent, ClientKeys, ssh
from tests.sshclient import (
    DISCONNECT_KEY_EXCHANGE_FAILED,
    DISCONNECT_PROTOCOL_ERROR,
    DISCONNECT_SERVICE_NOT_AVAILABLE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN,
    MSG_DEBUG,
    MSG_EXT_INFO,
    MSG_GLOBAL_REQUEST,
    MSG_IGNORE,
    MSG_KEX_ECDH_INIT,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_REQUEST_FAILURE,
    MSG_SERVICE_ACCEPT,
    MSG_SERVICE_REQUEST,
    MSG_UNIMPLEMENTED,
    MSG_USERAUTH_REQUEST,
    Offer,
    RawClient,
    loggedIn,
    string,
)

U32 = struct.Struct(">L")


@pytest.fixture
def client(agent: Agent) -> Iterator[RawClient]:
    with RawClient(agent.host, agent.port) as c:
        yield c


def _port(client: RawClient) -> int:
    return int(client.sock.getsockname()[1])


def assertEnds(
    agent: Agent,
    client: RawClient,
    code: int,
    description: str,
    logged: str | None = None,
    skip: tuple[int, ...] = (),
) -> None:
    """The agent disconnects ``client`` so, logging one line about it and no traceback.

    ``logged`` is the log line's text after the peer; by default the
    protocol-error line for ``description``.
    """
    assert client.disconnection(skip) == (code, description)
    peer = f"127.0.0.1:{_port(client)}"
    expected = logged if logged is not None else f"protocol error from {peer}: {description}"
    agent.waitForLog(re.escape(expected.replace("{peer}", peer)))
    log = agent.log()
    assert [line for line in log.splitlines() if peer in line] == [
        line for line in log.splitlines() if expected.replace("{peer}", peer) in line
    ]
    assert "Traceback" not in log


def _inKeyExchange(client: RawClient, offer: Offer | None = None) -> bytes:
    """Versions exchanged, both KEXINITs sent; returns ours."""
    client.exchangeVersions()
    ours = client.sendKexInit(offer or Offer())
    client.serverKexInit = bytes([MSG_KEXINIT]) + client.expect(MSG_KEXINIT)
    return ours


def _afterKeyExchange(client: RawClient, offer: Offer | None = None) -> None:
    client.keyExchange(offer)


def _publickeyRequest(tail: bytes) -> bytes:
    return string(b"coder") + string(b"ssh-connection") + string(b"publickey") + tail


# -- before and during the first key exchange --------------------------------------------


def test_a_service_request_before_key_exchange_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    # What a client skipping key exchange sends; the authentication request
    # behind it never reaches the authentication service.
    client.exchangeVersions()
    client.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    client.send(MSG_USERAUTH_REQUEST, _publickeyRequest(b"\1" + string(b"ssh-ed25519") * 3))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 5 (SERVICE_REQUEST) before key exchange",
        skip=(MSG_KEXINIT,),
    )


def test_an_authentication_request_before_key_exchange_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    client.exchangeVersions()
    client.send(MSG_USERAUTH_REQUEST, _publickeyRequest(b"\0" + string(b"a") + string(b"b")))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 50 (USERAUTH_REQUEST) before key exchange",
        skip=(MSG_KEXINIT,),
    )


def test_a_second_kexinit_ends_the_connection(agent: Agent, client: RawClient) -> None:
    _inKeyExchange(client)
    client.sendKexInit(Offer())
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 20 (KEXINIT) during key exchange (awaiting the key exchange message)",
    )


def test_a_kexinit_after_the_key_exchange_message_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    # The agent has sent NEWKEYS: its DISCONNECT comes with the new keys.
    client.keyExchange(newKeys=False)
    client.sendKexInit(Offer())
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 20 (KEXINIT) during key exchange (awaiting NEWKEYS)",
    )


def test_newkeys_before_the_key_exchange_message_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    _inKeyExchange(client)
    client.send(MSG_NEWKEYS)
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 21 (NEWKEYS) during key exchange (awaiting the key exchange message)",
    )


def test_the_key_exchange_message_twice_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    client.keyExchange(newKeys=False)
    client.send(MSG_KEX_ECDH_INIT, string(bytes(32)))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 30 (KEX_ECDH_INIT) during key exchange (awaiting NEWKEYS)",
    )


def test_the_key_exchange_message_before_kexinit_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    client.exchangeVersions()
    client.send(MSG_KEX_ECDH_INIT, string(bytes(32)))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 30 (KEX_ECDH_INIT) before key exchange",
        skip=(MSG_KEXINIT,),
    )


def test_a_truncated_kexinit_ends_the_connection(agent: Agent, client: RawClient) -> None:
    client.exchangeVersions()
    payload = Offer().payload()
    client.send(MSG_KEXINIT, payload[1:-3])
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "malformed KEXINIT: truncated uint32",
        skip=(MSG_KEXINIT,),
    )


def test_a_public_key_that_is_no_key_fails_the_key_exchange(
    agent: Agent, client: RawClient
) -> None:
    _inKeyExchange(client)
    client.send(MSG_KEX_ECDH_INIT, string(b"\x09" * 31))  # X25519 keys are 32 bytes
    assertEnds(
        agent,
        client,
        DISCONNECT_KEY_EXCHANGE_FAILED,
        "malformed packet",
        logged="malformed SSH message 30 from {peer}: ValueError(",
    )


def test_no_common_cipher_fails_the_key_exchange(agent: Agent, client: RawClient) -> None:
    client.exchangeVersions()
    client.sendKexInit(Offer(ciphers=[b"aes128-cbc", b"3des-cbc"]))
    assertEnds(
        agent,
        client,
        DISCONNECT_KEY_EXCHANGE_FAILED,
        "no matching cipher",
        logged="key exchange with {peer} failed: no matching cipher "
        "(the client offers aes128-cbc,3des-cbc)",
        skip=(MSG_KEXINIT,),
    )


@pytest.mark.parametrize(
    ("messageType", "payload", "problem"),
    [
        (MSG_EXT_INFO, U32.pack(0), "message 7 (EXT_INFO)"),
        (MSG_SERVICE_ACCEPT, string(b"ssh-userauth"), "message 6 (SERVICE_ACCEPT)"),
        (MSG_GLOBAL_REQUEST, string(b"x") + b"\0", "message 80 (GLOBAL_REQUEST)"),
        (0, b"", "message 0"),
    ],
)
def test_nothing_else_may_come_during_key_exchange(
    agent: Agent, client: RawClient, messageType: int, payload: bytes, problem: str
) -> None:
    _inKeyExchange(client)
    client.send(messageType, payload)
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        f"{problem} during key exchange (awaiting the key exchange message)",
    )


# -- after key exchange, before and after authentication ------------------------------------


def test_an_authentication_request_before_the_service_request_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    client.keyExchange()
    client.send(MSG_USERAUTH_REQUEST, _publickeyRequest(b"\0" + string(b"a") + string(b"b")))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 50 (USERAUTH_REQUEST) before a service request",
    )


def test_a_connection_message_before_authentication_ends_the_connection(
    agent: Agent, client: RawClient
) -> None:
    client.keyExchange()
    client.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    client.expect(MSG_SERVICE_ACCEPT)
    client.send(MSG_CHANNEL_OPEN, string(b"session") + U32.pack(0) * 3)
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "message 90 (CHANNEL_OPEN) before authentication",
    )


@pytest.mark.parametrize("service", [b"ssh-nothing", b"ssh-connection"])
def test_a_service_it_cannot_have_ends_the_connection(
    agent: Agent, client: RawClient, service: bytes
) -> None:
    # ssh-connection only comes with authentication.
    client.keyExchange()
    client.send(MSG_SERVICE_REQUEST, string(service))
    name = service.decode()
    assertEnds(
        agent,
        client,
        DISCONNECT_SERVICE_NOT_AVAILABLE,
        f"don't have service {name}",
        logged=f"{{peer}} asked for service '{name}', which it cannot have",
    )


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        (b"", "1 bytes wanted, 0 left"),
        (b"\1" + string(b"ssh-ed25519"), "truncated uint32"),
        (b"\1" + string(b"ssh-ed25519") + string(b"blob"), "truncated uint32"),
        (b"\0" + string(b"ssh-ed25519") + U32.pack(99) + b"blob", "string of 99 bytes with 4 left"),
    ],
)
def test_a_truncated_publickey_request_ends_the_connection(
    agent: Agent, client: RawClient, tail: bytes, problem: str
) -> None:
    client.keyExchange()
    client.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    client.expect(MSG_SERVICE_ACCEPT)
    client.send(MSG_USERAUTH_REQUEST, _publickeyRequest(tail))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        f"malformed message 50 (USERAUTH_REQUEST): {problem}",
    )


def test_a_key_blob_of_the_wrong_size_ends_the_connection(agent: Agent, client: RawClient) -> None:
    client.keyExchange()
    client.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    client.expect(MSG_SERVICE_ACCEPT)
    blob = string(b"ssh-ed25519") + string(b"too short")
    client.send(
        MSG_USERAUTH_REQUEST, _publickeyRequest(b"\0" + string(b"ssh-ed25519") + string(blob))
    )
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "malformed packet",
        logged="malformed SSH message 50 from {peer}: ValueError(",
    )


def test_an_unknown_transport_message_is_answered_and_the_connection_goes_on(
    agent: Agent, client: RawClient
) -> None:
    client.keyExchange()
    client.send(15, b"whatever")  # unassigned: RFC 4253 section 11.4
    sequence = client.outSeq - 1
    assert client.expect(MSG_UNIMPLEMENTED) == U32.pack(sequence)
    client.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    client.expect(MSG_SERVICE_ACCEPT)
    assert "Traceback" not in agent.log()


def test_malformed_transport_messages_end_the_connection(agent: Agent, client: RawClient) -> None:
    client.keyExchange()
    client.send(MSG_DEBUG, b"\1" + string(b"no language tag"))
    assertEnds(
        agent, client, DISCONNECT_PROTOCOL_ERROR, "malformed message 4 (DEBUG): truncated uint32"
    )


# -- after authentication -----------------------------------------------------------------


@pytest.fixture
def authenticated(agent: Agent, clientKeys: ClientKeys) -> Iterator[RawClient]:
    with loggedIn(agent.host, agent.port, clientKeys.key) as c:
        yield c


def test_a_global_request_without_its_want_reply_byte_ends_the_connection(
    agent: Agent, authenticated: RawClient
) -> None:
    authenticated.send(MSG_GLOBAL_REQUEST, string(b"keepalive@openssh.com"))
    assertEnds(
        agent,
        authenticated,
        DISCONNECT_PROTOCOL_ERROR,
        "malformed message 80 (GLOBAL_REQUEST): 1 bytes wanted, 0 left",
    )


def test_a_service_request_after_authentication_ends_the_connection(
    agent: Agent, authenticated: RawClient
) -> None:
    # Conch would stop ssh-connection (and every channel) and start a second
    # authentication on the same connection.
    authenticated.send(MSG_SERVICE_REQUEST, string(b"ssh-userauth"))
    assertEnds(
        agent, authenticated, DISCONNECT_PROTOCOL_ERROR, "service request after authentication"
    )


def test_channel_data_during_a_re_key_ends_the_connection(
    agent: Agent, authenticated: RawClient
) -> None:
    # Not even the fast path for channel data takes it.
    authenticated.sendKexInit(Offer())
    authenticated.send(MSG_CHANNEL_DATA, U32.pack(0) + string(b"data"))
    assertEnds(
        agent,
        authenticated,
        DISCONNECT_PROTOCOL_ERROR,
        "message 94 during key exchange (awaiting the key exchange message)",
        skip=(MSG_KEXINIT,),
    )


def test_a_reply_to_no_request_ends_the_connection(agent: Agent, authenticated: RawClient) -> None:
    authenticated.send(81)  # REQUEST_SUCCESS
    assertEnds(
        agent,
        authenticated,
        DISCONNECT_PROTOCOL_ERROR,
        "malformed packet",
        logged="malformed SSH message 81 from {peer}: IndexError('pop from empty list')",
    )


# -- lengths and numbers of connections: what held before, still holds -------------------------


@pytest.mark.parametrize(
    ("cipher", "mac"),
    [
        (b"none", b"none"),  # before key exchange
        (b"aes128-ctr", b"hmac-sha2-256"),
        (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
        (b"aes256-gcm@openssh.com", b"none"),
        (b"chacha20-poly1305@openssh.com", b"none"),
    ],
)
def test_a_length_of_2_to_the_31_is_refused_at_once(
    agent: Agent, client: RawClient, cipher: bytes, mac: bytes
) -> None:
    if cipher == b"none":
        client.exchangeVersions()
        skip: tuple[int, ...] = (MSG_KEXINIT,)
    else:
        client.keyExchange(Offer(ciphers=[cipher], macs=[mac], strict=True))
        skip = ()
    # Only the bytes that carry the length (a block for CTR): the agent
    # must not wait for 2 GiB, or for anything else.
    client.sendRaw(client.out.lengthOnly(client.outSeq, 2**31))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "bad packet length 2147483648",
        logged="bad packet from {peer}: bad packet length 2147483648",
        skip=skip,
    )


def test_300_idle_unauthenticated_connections_do_not_stop_a_login(
    agent: Agent, clientKeys: ClientKeys
) -> None:
    with ExitStack() as stack:
        for _ in range(300):
            idle = stack.enter_context(socket.create_connection((agent.host, agent.port), 30))
            idle.sendall(b"SSH-2.0-idle\r\n")
        result = ssh(agent, clientKeys.key, "echo in")
        assert (result.returncode, result.stdout) == (0, b"in\n"), result.stderr


# -- strict key exchange ----------------------------------------------------------------------


def test_strict_kex_makes_ignore_before_newkeys_fatal(agent: Agent, client: RawClient) -> None:
    # The Terrapin attack's first move: an IGNORE that shifts the client's
    # sequence numbers before the keys are in use.
    client.keyExchange(Offer(strict=True), newKeys=False)
    client.send(MSG_IGNORE, string(b""))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "strict KEX violation: unexpected message 2 (IGNORE)",
    )


@pytest.mark.parametrize(
    ("messageType", "payload"),
    [(MSG_DEBUG, b"\0" + string(b"hi") + string(b"")), (MSG_UNIMPLEMENTED, U32.pack(1)), (15, b"")],
)
def test_strict_kex_allows_nothing_but_the_exchange(
    agent: Agent, client: RawClient, messageType: int, payload: bytes
) -> None:
    _inKeyExchange(client, Offer(strict=True))
    client.send(messageType, payload)
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        f"strict KEX violation: unexpected message {messageType}"
        + {MSG_DEBUG: " (DEBUG)", MSG_UNIMPLEMENTED: " (UNIMPLEMENTED)"}.get(messageType, ""),
    )


def test_strict_kex_wants_kexinit_first(agent: Agent, client: RawClient) -> None:
    client.exchangeVersions()
    client.send(MSG_IGNORE, string(b""))
    client.sendKexInit(Offer(strict=True))
    assertEnds(
        agent,
        client,
        DISCONNECT_PROTOCOL_ERROR,
        "strict KEX violation: KEXINIT was not the first packet",
        skip=(MSG_KEXINIT,),
    )


def test_without_strict_kex_an_ignore_is_only_ignored(
    agent: Agent, client: RawClient, clientKeys: ClientKeys
) -> None:
    # As RFC 4253 has it (and why clients without strict KEX are open to
    # Terrapin with ChaCha20-Poly1305 and EtM MACs).
    client.keyExchange(Offer(), newKeys=False)
    client.send(MSG_IGNORE, string(b""))
    client.sendNewKeys()
    client.authenticate(clientKeys.key)


def test_the_agent_offers_strict_kex_and_says_so_only_once_per_exchange(
    agent: Agent, client: RawClient
) -> None:
    _inKeyExchange(client)
    names = client._serverLists()[0]
    assert names[-2:] == [b"kex-strict-s-v00@openssh.com", b"ext-info-s"]
    assert names.count(b"kex-strict-s-v00@openssh.com") == 1


CIPHER_MACS = [
    (b"chacha20-poly1305@openssh.com", b"hmac-sha2-256"),
    (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
    (b"aes256-ctr", b"hmac-sha2-512-etm@openssh.com"),
    (b"aes128-ctr", b"hmac-sha2-256"),
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("cipher", "mac"), CIPHER_MACS)
def test_sequence_numbers_follow_the_client_through_re_keys(
    agent: Agent, clientKeys: ClientKeys, cipher: bytes, mac: bytes, strict: bool
) -> None:
    # With strict KEX both sides count from 0 after every NEWKEYS; without,
    # never.  The raw client counts as it asked; a MAC that does not verify
    # on either side would end this.
    offer = Offer(ciphers=[cipher], macs=[mac], strict=strict)
    with loggedIn(agent.host, agent.port, clientKeys.key, offer) as client:
        assert client.strict is strict and client.agreed[0] == cipher
        for _ in range(2):
            # After the first exchange, strict KEX no longer forbids IGNORE.
            ours = client.sendKexInit(offer)
            client.send(MSG_IGNORE, string(b"during a re-key"))
            client.serverKexInit = bytes([MSG_KEXINIT]) + client.expect(MSG_KEXINIT)
            client.finishKeyExchange(offer, ours)
            client.send(MSG_GLOBAL_REQUEST, string(b"x@example.com") + b"\1")
            assert client.expect(MSG_REQUEST_FAILURE) == b""
        if strict:
            assert client.outSeq == client.inSeq == 1  # the request and its answer
    assert "Traceback" not in agent.log()


def test_a_client_without_strict_kex_on_chacha20_is_logged(agent: Agent, client: RawClient) -> None:
    client.keyExchange(Offer(ciphers=[b"chacha20-poly1305@openssh.com"]))
    peer = f"127.0.0.1:{_port(client)}"
    agent.waitForLog(
        re.escape(
            f"{peer} uses chacha20-poly1305@openssh.com <implicit> without strict key exchange:"
            " open to Terrapin (CVE-2023-48795)"
        )
    )


def test_a_wrong_guess_is_dropped_unread(
    agent: Agent, client: RawClient, clientKeys: ClientKeys
) -> None:
    # RFC 4253 section 7: a client whose preferred method is not the
    # server's may send a packet for it right after KEXINIT; the server must
    # drop it.  (The agent never prefers curve25519-sha256@libssh.org, the
    # same method as curve25519-sha256 under its older name.)
    offer = Offer(kex=[b"curve25519-sha256@libssh.org"], firstKexPacketFollows=True)
    client.exchangeVersions()
    ours = client.sendKexInit(offer)
    client.send(MSG_KEX_ECDH_INIT, string(b"a guess that is no key"))
    client.serverKexInit = bytes([MSG_KEXINIT]) + client.expect(MSG_KEXINIT)
    client.finishKeyExchange(offer, ours)
    client.authenticate(clientKeys.key)
