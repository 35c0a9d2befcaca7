"""An outage costs one probe_timeout per registry endpoint, not one per pull: nodekeeper in
front of a real containerd, the registry behind a fault proxy that black-holes it, refuses
connections, answers slowly or flaps, pulls one after another as the kubelet sends them.
Bounds are on requests counted at the proxies; times only loosely."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

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


def assert_open(daemon: Nodekeeper, metrics: str, host: str, kind: str,
                answered: int) -> str:
    """`host` is in an outage of `kind` in `status` and the metrics, with `answered` pulls
    answered without it; its metrics label."""
    shown = status(daemon)
    assert "outages: 1 (" in shown
    assert f"  {host}: {kind} since " in shown
    samples = scrape(metrics)
    label = f'{{endpoint="{host}"}}'
    assert samples[f"nodekeeper_registry_outage{label}"] == 1
    assert samples[f"nodekeeper_registry_outage_pulls_total{label}"] == answered
    return label


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

        label = assert_open(daemon, metrics, proxied.host, "timeout", IMAGES - 1)

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


# -- more ways for a registry to be away ------------------------------------------------------

FEW = 4  # images per scenario below: enough to see an episode serve several pulls


def start_daemon(make_nodekeeper: MakeNodekeeper, containerd: Containerd
                 ) -> tuple[Nodekeeper, str]:
    """nodekeeper under `update: always` with probe_timeout 2 s and its metrics served."""
    metrics = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(
        containerd.address,
        settings={"containerd": {"hosts_dir": str(containerd.hosts_dir)},
                  "metrics_address": metrics},
        policy=f"defaults:\n  update: always\n  probe_timeout: {PROBE_TIMEOUT:g}s\n")
    return daemon, metrics


def on_node(kubelet: CriClient, registry: Registry, host: str, count: int, prefix: str
            ) -> tuple[list[str], list[str]]:
    """`count` images pushed and pulled once through `host`: their refs and builds."""
    refs = [image_ref(host, f"{prefix}{i}", "v1") for i in range(count)]
    builds = [push_new(registry.url, f"{prefix}{i}", "v1", seed=f"{prefix}-{i}").config_digest
              for i in range(count)]
    for ref, build in zip(refs, builds, strict=True):
        assert kubelet.pull(ref) == build
    return refs, builds


def decided(daemon: Nodekeeper, refs: list[str]) -> list[dict[str, object]]:
    """The PullImage decisions logged for these references, in order."""
    return [e for e in daemon.events() if e.get("rpc") == "PullImage" and "decision" in e
            and e.get("reference") in refs]


def hung_heads(proxy: FaultProxy) -> int:
    return len(proxy.requests("HEAD", "/manifests/", status=NO_RESPONSE))


def one_probe_at_a_time(sent: int, seconds: float) -> bool:
    """At most one probe in flight: the one that opened the episode, then one per
    probe_timeout at most (each is sent when the one before gave up), plus one."""
    return sent <= 2 + int(seconds / PROBE_TIMEOUT)


def mirrored_hosts_toml(server: str, mirror: str) -> str:
    """hosts.toml resolving tags at `mirror` first, then at `server`, both plain HTTP."""
    return (f'server = "http://{server}"\n\n[host."http://{mirror}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')


def test_a_black_holed_registry_never_slows_pulls_from_another(
    make_registry: Callable[..., Registry], containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    dark_registry, lit_registry = make_registry(), make_registry()
    with FaultProxy(dark_registry.url) as dark, FaultProxy(lit_registry.url) as lit:
        for proxy in (dark, lit):
            containerd.write_hosts_toml(proxy.host, plain_http_hosts_toml(proxy.host))
        daemon, metrics = start_daemon(make_nodekeeper, containerd)
        with CriClient(daemon.socket) as kubelet:
            dark_refs, dark_builds = on_node(kubelet, dark_registry, dark.host, FEW, "dark")
            lit_refs, lit_builds = on_node(kubelet, lit_registry, lit.host, FEW, "lit")
            dark.clear()
            lit.clear()
            dark.hang()

            lit_costs: list[float] = []
            started = time.monotonic()
            for dark_ref, dark_build, lit_ref, lit_build in zip(
                    dark_refs, dark_builds, lit_refs, lit_builds, strict=True):
                assert kubelet.pull(dark_ref) == dark_build  # the node's copy
                began = time.monotonic()
                assert kubelet.pull(lit_ref) == lit_build
                lit_costs.append(time.monotonic() - began)
            spent = time.monotonic() - started
            print(f"\npulls from the other registry during the outage: max "
                  f"{max(lit_costs):.3f}s")
            # Each of the other registry's pulls asked it itself, and got its answer.
            assert len(lit.requests("HEAD", "/manifests/")) == FEW
            assert not lit.requests(status=NO_RESPONSE)
            assert one_probe_at_a_time(hung_heads(dark), spent)
            assert dark.peak_concurrent("HEAD", "/manifests/") == 1
            # Loose: none of them waited a probe_timeout (each takes milliseconds).
            assert max(lit_costs) < PROBE_TIMEOUT
            samples = scrape(metrics)
            assert samples[f'nodekeeper_registry_outage{{endpoint="{dark.host}"}}'] == 1
            assert samples.get(f'nodekeeper_registry_outage{{endpoint="{lit.host}"}}', 0) == 0

    lit_pulls = decided(daemon, lit_refs)[FEW:]
    assert [e["decision"] for e in lit_pulls] == ["fresh"] * FEW
    assert not any("outage" in e for e in lit_pulls)
    dark_pulls = decided(daemon, dark_refs)[FEW:]
    assert [e["decision"] for e in dark_pulls] == ["fallback"] * FEW
    assert {e.get("outage") for e in dark_pulls} == {dark.host}


def test_a_black_holed_mirror_hands_over_to_the_server_after_outage_wait(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    with FaultProxy(registry.url) as server, FaultProxy(registry.url) as mirror:
        containerd.write_hosts_toml(server.host, plain_http_hosts_toml(server.host))
        daemon, metrics = start_daemon(make_nodekeeper, containerd)
        with CriClient(daemon.socket) as kubelet:
            refs, builds = on_node(kubelet, registry, server.host, IMAGES, "app")
            # From now on tags are resolved at the mirror first, and it never answers.
            containerd.write_hosts_toml(server.host,
                                        mirrored_hosts_toml(server.host, mirror.host))
            mirror.hang()
            server.clear()

            started = time.monotonic()
            for ref, build in zip(refs, builds, strict=True):
                assert kubelet.pull(ref) == build
            spent = time.monotonic() - started
            print(f"\n{IMAGES} pulls past a black-holed mirror: {spent:.3f}s, "
                  f"{hung_heads(mirror)} probes to the mirror")
            # The first pull spent its probe_timeout on the mirror; every later one asked
            # the server after at most outage_wait.
            assert len(server.requests("HEAD", "/manifests/")) == IMAGES - 1
            assert hung_heads(mirror) >= 1
            assert one_probe_at_a_time(hung_heads(mirror), spent)
            assert mirror.peak_concurrent("HEAD", "/manifests/") == 1
            assert spent < PROBE_TIMEOUT + IMAGES * (OUTAGE_WAIT + SLACK)
            samples = scrape(metrics)
            label = f'{{endpoint="{mirror.host}"}}'
            assert samples[f"nodekeeper_registry_outage{label}"] == 1
            assert samples[f"nodekeeper_registry_outage_pulls_total{label}"] == IMAGES - 1
            assert samples.get(f'nodekeeper_registry_outage{{endpoint="{server.host}"}}',
                               0) == 0

    answered = decided(daemon, refs)[IMAGES:]
    assert [e["decision"] for e in answered] == ["fallback"] + ["fresh"] * (IMAGES - 1)
    assert answered[0].get("outage") == mirror.host
    assert not any("outage" in e for e in answered[1:])


def test_a_refused_registry_is_an_outage_too_and_the_next_pull_after_it_is_exact(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    daemon, metrics = start_daemon(make_nodekeeper, containerd)
    with CriClient(daemon.socket) as kubelet:
        refs, builds = on_node(kubelet, registry, proxied.host, IMAGES, "app")
        proxied.refuse()

        started = time.monotonic()
        for ref, build in zip(refs, builds, strict=True):
            assert kubelet.pull(ref) == build  # the node's copy
        spent = time.monotonic() - started
        print(f"\n{IMAGES} pulls from a refusing registry: {spent:.3f}s")
        # Refusals are immediate: no pull waits anything like a probe_timeout.
        assert spent < IMAGES * (OUTAGE_WAIT + SLACK)
        label = assert_open(daemon, metrics, proxied.host, "unreachable", IMAGES - 1)

        rebuilt = push_new(registry.url, "app0", "v1", seed="refused-after")
        proxied.start()
        assert kubelet.pull(refs[0]) == rebuilt.config_digest
        assert scrape(metrics)[f"nodekeeper_registry_outage{label}"] == 0

    answered = decided(daemon, refs)[IMAGES:]
    assert [e["decision"] for e in answered] == ["fallback"] * IMAGES + ["updated"]
    assert {e.get("outage") for e in answered[:IMAGES]} == {proxied.host}
    (opened,) = [e for e in daemon.events() if e.get("event", "").startswith(
        "registry endpoint in an outage")]
    assert opened["kind"] == "unreachable"


SLOW = 1.5  # under probe_timeout: slow is not an outage


def test_a_slow_registry_never_opens_an_outage(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    daemon, metrics = start_daemon(make_nodekeeper, containerd)
    with CriClient(daemon.socket) as kubelet:
        refs, builds = on_node(kubelet, registry, proxied.host, FEW, "app")
        proxied.clear()
        proxied.delay(SLOW)
        for ref, build in zip(refs, builds, strict=True):
            assert kubelet.pull(ref) == build
        rebuilt = push_new(registry.url, "app0", "v1", seed="slow-after")
        assert kubelet.pull(refs[0]) == rebuilt.config_digest
        assert len(proxied.requests("HEAD", "/manifests/")) >= FEW + 1
        label = f'{{endpoint="{proxied.host}"}}'
        samples = scrape(metrics)
        assert samples.get(f"nodekeeper_registry_outage{label}", 0) == 0
        assert samples.get(f"nodekeeper_registry_outage_pulls_total{label}", 0) == 0

    answered = decided(daemon, refs)[FEW:]
    assert [e["decision"] for e in answered] == ["fresh"] * FEW + ["updated"]
    assert not any(e.get("event", "").startswith("registry endpoint")
                   for e in daemon.events())


def test_a_flapping_registry_never_answers_a_pull_with_an_answer_older_than_it(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    daemon, metrics = start_daemon(make_nodekeeper, containerd)
    label = f'{{endpoint="{proxied.host}"}}'
    with CriClient(daemon.socket) as kubelet:
        refs, builds = on_node(kubelet, registry, proxied.host, FEW, "app")
        for flap, hold in enumerate(("hang", "late")):
            proxied.clear()
            asked_before = len(registry.requests("HEAD", "/manifests/"))
            if hold == "hang":
                proxied.hang(method="HEAD", path_contains="/manifests/")
            else:
                # The registry is asked at once but its answer held: a probe in flight
                # when it answers again carries the digest from before the push below.
                proxied.answer_late(300, method="HEAD", path_contains="/manifests/")
            started = time.monotonic()
            # app1's pull opens the episode; app0's sends its probe (asked before the
            # push below), still in flight when the registry answers again.
            for i in (1, 0, *range(2, FEW)):
                assert kubelet.pull(refs[i]) == builds[i]  # the node's copy
            rebuilt = push_new(registry.url, "app0", "v1", seed=f"flap-{flap}").config_digest
            spent = time.monotonic() - started
            sent = hung_heads(proxied) + len(
                registry.requests("HEAD", "/manifests/")) - asked_before
            assert scrape(metrics)[f"nodekeeper_registry_outage{label}"] == 1
            proxied.passthrough()
            # This pull started after the registry answered again: the new build, never
            # the answer of the probe that was in flight.
            assert kubelet.pull(refs[0]) == rebuilt
            builds[0] = rebuilt
            print(f"\nflap {flap} ({hold}): {sent} probes in {spent:.3f}s")
            assert one_probe_at_a_time(sent, spent)
            assert proxied.peak_concurrent("HEAD", "/manifests/") == 1
            assert scrape(metrics)[f"nodekeeper_registry_outage{label}"] == 0

    answered = decided(daemon, refs)[FEW:]
    per_flap = ["fallback"] * FEW + ["updated"]
    assert [e["decision"] for e in answered] == per_flap * 2
    events = daemon.events()
    opened = [e for e in events if e.get("event", "").startswith(
        "registry endpoint in an outage")]
    closed = [e for e in events if e.get("event", "").startswith(
        "registry endpoint answers again")]
    assert [e["kind"] for e in opened] == ["timeout", "timeout"]
    assert len(closed) == 2
