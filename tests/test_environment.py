"""Session environment assembly, in upstream's order."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from coderagent.pb import agent_pb2
from coderagent.ssh.environment import UserInfo, sessionEnvironment
from coderagent.workspaceenv import WorkspaceEnvironment

USER = UserInfo(name="dev", home="/home/dev", shell="/bin/bash")
AGENT_ENV = {
    "PATH": "/usr/bin",
    "CODER": "false",
    "CODER_AGENT_TOKEN": "secret",
    "USER": "root",
    "KEEP": "1",
}


def manifest(**fields: object) -> agent_pb2.Manifest:
    base: dict[str, object] = {
        "workspace_name": "ws",
        "agent_name": "main",
        "owner_username": "alice",
        "environment_variables": {"FROM_MANIFEST": "m", "KEEP": "2"},
    }
    base.update(fields)
    return agent_pb2.Manifest(**base)  # type: ignore[arg-type]


def build(
    agentEnvironment: Mapping[str, str] = AGENT_ENV,
    m: agent_pb2.Manifest | None = None,
    binDir: str = "",
    **kw: object,
) -> dict[str, str]:
    workspace = WorkspaceEnvironment(agentEnvironment, USER, scriptBinDir=binDir)
    workspace.update(m if m is not None else manifest())
    args: dict[str, object] = dict(
        workspace=workspace,
        clientEnvironment=[("LANG", "C"), ("CODER_SSH_SESSION_TYPE", "vscode"), ("USER", "evil")],
        peer=("10.0.0.1", 5555),
        local=("127.0.0.1", 2222),
    )
    args.update(kw)
    return sessionEnvironment(**args)  # type: ignore[arg-type]


def test_layers() -> None:
    env = build()
    assert env["PATH"] == "/usr/bin"
    assert env["LANG"] == "C"
    assert env["USER"] == env["LOGNAME"] == "dev"  # identity beats client and agent env
    assert (env["HOME"], env["SHELL"]) == ("/home/dev", "/bin/bash")
    assert env["CODER"] == "true"  # defaults beat the inherited env
    assert env["KEEP"] == "2"  # the manifest's variables beat everything inherited
    assert env["FROM_MANIFEST"] == "m"
    assert env["SSH_CLIENT"] == "10.0.0.1 5555 2222"
    assert env["SSH_CONNECTION"] == "10.0.0.1 5555 127.0.0.1 2222"
    assert "CODER_AGENT_TOKEN" not in env
    assert "CODER_SSH_SESSION_TYPE" not in env
    assert "TERM" not in env and "SSH_TTY" not in env


def test_pty_variables() -> None:
    env = build(term="xterm", ttyName="/dev/pts/3")
    assert (env["TERM"], env["SSH_TTY"]) == ("xterm", "/dev/pts/3")


def test_home_from_environment_when_it_exists(tmp_path: object) -> None:
    assert UserInfo.current({"HOME": str(tmp_path)}).home == str(tmp_path)
    assert UserInfo.current({"HOME": "/nonexistent/dir"}).home != "/nonexistent/dir"


def test_the_whole_environment_exactly() -> None:
    workspace_id = uuid.UUID("22222222-2222-2222-2222-222222222222")
    env = build(
        agentEnvironment={"PATH": "/bin", "CODER_AGENT_TOKEN": "t", "CODER_AGENT_URL": "https://c"},
        m=agent_pb2.Manifest(
            workspace_name="ws",
            agent_name="main",
            owner_username="alice",
            workspace_id=workspace_id.bytes,
            vs_code_port_proxy_uri="https://{{port}}.p.example",
            environment_variables={"EDITOR": "vim", "PATH": "$PATH:/opt/tool/bin"},
        ),
        binDir="/data/coder-script-data/bin",
        clientEnvironment=[("LANG", "C.UTF-8")],
        local=("10.0.0.2", 2222),
        term="xterm-256color",
        ttyName="/dev/pts/0",
    )
    assert env == {
        "PATH": "/data/coder-script-data/bin:/bin:/opt/tool/bin",
        "CODER_AGENT_URL": "https://c",
        "LANG": "C.UTF-8",
        "USER": "dev",
        "LOGNAME": "dev",
        "SHELL": "/bin/bash",
        "HOME": "/home/dev",
        "CODER": "true",
        "CODER_WORKSPACE_NAME": "ws",
        "CODER_WORKSPACE_AGENT_NAME": "main",
        "CODER_WORKSPACE_OWNER_NAME": "alice",
        "CODER_WORKSPACE_ID": str(workspace_id),
        "CS_DISABLE_GETTING_STARTED_OVERRIDE": "true",
        "VSCODE_PROXY_URI": "https://{{port}}.p.example",
        "EDITOR": "vim",
        "SSH_CLIENT": "10.0.0.1 5555 2222",
        "SSH_CONNECTION": "10.0.0.1 5555 10.0.0.2 2222",
        "TERM": "xterm-256color",
        "SSH_TTY": "/dev/pts/0",
    }


def test_the_agents_credentials_are_never_inherited() -> None:
    env = build(
        agentEnvironment={
            "CODER_AGENT_TOKEN": "secret",
            "CODER_AGENT_HEADER": "X-Auth=secret",
            "CODER_AGENT_URL": "https://coder.example",
        }
    )
    assert "CODER_AGENT_TOKEN" not in env and "CODER_AGENT_HEADER" not in env
    assert "secret" not in "".join(env.values())
    assert env["CODER_AGENT_URL"] == "https://coder.example"  # configuration, not a secret


def test_client_requests_are_exported_in_order_except_the_interpreted_ones() -> None:
    env = build(
        clientEnvironment=[
            ("LANG", "C"),
            ("LANG", "en_US.UTF-8"),  # a repeat: the last one counts
            ("PATH", "/client/bin"),  # the client's beats the agent's
            ("CODER_SSH_SESSION_TYPE", "vscode"),
            ("CODER_CONTAINER", "c1"),
            ("CODER_CONTAINER_USER", "root"),
        ]
    )
    assert (env["LANG"], env["PATH"]) == ("en_US.UTF-8", "/client/bin")
    assert not {"CODER_SSH_SESSION_TYPE", "CODER_CONTAINER", "CODER_CONTAINER_USER"} & set(env)


def test_identity_defaults_manifest_and_ssh_variables_beat_the_client() -> None:
    sent = {
        "USER": "evil",
        "LOGNAME": "evil",
        "SHELL": "/bin/evil",
        "HOME": "/evil",
        "CODER": "false",
        "CODER_WORKSPACE_NAME": "evil",
        "KEEP": "client",
        "SSH_CLIENT": "6.6.6.6 1 1",
        "SSH_CONNECTION": "6.6.6.6 1 6.6.6.6 1",
    }
    env = build(clientEnvironment=list(sent.items()))
    assert {k: env[k] for k in sent} == {
        "USER": "dev",
        "LOGNAME": "dev",
        "SHELL": "/bin/bash",
        "HOME": "/home/dev",
        "CODER": "true",
        "CODER_WORKSPACE_NAME": "ws",
        "KEEP": "2",
        "SSH_CLIENT": "10.0.0.1 5555 2222",
        "SSH_CONNECTION": "10.0.0.1 5555 127.0.0.1 2222",
    }


def test_the_manifest_beats_identity_and_defaults() -> None:
    env = build(m=manifest(environment_variables={"HOME": "/workspace", "CODER": "override"}))
    assert (env["HOME"], env["CODER"], env["USER"]) == ("/workspace", "override", "dev")


def test_ssh_variables_name_ipv6_peers_as_sshd_does() -> None:
    env = build(peer=("2001:db8::7", 40000), local=("::1", 22))
    assert env["SSH_CLIENT"] == "2001:db8::7 40000 22"
    assert env["SSH_CONNECTION"] == "2001:db8::7 40000 ::1 22"


def test_a_pty_sets_term_and_ssh_tty_over_inherited_values() -> None:
    agent = {"TERM": "dumb", "SSH_TTY": "/dev/pts/99"}
    env = build(agentEnvironment=agent, clientEnvironment=[("TERM", "vt100")])
    assert env["TERM"] == "vt100"  # no pty: the client's request beats the agent's
    env = build(
        agentEnvironment=agent,
        clientEnvironment=[("TERM", "vt100")],
        term="xterm",
        ttyName="/dev/pts/3",
    )
    assert (env["TERM"], env["SSH_TTY"]) == ("xterm", "/dev/pts/3")
