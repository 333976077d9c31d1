"""The policy file, the key options and the one Policy object that combines them with the flags."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from coderagent.policy import (
    KeyOptionError,
    KeyOptions,
    Policy,
    PolicyFileError,
    loadPolicy,
    normalisePath,
    parseKeyOptions,
)
from coderagent.policy.patterns import PatternError, matchAddressList, matchHostAndAddress

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"


def policy(text: str, **flags: bool) -> Policy:
    return Policy(rules=loadPolicy(text.encode()), **flags)


def example(name: str) -> Policy:
    return Policy(rules=loadPolicy((EXAMPLES / name).read_bytes()))


# -- OpenSSH's patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "patterns", "result"),
    [
        ("10.1.2.3", "10.0.0.0/8", 1),
        ("10.1.2.3", "!10.1.0.0/16,10.0.0.0/8", -1),
        ("10.1.2.3", "192.168.*", 0),
        ("192.168.4.5", "192.168.*", 1),
        ("127.0.0.2", "127.0.0.?", 1),
        ("::1", "::1", 1),
        ("::1", "127.0.0.1", 0),
        ("not an address", "*", 0),
    ],
)
def test_address_lists(address: str, patterns: str, result: int) -> None:
    assert matchAddressList(address, patterns) == result


def test_a_mask_with_host_bits_is_an_error_as_in_sshd() -> None:
    with pytest.raises(PatternError, match="inconsistent mask length"):
        matchAddressList("10.0.0.1", "10.0.0.1/8")
    with pytest.raises(PatternError):
        matchAddressList("10.0.0.1", "10.0.0.0/8,,")


def test_from_host_and_address() -> None:
    assert matchHostAndAddress("127.0.0.2", "127.0.0.2", "127.0.0.2")
    assert not matchHostAndAddress("127.0.0.1", "127.0.0.1", "127.0.0.2")
    assert not matchHostAndAddress("127.0.0.2", "127.0.0.2", "127.0.0.0/8,!127.0.0.2")
    assert matchHostAndAddress("127.0.0.3", "127.0.0.3", "127.0.0.0/8,!127.0.0.2")


# -- authorized_keys options -------------------------------------------------------------


def test_restrict_then_re_enabling_options() -> None:
    options = parseKeyOptions('restrict,port-forwarding,permitopen="db:5432",permitopen="*:80"')
    assert not options.pty and not options.agentForwarding and options.portForwarding
    assert options.allowsOpen("db", 5432) and options.allowsOpen("any.host", 80)
    assert not options.allowsOpen("db", 5433) and not options.allowsOpen("DB", 5432)


def test_permitlisten_bare_port_means_any_address() -> None:
    options = parseKeyOptions('permitlisten="8080",permitlisten="localhost:9000"')
    assert options.allowsListen("0.0.0.0", 8080) and options.allowsListen("localhost", 8080)
    assert options.allowsListen("LOCALHOST", 9000) and not options.allowsListen("0.0.0.0", 9000)
    assert not options.allowsListen("localhost", 0)


def test_quoting_command_and_from() -> None:
    options = parseKeyOptions(r'command="echo \"hi\", there",from="127.0.0.2,!10.*",no-pty')
    assert options.command == 'echo "hi", there'
    assert options.usableFrom("127.0.0.2") is None
    assert options.usableFrom("127.0.0.1") is not None
    assert not options.pty and options.portForwarding


def test_expiry_time() -> None:
    options = parseKeyOptions('expiry-time="20200101Z"')
    assert options.usableFrom("127.0.0.1") == "the key's expiry-time has passed"
    future = parseKeyOptions('expiry-time="29991231235959Z"')
    assert future.usableFrom("127.0.0.1", now=time.time()) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('tunnel="1"', "'tunnel' is not supported"),
        ("cert-authority", "'cert-authority' is not supported"),
        ('environment="A=b"', "'environment' is not supported"),
        ("no-touch-required", "'no-touch-required' is not supported"),
        ("frobnicate", "unknown key option 'frobnicate'"),
        ('command="a",command="b"', "multiple"),
        ('permitopen="db"', "invalid permission hostname"),
        ('permitopen="db:99999"', "invalid permission port"),
        ('from="10.0.0.1/8"', "invalid from criteria"),
        ('command="open', "missing end quote"),
        ("restrict,", "unexpected end-of-options"),
        ('expiry-time="2020"', "invalid expires time"),
    ],
)
def test_options_that_cannot_be_honoured_refuse_the_line(text: str, message: str) -> None:
    with pytest.raises(KeyOptionError, match=message):
        parseKeyOptions(text)


def test_agent_and_x11_flags_change_nothing_we_offer() -> None:
    options = parseKeyOptions("no-agent-forwarding,no-X11-forwarding")
    assert options.portForwarding and options.pty


# -- the policy file ----------------------------------------------------------------------


def test_the_readme_examples_load() -> None:
    for path in sorted(EXAMPLES.glob("*.toml")):
        loadPolicy(path.read_bytes())


def test_every_error_comes_with_its_line() -> None:
    text = """mode = "maybe"

