"""The environment and identity a session's process starts with.

Assembled in upstream's order (agent env, client ``env`` requests, identity,
agent defaults that win over inherited values, overrides that win over all,
then the per-connection SSH variables) so that scripts written for the Go
agent see the same variables.  One deliberate difference: the agent's own
credentials are never handed to the processes it runs.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Variables the client may send that upstream interprets instead of exporting.
MAGIC_SESSION_VARIABLES = frozenset(
    {"CODER_SSH_SESSION_TYPE", "CODER_CONTAINER", "CODER_CONTAINER_USER"}
)

#: Agent configuration that holds secrets; never inherited by sessions.
SECRET_AGENT_VARIABLES = frozenset({"CODER_AGENT_TOKEN", "CODER_AGENT_HEADER"})


@dataclass(frozen=True)
class UserInfo:
    """Who sessions run as: always the agent's own user (no setuid)."""

    name: str
    home: str
    shell: str

    @classmethod
    def current(cls, environ: Mapping[str, str]) -> UserInfo:
        """Describe the agent's own user.

        The shell comes from the password database, as upstream reads it.  The
        home directory is ``$HOME`` when it names a directory (upstream's
        ``os.UserHomeDir``), else the password database's, else ``/``.
        """
        try:
            entry = pwd.getpwuid(os.getuid())
            name, home, shell = entry.pw_name, entry.pw_dir, entry.pw_shell
        except KeyError:
            name, home, shell = environ.get("USER", str(os.getuid())), "/", ""
        envHome = environ.get("HOME", "")
        if envHome and os.path.isdir(envHome):
            home = envHome
        if not shell or not os.access(shell, os.X_OK):
            shell = environ.get("SHELL") or "/bin/sh"
        if not os.path.isdir(home):
            home = "/"
        return cls(name=name, home=home, shell=shell)


def sessionEnvironment(
    *,
    agentEnvironment: Mapping[str, str],
    clientEnvironment: Sequence[tuple[str, str]],
    user: UserInfo,
    defaults: Mapping[str, str],
    overrides: Mapping[str, str],
    peer: tuple[str, int],
    local: tuple[str, int],
    term: str | None = None,
    ttyName: str | None = None,
) -> dict[str, str]:
    """Return the complete environment for one session process."""
    env = {k: v for k, v in agentEnvironment.items() if k not in SECRET_AGENT_VARIABLES}
    for key, value in clientEnvironment:
        if key not in MAGIC_SESSION_VARIABLES:
            env[key] = value
    env["USER"] = user.name
    env["LOGNAME"] = user.name
    env["SHELL"] = user.shell
    env["HOME"] = user.home
    env.update(defaults)
    env.update(overrides)
    env["SSH_CLIENT"] = f"{peer[0]} {peer[1]} {local[1]}"
    env["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {local[0]} {local[1]}"
    if term is not None:
        env["TERM"] = term
    if ttyName is not None:
        env["SSH_TTY"] = ttyName
    return env
