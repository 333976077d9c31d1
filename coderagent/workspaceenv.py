"""What every command the agent runs for the workspace starts with.

SSH sessions, ``coder_script`` runs and (later) metadata commands all start
the way upstream's ``CreateCommand`` and ``updateCommandEnv`` start them:

* **the environment** (:meth:`WorkspaceEnvironment.commandEnvironment`): the
  agent's defaults (``CODER=true``, the workspace's names, code-server's
  ``CS_DISABLE_GETTING_STARTED_OVERRIDE`` and ``VSCODE_PROXY_URI``) win over
  what the command inherits; the manifest's ``environment_variables``
  (``coder_agent.env`` and ``coder_env``), each expanded with Go's
  ``os.ExpandEnv`` against the agent's own environment, win over those; the
  agent's own variables (the boundary socket) over everything; and the script
  bin directory goes first on ``PATH``;
* **the working directory** (:meth:`WorkspaceEnvironment.workingDirectory`):
  the manifest's ``directory`` expanded as upstream's ``expandDirectory``
  does, or the home directory when it is unset or missing;
* **the command line** (:func:`commandLine`): ``$SHELL -c <script>``, or the
  interpreter a ``#!`` line names.

One deliberate difference, everywhere: the agent's credentials never reach
these processes, neither as variables nor through ``$VAR`` expansion of the
manifest (upstream hands every command ``CODER_AGENT_TOKEN``).

The manifest is replaced as a whole when a new one arrives, so a variable a
later manifest drops is gone from the next command.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import shlex
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from coderagent.gotext import goExpand
from coderagent.pb import agent_pb2

#: Agent configuration that holds secrets; never inherited, never expanded.
SECRET_AGENT_VARIABLES = frozenset({"CODER_AGENT_TOKEN", "CODER_AGENT_HEADER"})


@dataclass(frozen=True)
class UserInfo:
    """Who commands run as: always the agent's own user (no setuid)."""

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


def goClean(path: str) -> str:
    """Go's ``filepath.Clean`` on Unix (unlike ``normpath``, ``//x`` becomes ``/x``)."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def goJoin(*parts: str) -> str:
    """Go's ``filepath.Join``: the non-empty parts joined by ``/``, then cleaned."""
    kept = [p for p in parts if p]
    return goClean("/".join(kept)) if kept else ""


def expandDirectory(directory: str, home: str, environ: Mapping[str, str]) -> str:
    """The manifest's ``directory`` as upstream's ``expandDirectory`` makes it.

    Empty stays empty (and is what ``UpdateStartup`` reports); a leading
    ``~`` is the home directory; ``$VARS`` are expanded against the agent's
    environment; a relative result is made absolute under the home directory.
    """
    if not directory:
        return ""
    if directory[0] == "~":
        directory = goJoin(home, directory[1:])
    directory = goExpand(directory, _lookup(environ))
    if not directory.startswith("/"):
        directory = goJoin(home, directory)
    return directory


def _lookup(environ: Mapping[str, str]) -> Callable[[str], str]:
    def lookup(name: str) -> str:
        if name in SECRET_AGENT_VARIABLES:
            return ""
        return environ.get(name, "")

    return lookup


class CommandLineError(ValueError):
    """A script's ``#!`` line cannot be read."""


def commandLine(shell: str, script: str) -> list[str]:
    """The argv upstream's ``CreateCommand`` runs ``script`` with.

    ``$SHELL -c <script>``, unless the script starts (after blank space) with
    ``#!``: then the words of that line, split as a shell would, followed by
    ``-c <script>`` (so ``#!/usr/bin/env python3`` runs ``/usr/bin/env python3
    -c <script>``).  A ``#!`` line that cannot be split, or names nothing,
    raises :class:`CommandLineError`.
    """
    stripped = script.strip()
    if not stripped.startswith("#!"):
        return [shell, "-c", script]
    line = stripped.split("\n", 1)[0].strip()[2:]
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise CommandLineError(f"split shebang: {e}") from e
    if not words:
        raise CommandLineError("split shebang: the #! line names no interpreter")
    return [*words, "-c", script]


