"""Host keys: generated once, kept with mode 0600, reused on every start.

A client that pinned our fingerprint must keep trusting us after a restart,
so keys live on disk under the host-key directory.  Ed25519 is the key every
modern client picks; RSA (3072 bits) is there for old clients only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh import keys
from twisted.logger import Logger

from coderagent.files import PRIVATE_FILE_MODE, ensurePrivateDir, openPrivate

log = Logger()


@dataclass(frozen=True)
class _KeySpec:
    filename: str
    generate: Callable[[], keys.Key]


def _ed25519() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def _rsa() -> keys.Key:
    return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=3072))


_SPECS = (
    _KeySpec("ssh_host_ed25519_key", _ed25519),
    _KeySpec("ssh_host_rsa_key", _rsa),
)


class HostKeyError(Exception):
    """The host keys cannot be loaded or created; the agent cannot serve SSH."""


def _writePrivate(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, never readable by others."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = openPrivate(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _loadOrCreate(directory: str, spec: _KeySpec) -> keys.Key:
    path = os.path.join(directory, spec.filename)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        key = spec.generate()
        _writePrivate(path, key.toString("OPENSSH"))
        log.info(
            "generated SSH host key {path} ({fingerprint})",
            path=path,
            fingerprint=key.fingerprint(keys.FingerprintFormats.SHA256_BASE64),
        )
        return key
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # A key others could read is a key others could use; tighten it
        # rather than refuse, and say so.
        os.chmod(path, PRIVATE_FILE_MODE)
        log.warn("SSH host key {path} was readable by others; now mode 0600", path=path)
    try:
        loaded: keys.Key = keys.Key.fromFile(path)
        return loaded
    except (keys.BadKeyError, ValueError) as e:
        raise HostKeyError(f"cannot read SSH host key {path}: {e}") from e


def loadHostKeys(directory: str) -> dict[bytes, keys.Key]:
    """Return the host private keys by SSH key type, creating missing ones.

    The directory is created with mode 0700.  Raises :class:`HostKeyError`
    with a one-line reason when the directory or a key file is unusable.
    """
    try:
        ensurePrivateDir(directory)
        result: dict[bytes, keys.Key] = {}
        for spec in _SPECS:
            key = _loadOrCreate(directory, spec)
            result[key.sshType()] = key
    except OSError as e:
        raise HostKeyError(f"cannot use SSH host key directory {directory}: {e}") from e
    return result
