"""``coder-agent policy check`` and ``explain``, as an operator runs them (a real process)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from coderagent.netaddr import resolve
from coderagent.policy import explain

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
REPO = Path(__file__).resolve().parent.parent


def run(*args: str, resolver: explain.Resolver | None = None) -> tuple[int, list[str]]:
    """Run ``coder-agent policy ARGS`` in this process; its exit status and lines."""
    parser = argparse.ArgumentParser()
    explain.addParser(parser.add_subparsers(dest="command"))
    lines: list[str] = []
    parsed = parser.parse_args(["policy", *args])
    code = explain.run(parsed, lines.append, resolver or resolve)
    return code, lines


def test_check_a_good_file() -> None:
    code, lines = run("check", str(EXAMPLES / "dev-server-only.toml"))
    assert code == 0
    assert lines == [
        f"{EXAMPLES / 'dev-server-only.toml'}: ok (enforce; local_tcp: 2 rules, default deny)"
    ]


def test_check_a_bad_file_lists_each_error_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[reverse_tcp]\ndefault = "deny"\n'
        '[[reverse_tcp.rules]]\naction = "allow"\nbind = "300.1.1.1/8"\n'
    )
    code, lines = run("check", str(bad))
    assert code == 1
    assert lines == [
        f"{bad}: line 3: reverse_tcp rule 1: "
        "'300.1.1.1/8' is not an address, a network or a host name"
    ]


def test_explain_a_local_forward_per_address() -> None:
    def fake(host: str, port: int) -> list[str]:
        assert (host, port) == ("app.test", 3000)
        return ["10.0.0.5", "127.0.0.1"]

    code, lines = run(
        "explain", str(EXAMPLES / "dev-server-only.toml"), "--local", "app.test:3000", resolver=fake
    )
    assert code == 0  # only the loopback address: the file allows 127.0.0.1 whatever its name
    assert lines == [
        "local tcp app.test:3000",
        "  10.0.0.5: refused by 'no-internal-networks': forwarding to app.test:3000 refused by "
        "policy rule 'no-internal-networks'",
        "  127.0.0.1: allowed",
        "result: allowed (would connect to 127.0.0.1)",
    ]
    code, lines = run(
        "explain",
        str(EXAMPLES / "dev-server-only.toml"),
        "--local",
        "db.example:3000",
        resolver=lambda h, p: ["192.0.2.7"],
    )
    assert code == 2
    assert lines[-1] == (
        "result: refused by 'local_tcp default': forwarding to db.example:3000 refused by "
        "policy rule 'local_tcp default'"
    )
    code, lines = run(
        "explain",
        str(EXAMPLES / "dev-server-only.toml"),
        "--local",
        "localhost:3000",
        resolver=lambda h, p: ["127.0.0.1", "::1"],
    )
    assert code == 0
    assert lines[-1] == "result: allowed (would connect to 127.0.0.1, ::1)"


def test_explain_with_a_key_line() -> None:
    code, lines = run(
        "explain",
        str(EXAMPLES / "oauth-callback.toml"),
        "--reverse",
        "localhost:8976",
        "--key",
        'restrict,permitlisten="9000" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI',
    )
    assert code == 2
    assert lines == [
        "reverse tcp localhost:8976: refused by 'authorized_keys options': refused by the key's "
        'options (restrict,permitlisten="9000")'
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--reverse-unix", "/run/user/1000/gnupg/S.gpg-agent"], 0),
        (["--reverse-unix", "/run/user/1000/gnupg/../gnupg/S.gpg-agent.ssh"], 2),
        (["--local-unix", "/var/run/docker.sock"], 2),
    ],
)
def test_explain_unix_paths(args: list[str], expected: int) -> None:
    code, _ = run("explain", str(EXAMPLES / "gpg-agent.toml"), *args)
    assert code == expected


def test_the_installed_command() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coderagent.control.cli",
            "policy",
            "check",
            str(EXAMPLES / "gpg-agent.toml"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(
        "ok (enforce; local_unix: 0 rules, default deny, reverse_unix: 1 rules, default deny)\n"
    )
