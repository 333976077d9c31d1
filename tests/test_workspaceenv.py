"""The workspace's side of every command: environment layers, directory, command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from coderagent.pb import agent_pb2
from coderagent.workspaceenv import (
    CommandLineError,
    UserInfo,
    WorkspaceEnvironment,
    commandLine,
    expandDirectory,
    goJoin,
)

USER = UserInfo(name="dev", home="/home/dev", shell="/bin/zsh")


@pytest.mark.parametrize(
    ("directory", "expanded"),
    [
        ("", ""),  # upstream reports the empty directory as it is
        ("~", "/home/dev"),
        ("~/src", "/home/dev/src"),
        ("~src", "/home/dev/src"),  # filepath.Join(home, dir[1:])
        ("~/a/../b/", "/home/dev/b"),  # joined paths are cleaned
        ("$PROJECTS/app", "/srv/projects/app"),
        ("${PROJECTS}/app/", "/srv/projects/app/"),  # absolute: expanded, not cleaned
        ("src/app", "/home/dev/src/app"),  # relative: under the home
        ("$UNSET/x", "/x"),
        ("$CODER_AGENT_TOKEN", "/home/dev"),  # a secret expands to nothing
    ],
)
def test_the_directory_is_expanded_as_upstream(directory: str, expanded: str) -> None:
    env = {"PROJECTS": "/srv/projects", "CODER_AGENT_TOKEN": "secret"}
    assert expandDirectory(directory, "/home/dev", env) == expanded


def test_go_join_cleans_as_go_does() -> None:
    assert goJoin("/home", "") == "/home"
    assert goJoin("", "x") == "x"
    assert goJoin("//a", "b/") == "/a/b"
    assert goJoin("", "") == ""


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("echo hi", ["/bin/zsh", "-c", "echo hi"]),
        ("#!/bin/bash\necho hi", ["/bin/bash", "-c", "#!/bin/bash\necho hi"]),
        (
            "\n  #!/usr/bin/env python3 -u\nprint(1)\n",
            ["/usr/bin/env", "python3", "-u", "-c", "\n  #!/usr/bin/env python3 -u\nprint(1)\n"],
        ),
        ("#! '/opt/my tool' x\n", ["/opt/my tool", "x", "-c", "#! '/opt/my tool' x\n"]),
        ("echo '#!/bin/sh'", ["/bin/zsh", "-c", "echo '#!/bin/sh'"]),
    ],
)
def test_the_command_line_is_the_shell_or_the_shebang(script: str, argv: list[str]) -> None:
    assert commandLine("/bin/zsh", script) == argv


@pytest.mark.parametrize(
    ("script", "message"),
    [("#!\necho", "names no interpreter"), ("#!/bin/sh 'unterminated\n", "split shebang")],
)
def test_a_bad_shebang_is_a_clear_error(script: str, message: str) -> None:
    with pytest.raises(CommandLineError, match=message):
        commandLine("/bin/sh", script)


def workspace(**kw: object) -> WorkspaceEnvironment:
    env = {"PATH": "/usr/bin", "HOME": "/home/dev", "CODER_AGENT_TOKEN": "secret", "A": "agent"}
    return WorkspaceEnvironment(env, USER, **kw)  # type: ignore[arg-type]


def test_before_any_manifest_only_the_defaults_and_the_bin_dir() -> None:
    w = workspace(scriptBinDir="/data/bin")
    env = w.commandEnvironment(w.baseEnvironment())
    assert env == {
        "PATH": "/data/bin:/usr/bin",
        "HOME": "/home/dev",
        "A": "agent",
        "CODER": "true",
        "USER": "dev",
        "LOGNAME": "dev",
        "SHELL": "/bin/zsh",
    }
    assert w.expandedDirectory == "" and w.workingDirectory() == "/home/dev"


def test_manifest_variables_expand_against_the_agents_environment_never_its_secrets() -> None:
    w = workspace()
    w.update(
        agent_pb2.Manifest(
            environment_variables={
                "FROM_AGENT": "${A}-$A",
                "PATH": "$PATH:/opt/bin",
                "LEAK": "t=$CODER_AGENT_TOKEN",
                "CODER_AGENT_TOKEN": "set by the template",
            }
        )
    )
    env = w.commandEnvironment({"A": "session", "PATH": "/session/bin"})
    assert env["FROM_AGENT"] == "agent-agent"  # os.ExpandEnv: the agent's, not the session's
    assert env["PATH"] == "/usr/bin:/opt/bin"
    assert env["LEAK"] == "t="
    assert "CODER_AGENT_TOKEN" not in env


def test_a_later_manifest_replaces_the_variables_whole() -> None:
    w = workspace()
    w.update(agent_pb2.Manifest(environment_variables={"OLD": "1", "BOTH": "old"}))
    w.update(agent_pb2.Manifest(environment_variables={"BOTH": "new"}))
    env = w.commandEnvironment({})
    assert env["BOTH"] == "new" and "OLD" not in env


def test_agent_variables_beat_the_manifest() -> None:
    w = workspace()
    w.update(agent_pb2.Manifest(environment_variables={"CODER_BOUNDARY_LOG_SOCKET": "/x"}))
    w.setVariable("CODER_BOUNDARY_LOG_SOCKET", "/run/boundary.sock")
    assert w.commandEnvironment({})["CODER_BOUNDARY_LOG_SOCKET"] == "/run/boundary.sock"


def test_the_working_directory_is_the_manifests_when_it_exists(tmp_path: Path) -> None:
    w = workspace()
    w.update(agent_pb2.Manifest(directory=str(tmp_path)))
    assert w.workingDirectory() == str(tmp_path)
    w.update(agent_pb2.Manifest(directory=str(tmp_path / "missing")))
    assert w.expandedDirectory == str(tmp_path / "missing")
    assert w.workingDirectory() == "/home/dev"
    (tmp_path / "file").write_text("")
    w.update(agent_pb2.Manifest(directory=str(tmp_path / "file")))
    assert w.workingDirectory() == "/home/dev"
