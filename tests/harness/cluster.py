"""A cluster on one machine: K nodes, each its own containerd and its own nodekeeper, in
front of one upstream registry and one backing registry, with upstream's requests counted.

    with Cluster(tmp_path / "cluster", release=release, nodes=4) as cluster:
        image = cluster.push_new("app", "v1", seed="build-2")
        cluster.upstream.clear_requests()
        pulls = cluster.pull_at_once(cluster.ref("app", "v1"))
        cluster.settle(image.digest)       # every copy to backing the pulls started ended
        traffic = cluster.traffic()        # what upstream served since clear_requests()

A node pulls through its nodekeeper, as its kubelet would, or (`direct=True`) from its
containerd alone, as a node without nodekeeper would. Upstream's requests come from its
access log, which names who asked (containerd's pulls and nodekeeper's probes and copies
have their own User-Agent) and how many body bytes each answer carried.

Bounded for a small machine: containerds start in parallel (each is ready in about a
second), nodekeepers start in parallel and are waited for together; a node costs about
35 MB for containerd and 60 MB for nodekeeper.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tests.harness.containerd import Containerd, ContainerdRelease
from tests.harness.cri import CriClient
from tests.harness.link import Link
from tests.harness.nodekeeper import Nodekeeper
from tests.harness.oci import Image, build_image, image_ref, push
from tests.harness.registry import Registry, RegistryRequest

ALWAYS = "defaults:\n  update: always\n"
# The decisions after which nodekeeper copies the digest to backing (a pull upstream).
COPYING_DECISIONS = frozenset({"pulled", "updated", "fresh"})
# How a write-through of one digest ends, in nodekeeper's log.
_COPY_ENDS = {"copied to backing": "copied",
              "backing holds it already; not copied": "skipped",
              "copy to backing failed; the next pull of this image retries it": "failed"}


@dataclass(frozen=True)
class Traffic:
    """Requests a registry served (those that did not fail), by kind."""

    requests: tuple[RegistryRequest, ...]

    def of(self, agent: str) -> Traffic:
        """Only the requests whose User-Agent starts with `agent` ("containerd",
        "nodekeeper")."""
        return Traffic(tuple(r for r in self.requests if r.user_agent.startswith(agent)))

    def _count(self, method: str, kind: str) -> list[RegistryRequest]:
        return [r for r in self.requests if r.method == method and f"/{kind}/" in r.path]

    @property
    def manifest_gets(self) -> int:
        return len(self._count("GET", "manifests"))

    @property
    def manifest_heads(self) -> int:
        return len(self._count("HEAD", "manifests"))

    @property
    def blob_gets(self) -> int:
        return len(self._count("GET", "blobs"))

    @property
    def blob_bytes(self) -> int:
        return sum(r.size for r in self._count("GET", "blobs"))

    def blob_gets_by_digest(self) -> Counter[str]:
        return Counter(r.path.rsplit("/", 1)[1] for r in self._count("GET", "blobs"))

    def manifest_gets_by_digest(self) -> Counter[str]:
        return Counter(r.path.rsplit("/", 1)[1] for r in self._count("GET", "manifests"))


@dataclass
class Node:
    name: str
    containerd: Containerd
    nodekeeper: Nodekeeper

    def pull(self, ref: str, *, direct: bool = False) -> str:
        """Pull `ref` as the kubelet would (through nodekeeper, or with `direct` from
        containerd alone); the image ID. grpc.RpcError when refused."""
        socket = self.containerd.address if direct else self.nodekeeper.socket
        with CriClient(socket, timeout=120) as kubelet:
            return kubelet.pull(ref)

    def decisions(self, digest: str = "") -> list[str]:
        """nodekeeper's PullImage decisions (for `digest` upstream, when given)."""
        return [e["decision"] for e in self.nodekeeper.events()
                if e.get("rpc") == "PullImage" and "decision" in e
                and (not digest or e.get("upstream_digest") == digest)]

    def copy_ends(self, digest: str) -> list[str]:
        """How this node's copies of `digest` to backing ended: copied, skipped, failed."""
        return [_COPY_ENDS[e["event"]] for e in self.nodekeeper.events()
                if e.get("event") in _COPY_ENDS and e.get("digest") == digest]

    def copy_events(self, digest: str) -> list[dict[str, Any]]:
        return [e for e in self.nodekeeper.events()
                if e.get("event") == "copied to backing" and e.get("digest") == digest]

    def settle(self, digest: str, timeout: float = 60.0) -> list[str]:
        """Wait until every copy to backing that this node's pulls of `digest` started
        has ended; how they ended."""
        started = sum(d in COPYING_DECISIONS for d in self.decisions(digest))
        deadline = time.monotonic() + timeout
        while len(ends := self.copy_ends(digest)) < started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {started} copies of {digest} started, "
                                   f"{len(ends)} ended within {timeout}s")
            time.sleep(0.05)
        return ends


@dataclass(frozen=True)
class Pulls:
    """What a round of pulls answered (an image ID, or the gRPC error's text) per node,
    when (seconds from the first pull's start to each pull's answer), and how long each
    pull took."""

    answers: tuple[str, ...]
    seconds: tuple[float, ...]
    durations: tuple[float, ...]

    @property
    def until_last(self) -> float:
        return max(self.seconds)


