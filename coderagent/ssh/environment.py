"""The environment a session's process starts with.

Assembled in upstream's order so that scripts written for the Go agent see
the same variables: what the session inherits (the agent's environment, the
client's ``env`` requests, the user's identity) goes through the workspace's
layers (:meth:`~coderagent.workspaceenv.WorkspaceEnvironment.commandEnvironment`:
defaults, the manifest's variables, the agent's own, the script bin directory
on ``PATH``), then the per-connection SSH variables are set.  One deliberate
difference: the agent's own credentials are never handed to the processes it
runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coderagent.workspaceenv import SECRET_AGENT_VARIABLES, UserInfo, WorkspaceEnvironment

__all__ = [
    "MAGIC_SESSION_VARIABLES",
    "SECRET_AGENT_VARIABLES",
    "UserInfo",
    "sessionEnvironment",
]

#: Variables the client may send that upstream interprets instead of exporting.
MAGIC_SESSION_VARIABLES = frozenset(
    {"CODER_SSH_SESSION_TYPE", "CODER_CONTAINER", "CODER_CONTAINER_USER"}
)


def sessionEnvironment(
    *,
    workspace: WorkspaceEnvironment,
    clientEnvironment: Sequence[tuple[str, str]],
    peer: tuple[str, int],
    local: tuple[str, int],
    term: str | None = None,
    ttyName: str | None = None,
    session: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return the complete environment for one session process; ``session`` holds what
    the agent sets for this session only (``SSH_ORIGINAL_COMMAND``), over everything."""
    inherited = {
        k: v for k, v in workspace.agentEnvironment.items() if k not in SECRET_AGENT_VARIABLES
    }
    for key, value in clientEnvironment:
        if key not in MAGIC_SESSION_VARIABLES:
            inherited[key] = value
    user = workspace.user
    inherited["USER"] = user.name
    inherited["LOGNAME"] = user.name
    inherited["SHELL"] = user.shell
    inherited["HOME"] = user.home
    env = workspace.commandEnvironment(inherited)
    env["SSH_CLIENT"] = f"{peer[0]} {peer[1]} {local[1]}"
    env["SSH_CONNECTION"] = f"{peer[0]} {peer[1]} {local[0]} {local[1]}"
    if term is not None:
        env["TERM"] = term
    if ttyName is not None:
        env["SSH_TTY"] = ttyName
    env.update(session or {})
    return env