[local_tcp]
default = "deny"

[[local_tcp.rules]]
action = "allow"
host = "10.0.0.1/8"

[[local_tcp.rules]]
action = "allow"
hots = "db"

[reverse_tcp]
default = "allow"
[[reverse_tcp.rules]]
action = "allow"
ports = "70000"

[bogus]
"""
    with pytest.raises(PolicyFileError) as e:
        loadPolicy(text.encode())
    assert e.value.errors == [
        'line 1: mode must be "enforce" or "audit", not \'maybe\'',
        "line 6: local_tcp rule 1: inconsistent mask length in '10.0.0.1/8'",
        "line 10: local_tcp rule 2: unknown key 'hots' (keys: action, host, name, ports)",
        "line 16: reverse_tcp rule 1: ports: '70000' is out of 0-65535 or backwards",
        "line 20: unknown section [bogus] (sections: local_tcp, reverse_tcp, local_unix, "
        "reverse_unix, file_transfer)",
    ]


def test_a_toml_syntax_error_says_where() -> None:
    with pytest.raises(PolicyFileError, match=r"line 2"):
        loadPolicy(b'[local_tcp]\ndefault = deny"\n')


# -- decisions ----------------------------------------------------------------------------


def test_dev_server_example() -> None:
    p = example("dev-server-only.toml")
    ok = p.localTCP("localhost", 3000, ["127.0.0.1", "::1"])
    assert ok.decision.allowed and ok.addresses == ("127.0.0.1", "::1")
    db = p.localTCP("localhost", 5432, ["127.0.0.1"])
    assert not db.decision.allowed and db.decision.rule == "local_tcp default"
    assert "refused by policy rule 'local_tcp default'" in db.decision.reason
    cluster = p.localTCP("db.cluster.internal", 5432, ["10.3.0.7"])
    assert cluster.decision.rule == "no-internal-networks"


def test_a_name_resolving_to_allowed_and_refused_addresses_connects_only_to_the_allowed() -> None:
    p = policy(
        """
