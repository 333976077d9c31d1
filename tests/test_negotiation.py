"""Reading a client's KEXINIT and choosing the algorithms (RFC 4253 section 7.1)."""

from __future__ import annotations

import struct

import pytest

from coderagent.ssh.ciphers import IMPLICIT_MAC
from coderagent.ssh.negotiation import KexInit, NoAgreement, negotiate
from coderagent.ssh.wire import MalformedPayload
from tests.sshclient import Offer

SERVER = {
    "kex": [b"curve25519-sha256", b"ecdh-sha2-nistp256"],
    "hostKeys": [b"ssh-ed25519", b"rsa-sha2-512"],
    "ciphers": [b"aes128-gcm@openssh.com", b"chacha20-poly1305@openssh.com", b"aes128-ctr"],
    "macs": [b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-256"],
    "compressions": [b"none"],
}


def _offer(**kw: object) -> KexInit:
    return KexInit.parse(Offer(**kw).payload()[1:])  # type: ignore[arg-type]


def test_a_kexinit_is_read_whole() -> None:
    offer = _offer(
        kex=[b"a", b"b"],
        ciphers=[b"c1", b"c2"],
        strict=True,
        extInfo=True,
        firstKexPacketFollows=True,
    )
    assert offer.kexAlgorithms == [b"a", b"b", b"ext-info-c", b"kex-strict-c-v00@openssh.com"]
    assert offer.ciphersClientToServer == offer.ciphersServerToClient == [b"c1", b"c2"]
    assert offer.strict and offer.extInfo and offer.firstKexPacketFollows
    plain = _offer()
    assert not (plain.strict or plain.extInfo or plain.firstKexPacketFollows)


@pytest.mark.parametrize("cut", [0, 15, 16, 20, 60])
def test_a_truncated_kexinit_is_malformed(cut: int) -> None:
    payload = Offer().payload()[1:]
    with pytest.raises(MalformedPayload):
        KexInit.parse(payload[:cut])
    with pytest.raises(MalformedPayload):
        KexInit.parse(payload[:-1])  # the reserved field


def test_a_name_list_longer_than_the_message_is_malformed() -> None:
    with pytest.raises(MalformedPayload, match="string of 4096 bytes"):
        KexInit.parse(b"\0" * 16 + struct.pack(">L", 4096) + b"abc")


def test_the_clients_order_decides() -> None:
    agreed = negotiate(
        _offer(
            kex=[b"ecdh-sha2-nistp256", b"curve25519-sha256"],
            hostKeys=[b"rsa-sha2-512", b"ssh-ed25519"],
            ciphers=[b"aes128-ctr", b"aes128-gcm@openssh.com"],
            macs=[b"hmac-sha2-512", b"hmac-sha2-256", b"hmac-sha2-256-etm@openssh.com"],
        ),
        **SERVER,  # type: ignore[arg-type]
    )
    assert (agreed.kex, agreed.hostKey) == (b"ecdh-sha2-nistp256", b"rsa-sha2-512")
    assert (agreed.cipherIn, agreed.cipherOut) == (b"aes128-ctr", b"aes128-ctr")
    assert (agreed.macIn, agreed.macOut) == (b"hmac-sha2-256", b"hmac-sha2-256")


def test_an_authenticated_cipher_needs_no_common_mac() -> None:
    agreed = negotiate(
        _offer(ciphers=[b"chacha20-poly1305@openssh.com"], macs=[b"hmac-md5"]),
        **SERVER,  # type: ignore[arg-type]
    )
    assert (agreed.cipherIn, agreed.macIn, agreed.macOut) == (
        b"chacha20-poly1305@openssh.com",
        IMPLICIT_MAC,
        IMPLICIT_MAC,
    )
    with pytest.raises(NoAgreement, match="no matching MAC"):
        negotiate(_offer(ciphers=[b"aes128-ctr"], macs=[b"hmac-md5"]), **SERVER)  # type: ignore[arg-type]


def test_signals_are_never_chosen() -> None:
    # A client listing only the signals (or a server that lists them too)
    # has no method in common with the server.
    server = dict(SERVER, kex=[*SERVER["kex"], b"kex-strict-s-v00@openssh.com", b"ext-info-c"])
    for signal in (b"ext-info-c", b"kex-strict-c-v00@openssh.com", b"kex-strict-s-v00@openssh.com"):
        with pytest.raises(NoAgreement) as e:
            negotiate(_offer(kex=[signal]), **server)  # type: ignore[arg-type]
        assert (e.value.what, e.value.offered) == ("key exchange method", [signal])


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("kex", [b"diffie-hellman-group1-sha1"], "key exchange method"),
        ("hostKeys", [b"ssh-dss"], "host key type"),
        ("ciphers", [b"aes128-cbc", b"3des-cbc"], "cipher"),
        ("compression", [b"zlib"], "compression"),
    ],
)
def test_nothing_in_common_names_what(field: str, value: list[bytes], what: str) -> None:
    with pytest.raises(NoAgreement) as e:
        negotiate(_offer(**{field: value}), **SERVER)  # type: ignore[arg-type]
    assert (str(e.value), e.value.offered) == (f"no matching {what}", value)
