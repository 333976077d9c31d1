"""Session environment assembly, in upstream's order."""

from __future__ import annotations

from coderagent.ssh.environment import UserInfo, sessionEnvironment

USER = UserInfo(name="dev", home="/home/dev", shell="/bin/bash")


def build(**kw: object) -> dict[str, str]:
    args: dict[str, object] = dict(
        agentEnvironment={
            "PATH": "/usr/bin",
            "CODER": "false",
            "CODER_AGENT_TOKEN": "secret",
            "USER": "root",
            "KEEP": "1",
        },
        clientEnvironment=[("LANG", "C"), ("CODER_SSH_SESSION_TYPE", "vscode"), ("USER", "evil")],
        user=USER,
        defaults={"CODER": "true"},
        overrides={"FROM_MANIFEST": "m", "KEEP": "2"},
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
    assert env["KEEP"] == "2"  # overrides beat everything
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
