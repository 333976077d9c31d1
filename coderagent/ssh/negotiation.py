"""The client's KEXINIT, read strictly, and the server's side of algorithm negotiation.

RFC 4253 section 7.1: for each kind of algorithm, the one used is the first
on the client's list that the server also supports.  On top of that:

* an authenticated cipher (AES-GCM, ChaCha20-Poly1305) needs no MAC, so the
  MAC lists are not consulted for its direction (OpenSSH does the same: a
  client may offer a MAC list the server knows nothing of);
* the key exchange list carries signals that are not algorithms
  (``ext-info-c``, RFC 8308; ``kex-strict-c-v00@openssh.com``, OpenSSH's
  strict key exchange): they are read here and can never be chosen.

Conch's own ``ssh_KEXINIT`` does the plain part of this but reads the
message leniently and needs a MAC in every direction; the transport uses
this module instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from coderagent.ssh.ciphers import CIPHERS, IMPLICIT_MAC
from coderagent.ssh.wire import Payload

#: RFC 8308: the client accepts EXT_INFO.
EXT_INFO_CLIENT = b"ext-info-c"
#: OpenSSH's strict key exchange (``PROTOCOL``, "transport: strict key
#: exchange extension"), as the client and the server advertise it.
STRICT_KEX_CLIENT = b"kex-strict-c-v00@openssh.com"
STRICT_KEX_SERVER = b"kex-strict-s-v00@openssh.com"

#: Names in a key exchange list that signal something instead of naming a method.
SIGNALS = frozenset({EXT_INFO_CLIENT, b"ext-info-s", STRICT_KEX_CLIENT, STRICT_KEX_SERVER})


@dataclass(frozen=True)
class KexInit:
    """A KEXINIT's name-lists (RFC 4253 section 7.1); the languages are not used."""

    kexAlgorithms: list[bytes]
    hostKeyAlgorithms: list[bytes]
    ciphersClientToServer: list[bytes]
    ciphersServerToClient: list[bytes]
    macsClientToServer: list[bytes]
    macsServerToClient: list[bytes]
    compressionClientToServer: list[bytes]
    compressionServerToClient: list[bytes]
    firstKexPacketFollows: bool

    @classmethod
    def parse(cls, data: bytes) -> KexInit:
        """Read a KEXINIT payload (after the message type); raises ``MalformedPayload``."""
        payload = Payload(data)
        payload.raw(16)  # the cookie
        lists = [payload.string().split(b",") for _ in range(10)]
        follows = payload.boolean()
        payload.uint32()  # reserved
        return cls(
            kexAlgorithms=lists[0],
            hostKeyAlgorithms=lists[1],
            ciphersClientToServer=lists[2],
            ciphersServerToClient=lists[3],
            macsClientToServer=lists[4],
            macsServerToClient=lists[5],
            compressionClientToServer=lists[6],
            compressionServerToClient=lists[7],
            firstKexPacketFollows=follows,
        )

    @property
    def strict(self) -> bool:
        """The client asks for OpenSSH's strict key exchange."""
        return STRICT_KEX_CLIENT in self.kexAlgorithms

    @property
    def extInfo(self) -> bool:
        """The client accepts EXT_INFO (RFC 8308)."""
        return EXT_INFO_CLIENT in self.kexAlgorithms


@dataclass(frozen=True)
class Agreement:
    """What one key exchange will use (MACs are :data:`IMPLICIT_MAC` for an AEAD cipher)."""

    kex: bytes
    hostKey: bytes
    cipherIn: bytes
    cipherOut: bytes
    macIn: bytes
    macOut: bytes
    compressionIn: bytes
    compressionOut: bytes


class NoAgreement(Exception):
    """The client and the server have no algorithm of one kind in common."""

    def __init__(self, what: str, offered: list[bytes]) -> None:
        super().__init__(f"no matching {what}")
        self.what = what
        self.offered = offered


def _first(what: str, client: list[bytes], server: list[bytes]) -> bytes:
    for name in client:
        if name in server and name not in SIGNALS:
            return name
    raise NoAgreement(what, client)


def negotiate(
    client: KexInit,
    *,
    kex: list[bytes],
    hostKeys: list[bytes],
    ciphers: list[bytes],
    macs: list[bytes],
    compressions: list[bytes],
) -> Agreement:
    """The server's choice for ``client``'s offer; raises :class:`NoAgreement`."""
    chosenKex = _first("key exchange method", client.kexAlgorithms, kex)
    hostKey = _first("host key type", client.hostKeyAlgorithms, hostKeys)
    cipherIn = _first("cipher", client.ciphersClientToServer, ciphers)
    cipherOut = _first("cipher", client.ciphersServerToClient, ciphers)
    macIn = (
        IMPLICIT_MAC if CIPHERS[cipherIn].aead else _first("MAC", client.macsClientToServer, macs)
    )
    macOut = (
        IMPLICIT_MAC if CIPHERS[cipherOut].aead else _first("MAC", client.macsServerToClient, macs)
    )
    return Agreement(
        kex=chosenKex,
        hostKey=hostKey,
        cipherIn=cipherIn,
        cipherOut=cipherOut,
        macIn=macIn,
        macOut=macOut,
        compressionIn=_first("compression", client.compressionClientToServer, compressions),
        compressionOut=_first("compression", client.compressionServerToClient, compressions),
    )
