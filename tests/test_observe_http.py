# Twisted and pytest-twisted are partly unannotated (as in pyproject's coderagent.* override).
# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""``--prometheus-address``: real HTTP requests against the metrics site, and Go addresses."""

from __future__ import annotations

import socket
import threading

import pytest
import pytest_twisted
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import endpoints, reactor

from coderagent.observe.http import metricsSite, strportsFor
from coderagent.observe.metrics import AgentMetrics
from tests.webclient import get, serving


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest_twisted.ensureDeferred
async def test_metrics_are_served_live_in_the_prometheus_text_format() -> None:
    metrics = AgentMetrics()
    async with serving(metricsSite(metrics)) as base:
        metrics.forwardingRefused("reverse", "unix")
        first = await get(base + "/metrics")
        metrics.forwardingRefused("reverse", "unix")
        second = await get(base + "/metrics")
    assert first.code == 200
    assert first.headers["content-type"] == CONTENT_TYPE_LATEST
    key = 'agent_ssh_forwarding_refused_total{direction="reverse",transport="unix"}'
    assert samples(first.text)[key] == 1.0
    assert samples(second.text)[key] == 2.0
    # Exactly the agent's registry: nothing from prometheus_client's global one.
    assert "python_gc_objects_collected_total" not in first.text


@pytest_twisted.ensureDeferred
async def test_collectors_run_in_the_reactor_thread() -> None:
    metrics = AgentMetrics()
    threadsSeen: list[str] = []

    def backlog() -> int:
        threadsSeen.append(threading.current_thread().name)
        return 7

    metrics.watchSpool(backlog, backlog, backlog)
    async with serving(metricsSite(metrics)) as base:
        response = await get(base + "/metrics")
    assert samples(response.text)["agent_boundary_log_proxy_spooled_logs"] == 7.0
    assert threadsSeen == [threading.main_thread().name] * 3


@pytest_twisted.ensureDeferred
async def test_only_metrics_and_only_get() -> None:
    async with serving(metricsSite(AgentMetrics())) as base:
        assert (await get(base + "/")).code == 404
        assert (await get(base + "/debug")).code == 404
        assert (await get(base + "/metrics", b"POST")).code == 405


@pytest.mark.parametrize(
    ("address", "description"),
    [
        ("127.0.0.1:2112", "tcp:2112:interface=127.0.0.1"),
        ("localhost:2112", "tcp:2112:interface=localhost"),
        (":2112", "tcp:2112"),
        ("0.0.0.0:0", "tcp:0:interface=0.0.0.0"),
        ("[::1]:6060", r"tcp6:6060:interface=\:\:1"),
        ("[::]:0", r"tcp6:0:interface=\:\:"),
        ("[fe80::1%eth0]:80", r"tcp6:80:interface=fe80\:\:1%eth0"),
    ],
)
def test_go_addresses_become_endpoint_descriptions(address: str, description: str) -> None:
    assert strportsFor(address) == description


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:0", "[::1]:0"])
@pytest_twisted.ensureDeferred
async def test_the_description_binds_where_the_address_says(address: str) -> None:
    family = socket.AF_INET6 if address.startswith("[") else socket.AF_INET
    expected = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    if family == socket.AF_INET6:
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", 0))
            except OSError as e:
                pytest.skip(f"this machine has no IPv6 loopback to bind (::1: {e.strerror})")
    endpoint = endpoints.serverFromString(reactor, strportsFor(address))
    port = await endpoint.listen(metricsSite(AgentMetrics()))
    try:
        host = port.getHost()
        assert host.host == expected
        shown = f"[{host.host}]" if ":" in host.host else host.host
        assert (await get(f"http://{shown}:{host.port}/metrics")).code == 200
    finally:
        await port.stopListening()
