"""SFTP status codes for filesystem errors, as OpenSSH's sftp-server sends them.

Conch logs every error other than ENOENT/EACCES/EEXIST as a critical failure,
and its status messages must be ASCII; so every ``OSError`` is turned into an
``SFTPError`` with OpenSSH's status code and an ASCII message before Conch
sees it.  Also here: the one way to make Conch answer an extended request
with a success *status*.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.conch.ssh.filetransfer import (
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    SFTPError,
)

_T = TypeVar("_T")

# OpenSSH's errno_to_portable(): EEXIST is FX_FAILURE there too, because the
# v3 client prints "Unknown status" for the later FX_FILE_ALREADY_EXISTS.
_STATUS_FOR_ERRNO = {
    errno.ENOENT: FX_NO_SUCH_FILE,
    errno.ENOTDIR: FX_NO_SUCH_FILE,
    errno.ELOOP: FX_NO_SUCH_FILE,
    errno.EACCES: FX_PERMISSION_DENIED,
    errno.EPERM: FX_PERMISSION_DENIED,
    errno.ENOSYS: FX_OP_UNSUPPORTED,
    errno.EOPNOTSUPP: FX_OP_UNSUPPORTED,
}


def sftpError(code: int, message: str) -> SFTPError:
    """Build an ``SFTPError`` whose message Conch can encode.

    Conch encodes status messages as ASCII and, if that fails, raises inside
    its error handler and never answers the request; so anything non-ASCII is
    escaped here.
    """
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    return SFTPError(code, text)


def fromOSError(e: OSError) -> SFTPError:
    """Map an ``OSError`` to the status OpenSSH's sftp-server would send."""
    code = _STATUS_FOR_ERRNO.get(e.errno or 0, FX_FAILURE)
    return sftpError(code, e.strerror or str(e))


def succeeded(message: str) -> SFTPError:
    """The "exception" that makes Conch answer an extended request with FX_OK.

    ``FileTransferServer`` sends whatever ``extendedRequest`` returns as
    SSH_FXP_EXTENDED_REPLY, while OpenSSH's client requires SSH_FXP_STATUS for
    posix-rename, hardlink and fsync and disconnects otherwise.  Its error
    path sends an ``SFTPError``'s code verbatim, so failing with code FX_OK
    is how success is reported.
    """
    return sftpError(FX_OK, message)


def guarded(fn: Callable[..., _T], *args: Any) -> _T:
    """Run one filesystem call (in the worker thread), translating errors.

    Translating here means Conch never sees a raw ``OSError`` and so never
    logs an ordinary failure (ENOTEMPTY, EISDIR, ...) as a critical error.
    ``ValueError`` (a NUL byte in a path) and ``OverflowError`` (an offset
    beyond ``off_t``) are the client's fault, hence FX_BAD_MESSAGE.
    """
    try:
        return fn(*args)
    except OSError as e:
        raise fromOSError(e) from e
    except (ValueError, OverflowError) as e:
        raise sftpError(FX_BAD_MESSAGE, str(e)) from e