class Cluster:
    """K nodes (containerd + nodekeeper each), one upstream and one backing registry, all
    under `base_dir`, started by start() (or `with`) and stopped by close()."""

    def __init__(self, base_dir: Path, *, release: ContainerdRelease, nodes: int = 4,
                 policy: str = ALWAYS, settings: dict[str, Any] | None = None,
                 upstream_link: tuple[float, float] | None = None) -> None:
        """`upstream_link` (round trip in seconds, megabits a second): the nodes reach
        upstream through a Link of that shape, as a cluster reaches the internet."""
        if nodes < 1:
            raise ValueError("a cluster needs a node")
        self.base_dir = base_dir
        self.release = release
        self.upstream = Registry(base_dir / "upstream")
        self.backing = Registry(base_dir / "backing")
        self.link = None if upstream_link is None else Link(
            self.upstream.host, rtt=upstream_link[0], mbit=upstream_link[1])
        self.nodes: list[Node] = []
        self._count = nodes
        self._policy = policy
        self._settings = settings or {}

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self.upstream.start()
        self.backing.start()
        if self.link is not None:
            self.link.start()
        containerds = [Containerd(self.base_dir / f"node{i}" / "containerd",
                                  release=self.release) for i in range(self._count)]
        settings = {**self._settings,
                    "backing": {"url": self.backing.url, "timeout": "1s",
                                **self._settings.get("backing", {})}}
        for i, containerd in enumerate(containerds):
            # Nodes on one machine share its host name, nodekeeper's default node name:
            # each needs its own, or every node takes another's lease or shared check
            # for its own.
            named = {**settings, "kubernetes": {**settings.get("kubernetes", {}),
                                                "node_name": f"node{i}"}}
            daemon = Nodekeeper(self.base_dir / f"node{i}" / "nodekeeper", containerd.address,
                                settings=named, policy=self._policy)
            self.nodes.append(Node(f"node{i}", containerd, daemon))
        with ThreadPoolExecutor(max_workers=self._count) as pool:
            for started in [pool.submit(c.start) for c in containerds]:
                started.result()
        for node in self.nodes:
            node.nodekeeper.start(wait_ready=False)
        for node in self.nodes:
            node.nodekeeper.wait_ready(timeout=60)

    def close(self) -> None:
        """Stop everything that started, nodes first; safe to call twice."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.nodekeeper.stop()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.containerd.close()
        self.backing.close()
        if self.link is not None:
            self.link.close()
        self.upstream.close()

    # -- images ----------------------------------------------------------------------------

    def ref(self, repo: str, tag: str) -> str:
        """`repo:tag` upstream, as the nodes name it (through the link, when there is one)."""
        return image_ref(self.link.host if self.link else self.upstream.host, repo, tag)

    def push_new(self, repo: str, tag: str, *, seed: str, layer_bytes: int = 0) -> Image:
        """A new build of `repo:tag` upstream: one layer, of `layer_bytes` random bytes
        when given (which gzip cannot shrink), else a small one."""
        files = {"data": os.urandom(layer_bytes)} if layer_bytes else None
        image = build_image(files, seed=seed)
        push(self.upstream.url, repo, tag, image)
        return image

    # -- rounds of pulls -------------------------------------------------------------------

    def pull_at_once(self, ref: str, *, direct: bool = False) -> Pulls:
        """Every node pulls `ref` at the same moment."""
        start = threading.Barrier(len(self.nodes))
        began = time.monotonic()

        def pull(node: Node) -> tuple[str, float]:
            start.wait()
            answer = _answer(node, ref, direct)
            return answer, time.monotonic() - began

        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            done = list(pool.map(pull, self.nodes))
        seconds = tuple(s for _, s in done)
        return Pulls(tuple(a for a, _ in done), seconds, seconds)

    def pull_staggered(self, ref: str, *, gap: float = 0.0, direct: bool = False,
                       settle: str = "") -> Pulls:
        """The nodes pull `ref` one after another, `gap` seconds apart; with `settle` (a
        digest), each only once the copies to backing of it that the previous node's pull
        started have ended."""
        began = time.monotonic()
        answers, seconds, durations = [], [], []
        for number, node in enumerate(self.nodes):
            if number and gap:
                time.sleep(gap)
            started = time.monotonic()
            answers.append(_answer(node, ref, direct))
            seconds.append(time.monotonic() - began)
            durations.append(time.monotonic() - started)
            if settle and not direct:
                node.settle(settle)
        return Pulls(tuple(answers), tuple(seconds), tuple(durations))

    def settle(self, digest: str, timeout: float = 60.0) -> None:
        """Wait until every copy to backing that pulls of `digest` started has ended."""
        for node in self.nodes:
            node.settle(digest, timeout)

    def traffic(self) -> Traffic:
        """What upstream served since its clear_requests(), failed requests left out."""
        return Traffic(tuple(r for r in self.upstream.requests() if r.status < 400))


def _answer(node: Node, ref: str, direct: bool) -> str:
    try:
        return node.pull(ref, direct=direct)
    except grpc.RpcError as exc:
        return f"{exc.code()}: {exc.details()}"
