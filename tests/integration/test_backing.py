"""The backing registry with two real nodes (containerd + nodekeeper each), a real
upstream and a real backing registry: what one node pulled, every node can get."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeContainerd, MakeNodekeeper, MakeRegistry
from tests.harness import (
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    free_port,
    image_ref,
    multi_platform,
    push,
    push_new,
    resolve,
)
from tests.harness._proc import wait_for_count
from tests.harness.nodekeeper import Nodekeeper, scrape

pytestmark = pytest.mark.integration

ALWAYS = "defaults:\n  update: always\n"


@dataclass
class Node:
    containerd: Containerd
    nodekeeper: Nodekeeper

    def pull(self, ref: str, auth: cri.AuthConfig | None = None
             ) -> str | tuple[grpc.StatusCode, str]:
        with CriClient(self.nodekeeper.socket) as kubelet:
            return kubelet.pull_or_error(ref, auth=auth)

    def decisions(self) -> list[str]:
        return [e["decision"] for e in self.nodekeeper.events()
                if e.get("rpc") == "PullImage" and "decision" in e]


MakeNode = Callable[..., Node]


@pytest.fixture
def backing(make_registry: MakeRegistry) -> Registry:
    return make_registry()


@pytest.fixture
def make_node(make_containerd: MakeContainerd, make_nodekeeper: MakeNodekeeper) -> MakeNode:
    count = 0

    def make(backing_url: str, policy: str = ALWAYS, metrics_address: str = "",
             **backing: object) -> Node:
        nonlocal count
        containerd = make_containerd(f"node{count}-containerd")
        count += 1
        metrics = {"metrics_address": metrics_address} if metrics_address else {}
        daemon = make_nodekeeper(containerd.address, policy=policy, settings={
            "backing": {"url": backing_url, "timeout": "1s", **backing}, **metrics})
        return Node(containerd, daemon)

    return make


def backing_repo(upstream: Registry, repo: str) -> str:
    return f"cache/{upstream.host.replace(':', '_')}/{repo}"


def wait_in_backing(backing: Registry, repo: str, reference: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        digest = resolve(backing.url, repo, reference)
        if digest:
            return digest
        time.sleep(0.1)
    raise AssertionError(f"{repo}:{reference} never appeared in backing")


def test_a_pull_is_copied_to_backing_with_every_platform_and_the_tag(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    node_a = make_node(backing.url)
    index = multi_platform("multi", [("linux", "amd64"), ("linux", "arm64"), ("linux", "s390x")])
    digest = push(registry.url, "team/app", "v1", index)
    assert isinstance(node_a.pull(image_ref(registry.host, "team/app", "v1")), str)
    repo = backing_repo(registry, "team/app")
    assert wait_in_backing(backing, repo, "v1") == digest
    for child in index.images:
        assert resolve(backing.url, repo, child.digest) == child.digest
    assert resolve(backing.url, repo, "nodekeeper.public")  # found anonymously pullable
    copied = [e for e in node_a.nodekeeper.events() if e.get("event") == "copied to backing"]
    assert copied
    assert copied[0]["bytes"] > 0


def test_a_node_that_never_had_the_image_gets_it_from_backing_while_upstream_is_down(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    node_a, node_b = make_node(backing.url), make_node(backing.url)
    image = push_new(registry.url, "app", "v1", seed="scale-out")
    ref = image_ref(registry.host, "app", "v1")
    assert node_a.pull(ref) == image.config_digest
    wait_in_backing(backing, backing_repo(registry, "app"), "v1")
    registry.stop()
    assert node_b.pull(ref) == image.config_digest
    assert node_b.decisions() == ["backing-fallback"]
    with CriClient(node_b.nodekeeper.socket) as kubelet:
        status = kubelet.status(ref).image
    assert status.id == image.config_digest
    assert f"{registry.host}/app:v1" in status.repo_tags
    assert f"{registry.host}/app@{image.digest}" in status.repo_digests


def test_backing_serves_the_bytes_when_it_holds_the_digest(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    node_a, node_b = make_node(backing.url), make_node(backing.url)
    image = push_new(registry.url, "app", "v1", seed="in-cluster")
    ref = image_ref(registry.host, "app", "v1")
    node_a.pull(ref)
    wait_in_backing(backing, backing_repo(registry, "app"), "v1")
    registry.clear_requests()
    assert node_b.pull(ref) == image.config_digest
    assert node_b.decisions() == ["backing"]
    assert registry.requests("GET", "/blobs/") == []  # no blob bytes from upstream
    assert len(registry.requests("HEAD", "/manifests/")) == 1  # the probe, nothing else


def test_a_dead_backing_never_breaks_an_upstream_pull(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    address = f"127.0.0.1:{free_port()}"
    node = make_node(backing.url, metrics_address=address)
    backing.freeze()  # accepts connections, never answers
    try:
        first = push_new(registry.url, "app", "v1", seed="one")
        assert node.pull(image_ref(registry.host, "app", "v1")) == first.config_digest
        second = push_new(registry.url, "app", "v1", seed="two")
        assert node.pull(image_ref(registry.host, "app", "v1")) == second.config_digest
    finally:
        backing.thaw()
    assert node.decisions() == ["pulled", "updated"]
    # One backing timeout per episode, then upstream only: one lookup waited for the
    # backing registry, and the second pull did not ask it at all.
    reads = scrape(address)
    assert reads['nodekeeper_backing_reads_total{result="failed"}'] == 1
    assert reads.get('nodekeeper_backing_reads_total{result="ok"}', 0) == 0
    down = [e for e in node.nodekeeper.events()
            if e.get("event", "").startswith("backing registry unavailable")]
    assert len(down) == 1


def test_an_interrupted_copy_is_completed_by_the_next_pull(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    with FaultProxy(backing.url) as proxy:
        node = make_node(proxy.url)
        image = push_new(registry.url, "app", "v1", seed="interrupted")
        ref = image_ref(registry.host, "app", "v1")
        proxy.respond(500, path_contains="/blobs/uploads/", method="PUT", times=1)
        node.pull(ref)
        deadline = time.monotonic() + 10
        while ("copy to backing failed" not in node.nodekeeper.log_text()
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert "copy to backing failed" in node.nodekeeper.log_text()
        assert resolve(backing.url, backing_repo(registry, "app"), "v1") is None
        node.pull(ref)
        assert wait_in_backing(backing, backing_repo(registry, "app"), "v1") == image.digest


def test_private_images_do_not_leak_through_backing(
    make_registry: MakeRegistry, backing: Registry, make_node: MakeNode
) -> None:
    upstream = make_registry(htpasswd={"alice": "alice-pw"})
    node_a, node_b = make_node(backing.url), make_node(backing.url)
    allowing = make_node(backing.url, policy=ALWAYS + "  backing_private_fallback: allow\n")
    image = push_new(upstream.url, "private/app", "1", seed="secret", auth=("alice", "alice-pw"))
    ref = image_ref(upstream.host, "private/app", "1")
    alice = cri.AuthConfig(username="alice", password="alice-pw")
    assert node_a.pull(ref, alice) == image.config_digest
    repo = backing_repo(upstream, "private/app")
    wait_in_backing(backing, repo, "1")
    assert resolve(backing.url, repo, "nodekeeper.public") is None  # needed credentials
    upstream.stop()
    refused = node_b.pull(ref)
    assert isinstance(refused, tuple)
    assert "backing_private_fallback: deny" in refused[1]
    assert allowing.pull(ref) == image.config_digest  # the rule opted in


def test_explain_and_status_show_backing(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    node = make_node(backing.url)
    image = push_new(registry.url, "app", "v1", seed="explain")
    ref = image_ref(registry.host, "app", "v1")
    node.pull(ref)
    wait_in_backing(backing, backing_repo(registry, "app"), "v1")
    cli = [sys.executable, "-m", "nodekeeper"]
    config = str(node.nodekeeper.config_path)
    explain = subprocess.run([*cli, "explain", ref, "--config", config], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    assert f"tag -> {image.digest}" in explain
    assert "last known digest held" in explain
    assert "marked public" in explain
    backing.freeze()
    try:
        node.pull(image_ref(registry.host, "other", "v1"))  # a pull that consults backing
    finally:
        backing.thaw()

    def status() -> str:
        return subprocess.run([*cli, "status", "--config", config], capture_output=True,
                              text=True, timeout=30, check=True).stdout

    # The daemon's view reaches the state database a moment later.
    deadline = time.monotonic() + 10
    while f"backing: {backing.url}: down" not in status():
        assert time.monotonic() < deadline, status()
        time.sleep(0.1)


def test_blobs_backing_already_holds_are_mounted_not_copied(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    node = make_node(backing.url)
    image = push_new(registry.url, "first", "v1", seed="shared-layers")
    push(registry.url, "second", "v1", image)  # the same blobs under another name
    node.pull(image_ref(registry.host, "first", "v1"))
    wait_in_backing(backing, backing_repo(registry, "first"), "v1")
    node.pull(image_ref(registry.host, "second", "v1"))
    wait_in_backing(backing, backing_repo(registry, "second"), "v1")
    # The tag is copied last, but the public marker and the log line come after it.
    copies = wait_for_count(lambda: [e for e in node.nodekeeper.events()
                                     if e.get("event") == "copied to backing"], 2, 20)
    assert [c["blobs_mounted"] for c in copies] == [0, len(image.blobs)]
    assert copies[1]["bytes"] == 0


def corrupt_blobs(registry: Registry, digests: list[str]) -> None:
    """Flip every byte of these blobs in the registry's storage, keeping their size."""
    for digest in digests:
        data = (registry.storage_dir / "docker/registry/v2/blobs/sha256" / digest[7:9]
                / digest[7:] / "data")
        data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))


