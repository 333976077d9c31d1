"""What a template's manifest changes for the person who logs in: real agent, coderd-dev, ssh."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.agentproc import (
    REPO,
    Agent,
    ClientKeys,
    Coderd,
    runningAgent,
    runningCoderd,
    ssh,
    sshOptions,
)

CONNECTED = re.compile(r"coderagent\.coderd\.client: connected to coderd at ")


@contextmanager
def workspace(
    tmp_path: Path, clientKeys: ClientKeys, manifest: dict[str, Any], *agentArgs: str
) -> Iterator[tuple[Coderd, Agent]]:
    """coderd-dev serving ``manifest`` and an agent connected to it, until READY."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with runningCoderd(tmp_path / "coderd", token="tok", extra=[f"--manifest={path}"]) as coderd:
        args = [f"--agent-url={coderd.url}", "--agent-token=tok", *agentArgs]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            coderd.waitForLog(r"agent lifecycle: (READY|START_ERROR|START_TIMEOUT)")
            yield coderd, agent


def test_sessions_start_in_the_manifest_directory_with_its_variables(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    home = tmp_path / "agent" / "home"
    (home / "project").mkdir(parents=True)
    manifest = {
        "directory": "project",  # relative: under $HOME
        "environment_variables": {
            "EDITOR": "vim",
            "GREETING": "hello from $HOME",  # expanded against the agent's environment
            "CODER": "from the template",  # the manifest wins over the agent's defaults
        },
        "vs_code_port_proxy_uri": "https://{{port}}.proxy.example",
    }
    with workspace(tmp_path, clientKeys, manifest) as (coderd, agent):
        coderd.waitForLog(f"agent startup: version \\S+, directory {re.escape(str(home))}/project")
        result = ssh(
            agent,
            clientKeys.key,
            'pwd; echo "$EDITOR|$GREETING|$CODER|$VSCODE_PROXY_URI"; '
            'echo "$CS_DISABLE_GETTING_STARTED_OVERRIDE|${CODER_AGENT_TOKEN-unset}"',
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == [
            f"{home}/project",
            f"vim|hello from {home}|from the template|https://{{{{port}}}}.proxy.example",
            "true|unset",
        ]
        # A login shell on a terminal starts there too.
        shell = ssh(
            agent,
            clientKeys.key,
            options=["-tt"],
            input=b'echo "DIR=$(pwd) EDITOR=$EDITOR"; exit\n',
        )
        assert f"DIR={home}/project EDITOR=vim\r\n".encode() in shell.stdout, shell.stdout
        # SFTP stays rooted at the home directory, as upstream.
        listing = subprocess.run(
            ["sftp", *_sftpOptions(agent, clientKeys), "-b", "-", f"coder@{agent.host}"],
            input=b"pwd\n",
            capture_output=True,
            timeout=60,
        )
        assert f"Remote working directory: {home}\n".encode() in listing.stdout, listing


def test_a_missing_directory_falls_back_to_the_home(clientKeys: ClientKeys, tmp_path: Path) -> None:
    home = tmp_path / "agent" / "home"
    with workspace(tmp_path, clientKeys, {"directory": "/nonexistent/dir"}) as (coderd, agent):
        coderd.waitForLog("agent startup: version \\S+, directory /nonexistent/dir")
        result = ssh(agent, clientKeys.key, "pwd")
        assert result.stdout == f"{home}\n".encode()


def _sftpOptions(agent: Agent, clientKeys: ClientKeys) -> list[str]:
    options = sshOptions(agent, clientKeys.key)
    i = options.index("-p")
    return [*options[:i], "-P", options[i + 1]]


def test_login_shells_show_the_banners_then_the_motd(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    motd = tmp_path / "motd"
    motd.write_bytes(b"Welcome to the workspace\r\nsecond line\nno newline at the end")
    manifest = {
        "motd_path": str(motd),
        "banners": ["  Maintenance tonight at 22:00  ", "Two\nlines"],
    }
    banners = b"Maintenance tonight at 22:00\r\n\r\nTwo\r\nlines\r\n\r\n"
    text = b"Welcome to the workspace\r\nsecond line\r\nno newline at the end\r\n"
    home = tmp_path / "agent" / "home"
    with workspace(tmp_path, clientKeys, manifest) as (_, agent):
        login = ssh(agent, clientKeys.key, options=["-tt"], input=b"exit\n")
        assert login.stdout.startswith(banners + text), login.stdout
        # Not a login shell: a command, with or without a terminal, and a shell without one.
        assert ssh(agent, clientKeys.key, "echo plain").stdout == b"plain\n"
        tty = ssh(agent, clientKeys.key, "-tt", "echo tty")
        assert tty.stdout == b"tty\r\n", tty.stdout
        noTerminal = ssh(agent, clientKeys.key, options=["-T"], input=b"echo no terminal\n")
        assert noTerminal.stdout == b"no terminal\n"
        # ~/.hushlogin: the MOTD goes, the banners stay (as upstream).
        (home / ".hushlogin").touch()
        quiet = ssh(agent, clientKeys.key, options=["-tt"], input=b"exit\n")
        assert quiet.stdout.startswith(banners), quiet.stdout
        assert b"Welcome" not in quiet.stdout


def test_the_example_template_runs_as_the_readme_says(
    clientKeys: ClientKeys, tmp_path: Path
) -> None:
    template = REPO / "examples" / "template.json"
    with runningCoderd(tmp_path / "coderd", token="tok", extra=[f"--manifest={template}"]) as cd:
        args = [f"--agent-url={cd.url}", "--agent-token=tok"]
        with runningAgent(clientKeys, tmp_path / "agent", args) as agent:
            cd.waitForLog("agent lifecycle: READY")
            cd.waitForLog(r'script_log  source="Install hello-coder"  level=info  output="Done: ')
            tool = ssh(agent, clientKeys.key, "hello-coder")
            assert tool.stdout.startswith(b"Hello from a tool a coder_script installed"), tool
            login = ssh(agent, clientKeys.key, options=["-tt"], input=b"exit\n")
            assert login.stdout.startswith(b"This is coderagent's example template"), login
            assert b"\r\nWelcome to the coderagent example workspace.\r\n" in login.stdout
        cd.waitForLog(r'script_completed  script="Save state"  stage=STOP  status=OK')
        cd.waitForLog("agent lifecycle: OFF")
