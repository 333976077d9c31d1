"""Reloading the policy file: a change or SIGHUP applies it, an invalid one keeps the old."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from coderagent.policy import Policy
from coderagent.policy.reload import CHECK_INTERVAL, PolicyFileService

DENY_REVERSE = '[reverse_tcp]\ndefault = "deny"\n'
ALLOW_REVERSE = '[reverse_tcp]\ndefault = "allow"\n'


class Reactor(Clock):
    def callFromThread(self, f: object, *args: object) -> None:
        f(*args)  # type: ignore[operator]


def started(tmp_path: Path, text: str) -> tuple[PolicyFileService, Policy, Reactor, list[str]]:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    policy, reactor, events = Policy(), Reactor(), []
    service = PolicyFileService(
        str(path),
        policy,
        reactor=reactor,
        onLoaded=lambda rules, when: events.append(f"loaded {rules.mode} at {when}"),
        onError=lambda: events.append("error"),
        onChange=lambda: events.append("changed"),
    )
    service.startService()
    return service, policy, reactor, events


@pytest.fixture
def errors() -> list[str]:
    seen: list[str] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_level") == LogLevel.error:
            seen.append(str(event.get("errors", "")))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_change_of_content_applies_at_the_next_check(tmp_path: Path) -> None:
    service, policy, reactor, events = started(tmp_path, DENY_REVERSE)
    assert not policy.reverseTCP("localhost", 80).allowed
    (tmp_path / "policy.toml").write_text(ALLOW_REVERSE)
    reactor.advance(CHECK_INTERVAL)
    assert policy.reverseTCP("localhost", 80).allowed
    assert events == ["loaded enforce at 0.0", f"loaded enforce at {CHECK_INTERVAL}", "changed"]
    reactor.advance(CHECK_INTERVAL)  # unchanged: nothing happens
    assert len(events) == 3
    service.stopService()


def test_an_invalid_file_keeps_the_policy_and_is_reported_once(
    tmp_path: Path, errors: list[str]
) -> None:
    service, policy, reactor, events = started(tmp_path, DENY_REVERSE)
    (tmp_path / "policy.toml").write_text('[reverse_tcp]\ndefault = "maybe"\n')
    for _ in range(3):
        reactor.advance(CHECK_INTERVAL)
    assert not policy.reverseTCP("localhost", 80).allowed
    assert events.count("error") == 1
    assert errors == ['line 1: [reverse_tcp]: default must be "allow" or "deny"']
    service.reload("SIGHUP", always=True)  # asked for: reported again
    assert events.count("error") == 2
    service.stopService()


def test_sighup_reloads_even_an_unchanged_file(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGHUP)
    service, _, _, events = started(tmp_path, DENY_REVERSE)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert events[-1] == "changed"
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before  # put back when the service stops


def test_an_invalid_file_at_start_stops_the_agent_with_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[reverse_tcp]\ndefault = "deny"\n[[reverse_tcp.rules]]\naction = "permit"\n')
    service = PolicyFileService(str(path), Policy(), reactor=Reactor())
    with pytest.raises(SystemExit) as exited:
        service.startService()
    assert str(exited.value) == (
        f"coder-agent: --forwarding-policy-file {path} is invalid:\n"
        '  line 3: reverse_tcp rule 1: action must be "allow" or "deny"'
    )
    missing = PolicyFileService(str(tmp_path / "nope.toml"), Policy(), reactor=Reactor())
    with pytest.raises(SystemExit, match="No such file or directory"):
        missing.startService()