@dataclass
class WorkspaceEnvironment:
    """The workspace as the processes the agent starts see it (see the module docstring)."""

    agentEnvironment: Mapping[str, str]
    user: UserInfo
    #: Upstream's ``CODER_SCRIPT_BIN_DIR``: first on every command's ``PATH``.
    scriptBinDir: str = ""
    manifest: agent_pb2.Manifest | None = None
    #: The agent's own variables (upstream's agent-level ``EnvironmentVariables``).
    agentVariables: dict[str, str] = field(default_factory=dict)

    def update(self, manifest: agent_pb2.Manifest) -> None:
        """Use ``manifest`` from now on (it replaces the previous one whole)."""
        self.manifest = manifest

    def setVariable(self, name: str, value: str) -> None:
        """An agent-level variable every command gets, over everything else."""
        self.agentVariables[name] = value

    @property
    def home(self) -> str:
        return self.user.home

    def expandDirectory(self, directory: str) -> str:
        """:func:`expandDirectory` with the agent's home and environment."""
        home = self.agentEnvironment.get("HOME") or self.user.home
        return expandDirectory(directory, home, self.agentEnvironment)

    @property
    def expandedDirectory(self) -> str:
        """The manifest's directory, expanded; ``""`` when it sets none (or before one)."""
        if self.manifest is None:
            return ""
        return self.expandDirectory(self.manifest.directory)

    def workingDirectory(self) -> str:
        """Where commands start: the expanded directory if it is one, else the home."""
        directory = self.expandedDirectory
        if directory and os.path.isdir(directory):
            return directory
        return self.user.home

    @property
    def motdPath(self) -> str:
        return self.manifest.motd_path if self.manifest is not None else ""

    def baseEnvironment(self) -> dict[str, str]:
        """What a command inherits before the layers: the agent's environment
        (without its secrets) and the user's identity."""
        env = {k: v for k, v in self.agentEnvironment.items() if k not in SECRET_AGENT_VARIABLES}
        env["USER"] = self.user.name
        env["LOGNAME"] = self.user.name
        env["SHELL"] = self.user.shell
        env["HOME"] = self.user.home
        return env

    def defaults(self) -> dict[str, str]:
        """The variables the agent sets, which win over inherited ones."""
        variables = {"CODER": "true"}
        m = self.manifest
        if m is None:
            return variables
        variables["CODER_WORKSPACE_NAME"] = m.workspace_name
        variables["CODER_WORKSPACE_AGENT_NAME"] = m.agent_name
        variables["CS_DISABLE_GETTING_STARTED_OVERRIDE"] = "true"
        if m.vs_code_port_proxy_uri:
            variables["VSCODE_PROXY_URI"] = m.vs_code_port_proxy_uri
        # Ours (upstream sets neither): who owns the workspace, and its id.
        if m.owner_username:
            variables["CODER_WORKSPACE_OWNER_NAME"] = m.owner_username
        if len(m.workspace_id) == 16:
            variables["CODER_WORKSPACE_ID"] = str(uuid.UUID(bytes=m.workspace_id))
        return variables

    def commandEnvironment(self, current: Mapping[str, str]) -> dict[str, str]:
        """Upstream's ``updateCommandEnv`` applied to ``current`` (what the command inherits)."""
        env = self.defaults()
        for key, value in current.items():
            env.setdefault(key, value)
        if self.manifest is not None:
            lookup = _lookup(self.agentEnvironment)
            for key, value in self.manifest.environment_variables.items():
                env[key] = goExpand(value, lookup)
        env.update(self.agentVariables)
        if self.scriptBinDir:
            path = env.get("PATH", self.agentEnvironment.get("PATH", ""))
            env["PATH"] = f"{self.scriptBinDir}{os.pathsep}{path}"
        for secret in SECRET_AGENT_VARIABLES:
            env.pop(secret, None)
        return env
