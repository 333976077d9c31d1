"""What a login shell prints before the shell starts: announcement banners, then the MOTD.

Exactly as upstream's SSH server does it, for a session with a terminal and
no command (``ssh -tt host``; ``ssh host cmd`` and a shell without a
terminal print neither):

* each enabled banner with a message, trimmed, followed by a blank line;
* then the manifest's ``motd_path`` file, unless ``~/.hushlogin`` exists
  (the banners are shown regardless); a missing file is not an error;
* every line ending ``\\r\\n``, so the text starts at the left margin on the
  client's terminal.

The MOTD file is read up to :data:`MAX_MOTD_BYTES` (upstream's line scanner
stops at a 64 KiB line); a file that cannot be read is logged, upstream's
"agent failed to show MOTD", and the login goes on without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from twisted.logger import Logger

from coderagent.pb import agent_pb2
from coderagent.workspaceenv import WorkspaceEnvironment

log = Logger()

MAX_MOTD_BYTES = 64 * 1024


def withCarriageReturns(text: bytes) -> bytes:
    """Go's ``bufio.ScanLines`` over ``text``, each line written back with ``\\r\\n``."""
    if not text:
        return b""
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in lines)


def bannerText(banners: Sequence[agent_pb2.BannerConfig]) -> bytes:
    shown = [b for b in banners if b.enabled and b.message]
    return b"".join(withCarriageReturns(b.message.strip().encode("utf-8") + b"\n\n") for b in shown)


def motdText(path: str, home: str) -> bytes:
    if not path or os.path.exists(os.path.join(home, ".hushlogin")):
        return b""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_MOTD_BYTES)
    except FileNotFoundError:
        return b""  # not an error: there is no MOTD to show
    except OSError as e:
        log.error("agent failed to show MOTD: open MOTD: {error}", error=e)
        return b""
    return withCarriageReturns(text)


class LoginMessage:
    """Builds the text for each login shell from the current banners and manifest."""

    def __init__(
        self,
        workspace: WorkspaceEnvironment,
        banners: Callable[[], Sequence[agent_pb2.BannerConfig]],
    ) -> None:
        self.workspace = workspace
        self.banners = banners

    def __call__(self) -> bytes:
        return bannerText(self.banners()) + motdText(self.workspace.motdPath, self.workspace.home)
