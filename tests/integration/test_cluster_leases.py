"""Several real nodes (containerd + nodekeeper each) on one upstream, behind a fault proxy
that counts its requests, and one backing registry: a digest is fetched upstream once for
the cluster, every wait for another node is bounded, and under `update: interval` one
check upstream serves the cluster, never for credentials a node has not seen work."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.registry.cluster import check_tag, lease_tag
from tests.conftest import MakeContainerd, MakeNodekeeper, MakeRegistry
from tests.harness import (
    CriClient,
    FaultProxy,
    Registry,
    image_ref,
    plain_http_hosts_toml,
    push_new,
    resolve,
)
from tests.harness.nodekeeper import Nodekeeper

pytestmark = pytest.mark.integration

ALWAYS = "defaults:\n  update: always\n"
INTERVAL_SECONDS = 10
INTERVAL = f"defaults:\n  update: interval\n  interval: {INTERVAL_SECONDS}s\n"
FETCH_WAIT = 5.0


@dataclass
class Node:
    name: str
    nodekeeper: Nodekeeper

    def pull(self, ref: str, auth: cri.AuthConfig | None = None
             ) -> str | tuple[grpc.StatusCode, str]:
        with CriClient(self.nodekeeper.socket) as kubelet:
            return kubelet.pull_or_error(ref, auth=auth)

    def answers(self) -> list[dict[str, object]]:
        return [e for e in self.nodekeeper.events()
                if e.get("rpc") == "PullImage" and "decision" in e]

    def decisions(self) -> list[str]:
        return [str(e["decision"]) for e in self.answers()]


MakeNodes = Callable[..., list[Node]]


@pytest.fixture
def upstream(make_registry: MakeRegistry) -> Iterator[tuple[Registry, FaultProxy]]:
    registry = make_registry(htpasswd={"alice": "alice-pw", "bob": "bob-pw"})
    with FaultProxy(registry.url) as proxy:
        yield registry, proxy


@pytest.fixture
def backing(make_registry: MakeRegistry) -> Registry:
    return make_registry()


@pytest.fixture
def make_nodes(make_containerd: MakeContainerd, make_nodekeeper: MakeNodekeeper
               ) -> MakeNodes:
    count = 0

    def make(n: int, backing_url: str, upstream: str, policy: str = ALWAYS) -> list[Node]:
        nonlocal count
        nodes = []
        for _ in range(n):
            name = f"node-{count}"
            count += 1
            containerd = make_containerd(f"{name}-containerd")
            containerd.write_hosts_toml(upstream, plain_http_hosts_toml(upstream))
            daemon = make_nodekeeper(containerd.address, policy=policy, settings={
                "containerd": {"hosts_dir": str(containerd.hosts_dir)},
                "backing": {"url": backing_url, "timeout": "1s", "fetch_wait": f"{FETCH_WAIT}s"},
                "kubernetes": {"events": False, "node_name": name}})
            nodes.append(Node(name, daemon))
        return nodes

    return make


def at_once(nodes: list[Node], ref: str, auth: cri.AuthConfig | None = None
            ) -> list[str | tuple[grpc.StatusCode, str]]:
    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(lambda node: node.pull(ref, auth), nodes))


def backing_repo(proxy: FaultProxy, repo: str) -> str:
    return f"cache/{proxy.host.replace(':', '_')}/{repo}"


def wait_for(check: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def alice() -> cri.AuthConfig:
    return cri.AuthConfig(username="alice", password="alice-pw")


def test_a_digest_pulled_at_once_by_every_node_is_fetched_upstream_once(
        upstream: tuple[Registry, FaultProxy], backing: Registry, make_nodes: MakeNodes
) -> None:
    registry, proxy = upstream
    nodes = make_nodes(3, backing.url, proxy.host)
    image = push_new(registry.url, "team/app", "1", seed="rollout",
                     auth=("alice", "alice-pw"))
    ref = image_ref(proxy.host, "team/app", "1")
    proxy.clear()
    assert at_once(nodes, ref, alice()) == [image.config_digest] * 3
    decisions = sorted(d for node in nodes for d in node.decisions())
    assert decisions == ["backing", "backing", "pulled"]
    # Answered requests (a 401 challenge before each one fetches nothing).
    manifest_gets = proxy.requests("GET", f"/manifests/{image.digest}", status=200)
    blob_gets = Counter(r.path.rsplit("/", 1)[1]
                        for r in proxy.requests("GET", "/blobs/", status=200))
    # The holder's containerd pull alone: its copy to backing reads the node's content
    # store, and the others wait for that copy.
    assert len(manifest_gets) == 1, manifest_gets
    assert set(blob_gets) == set(image.blobs)
    assert max(blob_gets.values()) == 1, blob_gets
    print(f"\nupstream for 3 nodes: manifest GETs {len(manifest_gets)}, "
          f"GETs per blob {sorted(blob_gets.values())}, "
          f"HEADs {len(proxy.requests('HEAD', status=200))}")


def test_a_holder_killed_mid_fetch_holds_the_others_only_fetch_wait(
        upstream: tuple[Registry, FaultProxy], backing: Registry, make_nodes: MakeNodes
) -> None:
    registry, proxy = upstream
    holder, other = make_nodes(2, backing.url, proxy.host)
    image = push_new(registry.url, "team/app", "2", seed="killed",
                     auth=("alice", "alice-pw"))
    ref = image_ref(proxy.host, "team/app", "2")
    proxy.hang(path_contains="/blobs/")     # the holder's fetch never ends
    with ThreadPoolExecutor(1) as pool:
        pool.submit(holder.pull, ref, alice())
        repo = backing_repo(proxy, "team/app")
        wait_for(lambda: resolve(backing.url, repo, lease_tag(image.digest)), "the lease")
        holder.nodekeeper.signal(signal.SIGKILL)
        proxy.passthrough()
        assert other.pull(ref, alice()) == image.config_digest
    (answer,) = other.answers()
    assert answer["decision"] == "pulled"
    duration = answer.get("duration_ms")
    assert isinstance(duration, float | int)
    assert duration >= FETCH_WAIT * 1000 * 0.9   # it waited for the lease, no more is asserted
    print(f"\nwaited for a dead holder: {duration:.0f} ms (fetch_wait {FETCH_WAIT:g}s)")


@pytest.mark.parametrize("how", ["stopped", "silent"])
def test_a_dead_backing_sends_every_node_upstream_within_its_timeout(
        upstream: tuple[Registry, FaultProxy], backing: Registry, make_nodes: MakeNodes,
        how: str) -> None:
    registry, proxy = upstream
    with FaultProxy(backing.url) as dead:
        nodes = make_nodes(2, dead.url, proxy.host)
        image = push_new(registry.url, "team/app", "3", seed="dead backing",
                         auth=("alice", "alice-pw"))
        if how == "stopped":
            dead.refuse()
        else:
            dead.hang()
        assert at_once(nodes, image_ref(proxy.host, "team/app", "3"), alice()) == [
            image.config_digest] * 2
    assert sorted(d for node in nodes for d in node.decisions()) == ["pulled", "pulled"]
    for node in nodes:
        assert not node.nodekeeper.log_text().count("could not read a lease")
        durations = [e["duration_ms"] for e in node.answers()]
        print(f"\n{node.name} with backing {how}: {durations} ms")


def test_one_check_upstream_per_interval_serves_the_cluster_with_credentials_seen_here(
        upstream: tuple[Registry, FaultProxy], backing: Registry, make_nodes: MakeNodes
) -> None:
    registry, proxy = upstream
    nodes = make_nodes(3, backing.url, proxy.host, INTERVAL)
    image = push_new(registry.url, "team/app", "4", seed="interval",
                     auth=("alice", "alice-pw"))
    ref = image_ref(proxy.host, "team/app", "4")
    assert at_once(nodes, ref, alice()) == [image.config_digest] * 3
    repo = backing_repo(proxy, "team/app")
    time.sleep(INTERVAL_SECONDS + 0.5)      # every node's own check is older than the interval
    proxy.clear()
    first, *others = nodes
    assert first.pull(ref, alice()) == image.config_digest
    wait_for(lambda: resolve(backing.url, repo, check_tag("4")), "the shared check")
    for node in others:
        assert node.pull(ref, alice()) == image.config_digest
    assert first.decisions()[-1] == "fresh"
    assert [node.decisions()[-1] for node in others] == ["cluster-interval"] * 2
    assert len(proxy.requests("HEAD", "/manifests/4", status=200)) == 1
    # bob's credentials work upstream, but no node saw them work here: upstream decides.
    bob = cri.AuthConfig(username="bob", password="bob-pw")
    assert others[0].pull(ref, bob) == image.config_digest
    assert others[0].decisions()[-1] == "fresh"
    assert len(proxy.requests("HEAD", "/manifests/4", status=200)) == 2
    # Nor without credentials: the repository was never seen public.
    proxy.clear()
    refused = others[1].pull(ref)
    assert isinstance(refused, tuple)
    assert refused[0] == grpc.StatusCode.UNKNOWN
    assert proxy.requests("HEAD", "/manifests/4", status=401)