def test_a_corrupt_copy_in_backing_falls_through_to_upstream(
    registry: Registry, backing: Registry, make_node: MakeNode
) -> None:
    # containerd 1.7 and 2.x keep the bytes of a download that failed its digest and
    # commit them again on the next pull from any registry, unless nodekeeper drops them.
    image = push_new(registry.url, "app", "v1", seed="corrupt-in-backing")
    ref = image_ref(registry.host, "app", "v1")
    first = make_node(backing.url)
    assert first.pull(ref) == image.config_digest
    wait_in_backing(backing, backing_repo(registry, "app"), "v1")
    layers = [d for d in image.blobs if d != image.config_digest]
    corrupt_blobs(backing, layers)

    second = make_node(backing.url)
    assert second.pull(ref) == image.config_digest  # from upstream, after backing failed
    assert second.decisions() == ["pulled"]
    with CriClient(second.containerd.address) as direct:
        assert direct.status(ref).image.id == image.config_digest  # nothing wrong recorded
    said = [e for e in second.nodekeeper.events()
            if e.get("event", "").startswith("backing served content that does not match")]
    assert len(said) == 1
    assert said[0]["digest"] == image.digest
    # The write-through that follows checks backing's bytes and says what must go.
    still = wait_for_count(lambda: [e for e in second.nodekeeper.events() if e.get(
        "event", "").startswith("backing still holds content")], 1, 20)
    assert still[0]["wrong"] == layers
    # Marked bad on this node: the next pull does not try backing again.
    with CriClient(second.containerd.address) as direct:
        direct.remove(ref)
    assert second.pull(ref) == image.config_digest
    pulls_from_backing = [e for e in second.nodekeeper.events()
                          if e.get("event") == "pull from backing failed"]
    assert len(pulls_from_backing) == 1
