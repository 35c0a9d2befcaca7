"""An outage costs one probe_timeout per registry endpoint, not one per pull: nodekeeper in
front of a real containerd, the registry behind a fault proxy that black-holes it, pulls
one after another as the kubelet sends them."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import MakeNodekeeper
from tests.harness import (
    NO_RESPONSE,
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    free_port,
    image_ref,
    plain_http_hosts_toml,
    push_new,
)
from tests.harness.nodekeeper import Nodekeeper, scrape

pytestmark = pytest.mark.integration

PROBE_TIMEOUT = 2.0
OUTAGE_WAIT = 0.2    # the default
SLACK = 0.6          # per pull, for a busy machine: the bound checked is still half of 10 x 2 s
IMAGES = 10


def status(daemon: Nodekeeper) -> str:
    return subprocess.run([sys.executable, "-m", "nodekeeper", "status", "--config",
                           str(daemon.config_path)], capture_output=True, text=True,
                          timeout=30, check=True).stdout


@pytest.fixture
def proxied(registry: Registry, containerd: Containerd) -> Iterator[FaultProxy]:
    """The registry behind a proxy that fails on demand; containerd is told it speaks
    plain HTTP (1.7 and later try HTTPS first)."""
    with FaultProxy(registry.url) as proxy:
        containerd.write_hosts_toml(proxy.host, plain_http_hosts_toml(proxy.host))
        yield proxy


def test_a_black_holed_registry_costs_one_probe_timeout_then_outage_wait_per_pull(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(
        containerd.address,
        settings={"containerd": {"hosts_dir": str(containerd.hosts_dir)},
                  "metrics_address": metrics},
        policy=f"defaults:\n  update: always\n  probe_timeout: {PROBE_TIMEOUT:g}s\n")
    refs = [image_ref(proxied.host, f"app{i}", "v1") for i in range(IMAGES)]
    builds = [push_new(registry.url, f"app{i}", "v1", seed=f"outage-{i}")
              for i in range(IMAGES)]
    with CriClient(daemon.socket) as kubelet:
        for ref, build in zip(refs, builds, strict=True):
            assert kubelet.pull(ref) == build.config_digest
        proxied.clear()
        proxied.hang()

        costs: list[float] = []
        for ref, build in zip(refs, builds, strict=True):
            started = time.monotonic()
            assert kubelet.pull(ref) == build.config_digest  # the node's copy
            costs.append(time.monotonic() - started)
        total = sum(costs)
        hung = proxied.requests("HEAD", "/manifests/", status=NO_RESPONSE)
        in_outage = sorted(costs[1:])
        print(f"\nper pull in the outage: first {costs[0]:.3f}s, then p50 "
              f"{statistics.median(in_outage):.3f}s, max {in_outage[-1]:.3f}s; total "
              f"{total:.3f}s for {IMAGES} pulls; {len(hung)} probes sent")
        # Without episodes every pull waited probe_timeout in turn: 10 x 2 s.
        assert total < PROBE_TIMEOUT + IMAGES * (OUTAGE_WAIT + SLACK)
        # One probe in flight at a time: the first pull's, then one per probe_timeout.
        assert 2 <= len(hung) <= 2 + int(total / PROBE_TIMEOUT)

        shown = status(daemon)
        assert "outages: 1 (" in shown
        assert f"  {proxied.host}: timeout since " in shown

        samples = scrape(metrics)
        label = f'{{endpoint="{proxied.host}"}}'
        assert samples[f"nodekeeper_registry_outage{label}"] == 1
        assert samples[f"nodekeeper_registry_outage_pulls_total{label}"] == IMAGES - 1

        # The registry answers again, with a new build of one tag: the next pull is exact.
        rebuilt = push_new(registry.url, "app0", "v1", seed="outage-0-after")
        proxied.passthrough()
        assert kubelet.pull(refs[0]) == rebuilt.config_digest
        assert scrape(metrics)[f"nodekeeper_registry_outage{label}"] == 0
        assert "outages: none" in status(daemon)

    events = daemon.events()
    pulls = [e for e in events if e.get("rpc") == "PullImage" and "decision" in e]
    answered = pulls[IMAGES:]
    assert [e["decision"] for e in answered] == ["fallback"] * IMAGES + ["updated"]
    assert {e.get("outage") for e in answered[:IMAGES]} == {proxied.host}
    (opened,) = [e for e in events if e.get("event", "").startswith(
        "registry endpoint in an outage")]
    assert (opened["level"], opened["endpoint"], opened["kind"]) == (
        "warning", proxied.host, "timeout")
    (closed,) = [e for e in events if e.get("event", "").startswith(
        "registry endpoint answers again")]
    assert (closed["level"], closed["endpoint"], closed["pulls_answered"]) == (
        "info", proxied.host, IMAGES - 1)