[local_tcp]
default = "deny"
[[local_tcp.rules]]
name = "no-private"
action = "deny"
host = "10.0.0.0/8"
[[local_tcp.rules]]
name = "app"
action = "allow"
host = "app.test"
"""
    )
    mixed = p.localTCP("app.test", 80, ["10.9.9.9", "127.0.0.1"])
    assert mixed.decision.allowed and mixed.addresses == ("127.0.0.1",)
    rebound = p.localTCP("app.test", 80, ["10.9.9.9"])
    assert not rebound.decision.allowed and rebound.decision.rule == "no-private"
    literal = p.localTCP("127.0.0.1", 80, ["127.0.0.1"])  # an address is not the name "app.test"
    assert not literal.decision.allowed and literal.decision.rule == "local_tcp default"


def test_oauth_callback_example() -> None:
    p = example("oauth-callback.toml")
    assert p.reverseTCP("localhost", 8976).allowed
    assert p.reverseTCP("127.0.0.1", 8976).allowed
    assert p.reverseTCP("::1", 8976).allowed
    assert p.reverseTCP("", 8976).rule == "reverse_tcp default"  # every interface
    assert p.reverseTCP("0.0.0.0", 8976).rule == "reverse_tcp default"
    assert not p.reverseTCP("localhost", 8977).allowed
    assert p.localTCP("anything", 1, ["192.0.2.1"]).decision.allowed  # no local_tcp section


def test_gpg_agent_example(tmp_path: Path) -> None:
    p = example("gpg-agent.toml")
    assert p.reverseUnix("/run/user/1000/gnupg/S.gpg-agent").allowed
    assert p.reverseUnix("/run/user/1000/gnupg/S.gpg-agent.extra").allowed
    assert not p.reverseUnix("/run/user/1000/gnupg/S.gpg-agent.ssh").allowed
    assert not p.reverseUnix("/tmp/x.sock").allowed
    assert not p.localUnix("/var/run/docker.sock").allowed


def test_paths_are_decided_normalised(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert normalisePath(f"{tmp_path}/allowed/../real/s.sock") == f"{real}/s.sock"
    assert normalisePath(f"{tmp_path}/link/s.sock") == f"{real}/s.sock"
    assert normalisePath("rel.sock", cwd=str(real)) == f"{real}/rel.sock"
    assert os.path.isabs(normalisePath("x"))


def test_the_flags_are_the_hard_switch() -> None:
    p = policy(
        """
[local_tcp]
default = "allow"
[reverse_unix]
default = "allow"
""",
        blockLocalPortForwarding=True,
        blockReversePortForwarding=True,
    )
    local = p.localTCP("localhost", 80, ["127.0.0.1"])
    assert not local.decision.allowed and local.decision.rule == "--block-local-port-forwarding"
    assert p.reverseUnix("/tmp/s").rule == "--block-reverse-port-forwarding"


def test_key_options_narrow_what_the_file_allows() -> None:
    p = Policy()
    key = parseKeyOptions('restrict,port-forwarding,permitopen="localhost:3000"')
    assert p.localTCP("localhost", 3000, ["127.0.0.1"], key).decision.allowed
    refused = p.localTCP("localhost", 3001, ["127.0.0.1"], key).decision
    assert not refused.allowed and refused.rule == "authorized_keys options"
    assert not p.allowPty(key).allowed and p.allowPty(None).allowed
    noForwarding = parseKeyOptions("no-port-forwarding")
    assert not p.reverseUnix("/tmp/s", noForwarding).allowed
    assert not p.localUnix("/tmp/s", noForwarding).allowed
    assert p.reverseUnix("/tmp/s", KeyOptions()).allowed


def test_forced_command() -> None:
    p = Policy()
    key = parseKeyOptions('command="/usr/bin/backup"')
    assert p.sessionCommand("rm -rf /", key) == ("/usr/bin/backup", "rm -rf /")
    assert p.sessionCommand(None, key) == ("/usr/bin/backup", None)
    assert p.sessionCommand("ls", None) == ("ls", None)


def test_audit_mode_allows_and_marks_what_it_would_refuse() -> None:
    p = policy(
        """
mode = "audit"
[reverse_tcp]
default = "deny"
""",
    )
    decision = p.reverseTCP("localhost", 8080)
    assert decision.allowed and decision.wouldRefuse and decision.rule == "reverse_tcp default"
    flagged = policy('mode = "audit"\n', blockReversePortForwarding=True)
    assert not flagged.reverseTCP("localhost", 8080).allowed  # the flag is not audited


def test_file_transfer_rules() -> None:
    p = policy(
        """
[file_transfer]
default = "allow"
[[file_transfer.rules]]
name = "no-sftp"
action = "deny"
kind = "sftp"
"""
    )
    refused = p.allowSubsystem("sftp")
    assert not refused.allowed and refused.reason == "file transfer blocked"
    assert refused.rule == "no-sftp"
    assert not p.allowCommand("sftp -x").allowed
    assert p.allowCommand("scp -t x").allowed
