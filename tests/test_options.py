"""The coder-agent options: precedence, typed values, one-line errors, help."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

import pytest
from twisted.python.usage import UsageError

from coderagent.options import (
    IGNORED_OPTIONS,
    OPTIONS,
    ConfigError,
    Options,
    parseDuration,
)

TMP = tempfile.gettempdir()
TOKEN = "s3cr3t-t0ken-value"


def parsed(args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Options:
    options = Options(environ=dict(env or {}))
    options.parseOptions(list(args))
    return options


def exitMessage(args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """What twistd would print: the SystemExit text."""
    with pytest.raises(SystemExit) as info:
        parsed(args, env)
    code = info.value.code
    assert isinstance(code, str)
    return code


class Unvalidated(Options):
    """Parses the command line but leaves validation to the test."""

    def postOptions(self) -> None:
        pass


def configError(args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> ConfigError:
    options = Unvalidated(environ=dict(env or {}))
    options.parseOptions(list(args))
    with pytest.raises(ConfigError) as info:
        options.validate()
    return info.value


# --- defaults and the table -------------------------------------------------


def test_defaults_are_typed() -> None:
    options = parsed()
    assert options["log-dir"] == TMP
    assert options["script-data-dir"] == TMP
    assert options["pprof-address"] == "127.0.0.1:6060"
    assert options["prometheus-address"] == "127.0.0.1:2112"
    assert options["debug-address"] == "127.0.0.1:2113"
    assert options["agent-header"] == []
    assert options["agent-header-command"] == ""
    assert options["no-reap"] is False
    assert options["ssh-max-timeout"] == 259200.0
    assert options["tailnet-listen-port"] == 0
    assert options["log-human"] == "/dev/stderr"
    assert options["log-json"] == ""
    assert options["log-stackdriver"] == ""
    assert options["block-file-transfer"] is False
    assert options["block-reverse-port-forwarding"] is False
    assert options["block-local-port-forwarding"] is False
    assert options["devcontainers-enable"] is True
    assert options["devcontainers-project-discovery-enable"] is True
    assert options["devcontainers-discovery-autostart-enable"] is False
    assert options["socket-server-enabled"] is False
    assert options["socket-path"] == os.path.join(TMP, "coder-agent.sock")
    assert options["boundary-log-proxy-socket-path"] == os.path.join(TMP, "boundary-audit.sock")
    assert options["auth"] == "token"
    assert options["agent-token"] == ""
    assert options["agent-token-file"] == ""
    assert options["agent-url"] == ""
    assert options["ssh-endpoint"] == "tcp:2222:interface=127.0.0.1"
    assert options["ssh-authorized-keys"] == os.path.expanduser("~/.ssh/authorized_keys")
    assert options["ssh-host-key-dir"] == os.path.join(TMP, "coder-agent-ssh-host-keys")
    assert options["ssh-login-grace-time"] == 120.0
    assert options["ssh-max-auth-tries"] == 6
    assert options["ssh-max-sessions"] == 10
    assert options["ssh-max-channels"] == 1024
    assert options["ssh-max-reverse-forwards"] == 256
    assert options["ssh-max-env-bytes"] == 262144


def test_every_option_has_a_typed_value_and_a_default_source() -> None:
    options = parsed()
    for spec in OPTIONS:
        assert spec.name in options
        assert options.sourceOf(spec.name) == "default"


def test_table_names_are_unique_and_env_names_prefixed() -> None:
    names = [spec.name for spec in OPTIONS]
    envs = [spec.env for spec in OPTIONS]
    assert len(set(names)) == len(names) == 39
    assert len(set(envs)) == len(envs)
    assert all(env.startswith("CODER_AGENT_") for env in envs)


def test_twisted_tables_are_derived_from_the_option_table() -> None:
    flags = {row[0] for row in Options.optFlags}
    parameters = {row[0] for row in Options.optParameters}
    assert flags == {spec.name for spec in OPTIONS if spec.kind.flag}
    assert "agent-header" not in parameters  # repeatable: handled by opt_agent_header
    assert flags | parameters | {"agent-header"} == {spec.name for spec in OPTIONS}


def test_ignored_options() -> None:
    assert IGNORED_OPTIONS == (
        "tailnet-listen-port",
        "devcontainers-enable",
        "devcontainers-project-discovery-enable",
        "devcontainers-discovery-autostart-enable",
    )


# --- precedence ---------------------------------------------------------------


def test_string_precedence() -> None:
    env = {"CODER_AGENT_LOGGING_JSON": "/env.json"}
    assert parsed()["log-json"] == ""
    assert parsed(env=env)["log-json"] == "/env.json"
    options = parsed(["--log-json", "/cli.json"], env)
    assert options["log-json"] == "/cli.json"
    assert options.sourceOf("log-json") == "command line"
    assert parsed(env=env).sourceOf("log-json") == "environment (CODER_AGENT_LOGGING_JSON)"


def test_bool_precedence() -> None:
    assert parsed()["block-file-transfer"] is False
    assert parsed(env={"CODER_AGENT_BLOCK_FILE_TRANSFER": "true"})["block-file-transfer"] is True
    options = parsed(["--block-file-transfer"], {"CODER_AGENT_BLOCK_FILE_TRANSFER": "false"})
    assert options["block-file-transfer"] is True
    assert options.sourceOf("block-file-transfer") == "command line"


def test_bool_assignment_overrides_env() -> None:
    env = {"CODER_AGENT_BLOCK_FILE_TRANSFER": "true", "CODER_AGENT_DEVCONTAINERS_ENABLE": "1"}
    options = parsed(["--block-file-transfer=false", "--devcontainers-enable=no"], env)
    assert options["block-file-transfer"] is False
    assert options["devcontainers-enable"] is False
    assert options.sourceOf("block-file-transfer") == "command line"


def test_bool_assignment_true() -> None:
    assert parsed(["--no-reap=TRUE"])["no-reap"] is True


def test_last_bool_occurrence_wins() -> None:
    assert parsed(["--no-reap=false", "--no-reap"])["no-reap"] is True
    assert parsed(["--no-reap", "--no-reap=false"])["no-reap"] is False
    assert parsed(["--no-reap=true", "--no-reap=0"])["no-reap"] is False


def test_duration_precedence() -> None:
    env = {"CODER_AGENT_SSH_MAX_TIMEOUT": "1h"}
    assert parsed()["ssh-max-timeout"] == 259200.0
    assert parsed(env=env)["ssh-max-timeout"] == 3600.0
    assert parsed(["--ssh-max-timeout=30s"], env)["ssh-max-timeout"] == 30.0


def test_list_precedence_cli_replaces_env() -> None:
    env = {"CODER_AGENT_HEADER": "X-Env=1,X-Other=2"}
    assert parsed()["agent-header"] == []
    assert parsed(env=env)["agent-header"] == [("X-Env", "1"), ("X-Other", "2")]
    options = parsed(["--agent-header", "A=b", "--agent-header=C=d=e"], env)
    assert options["agent-header"] == [("A", "b"), ("C", "d=e")]
    assert options.sourceOf("agent-header") == "command line"


def test_list_env_quoted_commas() -> None:
    env = {"CODER_AGENT_HEADER": '"Accept=text/html,application/json",X-Y=z'}
    assert parsed(env=env)["agent-header"] == [
        ("Accept", "text/html,application/json"),
        ("X-Y", "z"),
    ]


def test_list_cli_occurrence_is_split_like_upstream() -> None:
    assert parsed(["--agent-header", "A=1,B=2"])["agent-header"] == [("A", "1"), ("B", "2")]


def test_empty_env_value_counts_as_unset() -> None:
    options = parsed(env={"CODER_AGENT_LOGGING_HUMAN": "", "CODER_AGENT_AUTH": ""})
    assert options["log-human"] == "/dev/stderr"
    assert options["auth"] == "token"
    assert options.sourceOf("log-human") == "default"


def test_empty_cli_value_disables() -> None:
    options = parsed(["--log-human=", "--pprof-address="])
    assert options["log-human"] == ""
    assert options["pprof-address"] == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("TRUE", True),
        ("False", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("NO", False),
        ("  true\n", True),
    ],
)
def test_bool_spellings(text: str, expected: bool) -> None:
    assert parsed(env={"CODER_AGENT_NO_REAP": text})["no-reap"] is expected
    assert parsed([f"--no-reap={text}"])["no-reap"] is expected


def test_value_that_looks_like_a_bool_assignment_is_a_parameter_value() -> None:
    options = parsed(["--log-json", "--block-file-transfer=true"])
    assert options["log-json"] == "--block-file-transfer=true"
    assert options["block-file-transfer"] is False


def test_scan_stops_at_double_dash() -> None:
    with pytest.raises(UsageError, match="Wrong number of arguments"):
        parsed(["--", "--no-reap=maybe"])


def test_unknown_option_is_still_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parsed(["--no-such-option"])


# --- one-line errors ------------------------------------------------------------


HEADER_EXPECTED = "(expected key=value with a non-empty HTTP header name as key)"
BOOL_PROBLEM = 'invalid boolean "maybe" (expected true, false, 1, 0, yes or no)'
DURATION_PROBLEM = 'invalid duration "10" (expected a duration such as 72h, 1h30m, 1.5s or 500ms)'
ADDRESS_PROBLEM = (
    'invalid address "2112" (expected host:port with a port from 0 to 65535, or empty to disable)'
)
URL_PROBLEM = 'invalid URL "ftp://coder.example.com" (expected an http or https URL with a host)'
PORT_PROBLEM = 'invalid port "70000" (expected an integer from 0 to 65535)'
SIZE_PROBLEM = (
    'invalid size "1TB?" (expected bytes, or a number with KiB, MiB, GiB, KB, MB or GB, '
    "of at least 64KiB)"
)
AUTH_PROBLEM = (
    "unknown agent auth type: password (expected token, google-instance-identity, "
    "aws-instance-identity or azure-instance-identity)"
)


@pytest.mark.parametrize(
    ("flag", "env", "value", "problem"),
    [
        ("block-file-transfer", "CODER_AGENT_BLOCK_FILE_TRANSFER", "maybe", BOOL_PROBLEM),
        ("ssh-max-timeout", "CODER_AGENT_SSH_MAX_TIMEOUT", "10", DURATION_PROBLEM),
        ("prometheus-address", "CODER_AGENT_PROMETHEUS_ADDRESS", "2112", ADDRESS_PROBLEM),
        ("agent-url", "CODER_AGENT_URL", "ftp://coder.example.com", URL_PROBLEM),
        ("tailnet-listen-port", "CODER_AGENT_TAILNET_LISTEN_PORT", "70000", PORT_PROBLEM),
        ("auth", "CODER_AGENT_AUTH", "password", AUTH_PROBLEM),
        (
            "boundary-log-spool-max-bytes",
            "CODER_AGENT_BOUNDARY_LOG_SPOOL_MAX_BYTES",
            "1TB?",
            SIZE_PROBLEM,
        ),
    ],
)
def test_bad_values_name_their_source(flag: str, env: str, value: str, problem: str) -> None:
    assert exitMessage(env={env: value}) == f"coder-agent: {env}: {problem}"
    assert exitMessage([f"--{flag}={value}"]) == f"coder-agent: --{flag}: {problem}"
    error = configError(env={env: value})
    assert (error.where, error.problem, str(error)) == (env, problem, f"{env}: {problem}")
    assert str(configError([f"--{flag}={value}"])) == f"--{flag}: {problem}"


def test_bad_cli_value_wins_over_good_env_and_vice_versa() -> None:
    env = {"CODER_AGENT_SSH_MAX_TIMEOUT": "1h"}
    assert str(configError(["--ssh-max-timeout", "1x"], env)) == (
        '--ssh-max-timeout: invalid duration "1x" '
        "(expected a duration such as 72h, 1h30m, 1.5s or 500ms)"
    )
    # A bad environment value does not matter when the command line overrides it.
    assert (
        parsed(["--ssh-max-timeout=1s"], {"CODER_AGENT_SSH_MAX_TIMEOUT": "bad"})["ssh-max-timeout"]
        == 1.0
    )


@pytest.mark.parametrize(
    ("env", "value", "problem"),
    [
        (
            "CODER_AGENT_SSH_MAX_TIMEOUT",
            "-1s",
            'invalid duration "-1s" (must not be negative)',
        ),
        (
            "CODER_AGENT_SSH_LOGIN_GRACE_TIME",
            "0",
            'invalid duration "0" (must be greater than zero)',
        ),
        (
            "CODER_AGENT_SSH_MAX_AUTH_TRIES",
            "0",
            'invalid number "0" (expected an integer of at least 1)',
        ),
        (
            "CODER_AGENT_SSH_MAX_AUTH_TRIES",
            "0x10",
            'invalid number "0x10" (expected an integer of at least 1)',
        ),
        (
            "CODER_AGENT_TAILNET_LISTEN_PORT",
            "-1",
            'invalid port "-1" (expected an integer from 0 to 65535)',
        ),
        (
            "CODER_AGENT_HEADER",
            "X-A=1,novalue",
            f'invalid header "novalue" {HEADER_EXPECTED}',
        ),
        (
            "CODER_AGENT_HEADER",
            "=value",
            f'invalid header "=value" {HEADER_EXPECTED}',
        ),
        (
            "CODER_AGENT_HEADER",
            "a b=c",
            f'invalid header "a b=c" {HEADER_EXPECTED}',
        ),
        (
            "CODER_AGENT_HEADER",
            "A=1\nB=2",
            'invalid header list "A=1\\nB=2" (line breaks are not allowed)',
        ),
        (
            "CODER_AGENT_HEADER",
            "A=1\x01",
            'invalid header "A=1\\u0001" '
            "(control characters other than tab are not allowed in a header value)",
        ),
        (
            "CODER_AGENT_SSH_ENDPOINT",
            "foo:1",
            "invalid endpoint \"foo:1\" (Unknown endpoint type: 'foo'; expected a Twisted "
            "endpoint description such as tcp:2222:interface=127.0.0.1)",
        ),
        (
            "CODER_AGENT_SSH_ENDPOINT",
            "tcp:70000",
            'invalid endpoint "tcp:70000" (port out of range; expected a Twisted '
            "endpoint description such as tcp:2222:interface=127.0.0.1)",
        ),
        (
            "CODER_AGENT_SSH_ENDPOINT",
            "  ",
            'invalid endpoint "  " (expected a Twisted '
            "endpoint description such as tcp:2222:interface=127.0.0.1)",
        ),
    ],
)
def test_other_bad_values(env: str, value: str, problem: str) -> None:
    assert exitMessage(env={env: value}) == f"coder-agent: {env}: {problem}"


def test_bad_header_from_cli_names_the_flag() -> None:
    assert exitMessage(["--agent-header", "A=1", "--agent-header", "B"]) == (
        'coder-agent: --agent-header: invalid header "B" '
        "(expected key=value with a non-empty HTTP header name as key)"
    )


def test_bad_csv_quoting() -> None:
    message = exitMessage(env={"CODER_AGENT_HEADER": '"A=x"y,B=1'})
    assert message == (
        'coder-agent: CODER_AGENT_HEADER: invalid header list "\\"A=x\\"y,B=1" '
        "(',' expected after '\"'; expected comma-separated key=value items, "
        'with " around an item that contains a comma)'
    )


def test_empty_path_from_cli_is_refused() -> None:
    assert exitMessage(["--log-dir="]) == (
        'coder-agent: --log-dir: invalid path "" (expected a non-empty path)'
    )


def test_error_message_is_one_line_even_for_a_multiline_value() -> None:
    message = exitMessage(env={"CODER_AGENT_SSH_MAX_TIMEOUT": "1h\n2h"})
    assert message == (
        'coder-agent: CODER_AGENT_SSH_MAX_TIMEOUT: invalid duration "1h\\n2h" '
        "(expected a duration such as 72h, 1h30m, 1.5s or 500ms)"
    )


def test_first_bad_value_in_table_order_is_reported() -> None:
    env = {"CODER_AGENT_AUTH": "nope", "CODER_AGENT_SSH_MAX_AUTH_TRIES": "x"}
    assert configError(env=env).where == "CODER_AGENT_AUTH"


# --- kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("72h", 259200.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("+5m", 300.0),
        ("-0", 0.0),
        (".5s", 0.5),
        ("2.s", 2.0),
        ("1m30s", 90.0),
        ("2h45m3.5s", 9903.5),
        ("1us", 1e-06),
        ("1\u00b5s", 1e-06),
        ("1\u03bcs", 1e-06),
        ("250ns", 2.5e-07),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parseDuration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "10", "abc", "5x", "-1s", "1h-30m", "s", ".s", "1.2.3s", "1 h", "1H", "3000000h", "--1s"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid duration "):
        parseDuration(text)


@pytest.mark.parametrize(
    "address", ["", ":2112", "0.0.0.0:0", "localhost:65535", "[::1]:6060", "[fe80::1%eth0]:1"]
)
def test_good_addresses(address: str) -> None:
    assert parsed([f"--debug-address={address}"])["debug-address"] == address


@pytest.mark.parametrize(
    "address", ["2112", "host:", "host:65536", "::1:80", "[nothex]:80", "[::1]80", "h:8o", "h: 80"]
)
def test_bad_addresses(address: str) -> None:
    assert configError([f"--debug-address={address}"]).problem.startswith("invalid address ")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9", "https://coder.example.com", "HTTPS://coder.example.com/path"]
)
def test_good_urls(url: str) -> None:
    assert parsed([f"--agent-url={url}"])["agent-url"] == url


@pytest.mark.parametrize(
    "url", ["coder.example.com", "http://", "https://:443", "https://host:port", "http://[::1"]
)
def test_bad_urls(url: str) -> None:
    assert configError([f"--agent-url={url}"]).problem.startswith("invalid URL ")


@pytest.mark.parametrize(
    "endpoint", ["tcp:0:interface=127.0.0.1", "tcp:2222", "unix:/tmp/agent.sock:mode=600"]
)
def test_good_endpoints(endpoint: str) -> None:
    assert parsed([f"--ssh-endpoint={endpoint}"])["ssh-endpoint"] == endpoint


@pytest.mark.parametrize(
    "endpoint", ["tcp:notaport", "tcp", "tcp:22:bogus=1", "unix:/x:mode=999", ""]
)
def test_bad_endpoints(endpoint: str) -> None:
    assert configError([f"--ssh-endpoint={endpoint}"]).problem.startswith("invalid endpoint ")


@pytest.mark.parametrize("auth", ["token", "google-instance-identity", "aws-instance-identity"])
def test_auth_types(auth: str) -> None:
    assert parsed(env={"CODER_AGENT_AUTH": auth})["auth"] == auth


def test_ints() -> None:
    options = parsed(["--tailnet-listen-port", "65535", "--ssh-max-auth-tries=3"])
    assert (options["tailnet-listen-port"], options["ssh-max-auth-tries"]) == (65535, 3)


def test_connection_limits_from_flags_and_environment() -> None:
    options = parsed(
        ["--ssh-max-sessions=2", "--ssh-max-env-bytes=1MiB"],
        env={"CODER_AGENT_SSH_MAX_CHANNELS": "64", "CODER_AGENT_SSH_MAX_REVERSE_FORWARDS": "8"},
    )
    assert (
        options["ssh-max-sessions"],
        options["ssh-max-channels"],
        options["ssh-max-reverse-forwards"],
        options["ssh-max-env-bytes"],
    ) == (2, 64, 8, 1048576)
    assert exitMessage(["--ssh-max-sessions=0"]).startswith(
        'coder-agent: --ssh-max-sessions: invalid number "0"'
    )


# --- derived values and questions -------------------------------------------------


def test_host_key_dir_follows_script_data_dir() -> None:
    assert parsed(["--script-data-dir=/data"])["ssh-host-key-dir"] == (
        "/data/coder-agent-ssh-host-keys"
    )
    env = {"CODER_AGENT_SCRIPT_DATA_DIR": "/envdata"}
    options = parsed(env=env)
    assert options["ssh-host-key-dir"] == "/envdata/coder-agent-ssh-host-keys"
    assert options.sourceOf("ssh-host-key-dir") == "default"


def test_host_key_dir_given_explicitly() -> None:
    env = {"CODER_AGENT_SSH_HOST_KEY_DIR": "/keys"}
    assert parsed(["--script-data-dir=/data"], env)["ssh-host-key-dir"] == "/keys"
    assert parsed(["--ssh-host-key-dir=/cli-keys"], env)["ssh-host-key-dir"] == "/cli-keys"


def test_ignored_options_in_use() -> None:
    assert parsed().ignoredOptionsInUse() == []
    options = parsed(
        ["--tailnet-listen-port=0", "--devcontainers-discovery-autostart-enable"],
        {"CODER_AGENT_DEVCONTAINERS_ENABLE": "true"},
    )
    # Set to its default value still counts: whoever set it expected an effect.
    assert options.ignoredOptionsInUse() == [
        "tailnet-listen-port",
        "devcontainers-enable",
        "devcontainers-discovery-autostart-enable",
    ]


def test_source_of_unknown_option() -> None:
    with pytest.raises(KeyError):
        parsed().sourceOf("no-such-option")


def test_source_of_before_validation() -> None:
    options = Unvalidated(environ={"CODER_AGENT_NO_REAP": "1"})
    options.parseOptions(["--log-dir", "/x"])
    assert options.sourceOf("no-reap") == "environment (CODER_AGENT_NO_REAP)"
    assert options.sourceOf("log-dir") == "command line"
    assert options.sourceOf("auth") == "default"


def test_validate_twice_keeps_the_command_line() -> None:
    options = parsed(["--ssh-max-timeout=1m", "--agent-header=A=1"])
    options.validate()
    assert options["ssh-max-timeout"] == 60.0
    assert options["agent-header"] == [("A", "1")]
    assert options.sourceOf("ssh-max-timeout") == "command line"


# --- help and secrets ----------------------------------------------------------


def test_help_lists_every_flag_and_env_var_whole() -> None:
    for text in (str(Options(environ={})), Options(environ={}).getUsage(width=40)):
        for spec in OPTIONS:
            assert f"--{spec.name}" in text
            assert f"[env: {spec.env}]" in text


def test_help_shows_defaults_once() -> None:
    text = Options(environ={}).getUsage(width=100)
    assert text.count("[default: 72h]") == 1
    assert "[env: CODER_AGENT_BLOCK_FILE_TRANSFER] [default: false]" in text
    assert "[default: <script-data-dir>/coder-agent-ssh-host-keys]" in text
    assert "--block-file-transfer[=true|false]" in text
    assert "--ssh-max-timeout=<duration>" in text
    assert "--help" in text


def test_help_docs_carry_env_and_default() -> None:
    docs = Options(environ={}).docs
    assert docs["ssh-max-timeout"].endswith("[env: CODER_AGENT_SSH_MAX_TIMEOUT] [default: 72h]")
    assert docs["agent-header"].endswith('[env: CODER_AGENT_HEADER] [default: ""]')
    assert docs["agent-token"].endswith("[env: CODER_AGENT_TOKEN]")


def test_token_never_shown() -> None:
    env = {"CODER_AGENT_TOKEN": TOKEN, "CODER_AGENT_AUTH": "bad"}
    message = exitMessage(env=env)
    assert TOKEN not in message
    options = parsed(["--agent-token", TOKEN])
    assert options["agent-token"] == TOKEN
    assert TOKEN not in str(options)
    assert TOKEN not in options.getUsage()
    assert TOKEN not in repr(options)
    assert "'agent-token': '<hidden>'" in repr(options)
    assert TOKEN not in exitMessage(["--agent-token", TOKEN, "--no-reap=maybe"])


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("268435456", 268435456),
        ("256MiB", 256 << 20),
        ("500MB", 500_000_000),
        ("1gib", 1 << 30),
        ("64KiB", 65536),
    ],
)
def test_spool_sizes(text: str, size: int) -> None:
    assert (
        parsed([f"--boundary-log-spool-max-bytes={text}"])["boundary-log-spool-max-bytes"] == size
    )


def test_spool_defaults_live_under_the_script_data_dir() -> None:
    options = parsed(["--script-data-dir=/data"])
    assert options["boundary-log-spool-dir"] == "/data/coder-agent-boundary-spool"
    assert options["boundary-log-spool-max-bytes"] == 256 << 20
    assert options["boundary-log-commit-interval"] == 0.05
    assert exitMessage(["--boundary-log-spool-max-bytes=1000"]) == (
        "coder-agent: --boundary-log-spool-max-bytes: "
        + SIZE_PROBLEM.replace('"1TB?"', '"1000"')
    )
