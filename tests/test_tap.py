# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""makeService only wires: building the agent touches no file; starting it does the I/O."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.logger import ILogObserver

from coderagent.listening import ListeningService
from coderagent.options import Options
from coderagent.tap import makeService


def options(tmp_path: Path, *extra: str) -> Options:
    o = Options(environ={})
    o.parseOptions(
        [
            "--agent-url=http://127.0.0.1:9",
            f"--agent-token-file={tmp_path / 'token'}",
            f"--script-data-dir={tmp_path / 'data'}",
            f"--log-dir={tmp_path / 'logs'}",
            f"--log-json={tmp_path / 'agent.json'}",
            "--log-human=",
            f"--boundary-log-proxy-socket-path={tmp_path / 'b.sock'}",
            "--ssh-endpoint=tcp:0:interface=127.0.0.1",
            "--prometheus-address=",
            "--debug-address=",
            "--pprof-address=0.0.0.0:6060",
            *extra,
        ]
    )
    return o


def services(top: MultiService) -> list[IService]:
    """Every service under ``top``, depth first (the SSH server and the coderd
    client sit under the lifecycle that orders their shutdown)."""
    found: list[IService] = []
    for service in top:
        found.append(service)
        if isinstance(service, MultiService):
            found.extend(services(service))
    return found


def test_building_the_agent_creates_and_reads_nothing(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    top = makeService(options(tmp_path), reactor=reactor, environ={"HOME": str(tmp_path)})
    assert sorted(os.listdir(tmp_path)) == before == []  # no token read, no key, no log file
    names = [type(s).__name__ for s in services(top)]
    assert "ListeningService" in names
    # The profiling server is refused off loopback: it is not among the listeners.
    listening = [s for s in services(top) if isinstance(s, ListeningService)]
    assert [s.what for s in listening] == ["SSH server", "boundary log proxy"]


def test_the_log_files_are_opened_when_twistd_adopts_the_service(tmp_path: Path) -> None:
    top = makeService(options(tmp_path), reactor=reactor, environ={"HOME": str(tmp_path)})

    components: dict[object, object] = {}

    class Application:
        def setComponent(self, interface: object, component: object) -> None:
            components[interface] = component

        def addService(self, service: object) -> None:
            pass

    top.setServiceParent(Application())  # what twistd does with the service
    assert ILogObserver in components
    assert (tmp_path / "agent.json").exists()
    assert (tmp_path / "logs" / "coder-agent.log").exists()


def test_an_unreadable_token_file_stops_the_agent_when_it_starts(tmp_path: Path) -> None:
    top = makeService(options(tmp_path), reactor=reactor, environ={"HOME": str(tmp_path)})
    coderd = next(s for s in services(top) if type(s).__name__ == "CoderdClient")
    with pytest.raises(SystemExit) as exited:
        coderd.startService()
    token = tmp_path / "token"
    assert str(exited.value) == (
        f'coder-agent: read token file "{token}": open {token}: no such file or directory'
    )


@pytest_twisted.ensureDeferred
async def test_host_keys_are_made_when_the_ssh_server_starts(tmp_path: Path) -> None:
    top = makeService(options(tmp_path), reactor=reactor, environ={"HOME": str(tmp_path)})
    [ssh] = [s for s in services(top) if isinstance(s, ListeningService) and s.what == "SSH server"]
    old = os.umask(0)
    try:
        ssh.startService()
    finally:
        os.umask(old)
    try:
        keys = tmp_path / "data" / "coder-agent-ssh-host-keys"
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert sorted(p.name for p in keys.iterdir()) == [
            "ssh_host_ed25519_key",
            "ssh_host_rsa_key",
        ]
        assert {stat.S_IMODE(p.stat().st_mode) for p in keys.iterdir()} == {0o600}
    finally:
        await ssh.stopService()
