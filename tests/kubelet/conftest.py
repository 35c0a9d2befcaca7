"""Fixtures of the kubelet tier: nodes (containerd, nodekeeper or not, a real kubelet) in
front of loopback registries. Only one kubelet runs at a time, so a test starting a second
node's kubelet first closes the one before it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeContainerd, MakeNodekeeper, MakeRegistry
from tests.harness import (
    Containerd,
    CriClient,
    FaultProxy,
    Image,
    Registry,
    image_ref,
    plain_http_hosts_toml,
    push,
)
from tests.harness.cri_runtime import Container, RuntimeClient
from tests.harness.kubelet import Kubelet, KubeletRelease, selected_kubelets
from tests.harness.nodekeeper import Nodekeeper
from tests.harness.pods import AppPod, app_image, pause_image

MODES = ("nodekeeper", "containerd")
PROBE_TIMEOUT = 2.0
# What the kubelet adds to a restart on top of the pull: noticing the exit (its PLEG
# relists every second), the pod worker, creating and starting the container. About 1 s
# when the machine is idle; generous, because this one is shared.
KUBELET_DELAY = 8.0
RESTART_BOUND = PROBE_TIMEOUT + KUBELET_DELAY
POD_START_TIMEOUT = 60.0
POLICY = f"defaults:\n  update: always\n  probe_timeout: {PROBE_TIMEOUT:g}s\n"


@dataclass
class Upstream:
    """A registry behind a fault proxy; nodes name images by the proxy's address."""

    registry: Registry
    proxy: FaultProxy

    @property
    def host(self) -> str:
        return self.proxy.host

    def push(self, repo: str, tag: str, seed: str) -> Image:
        image = app_image(seed)
        push(self.registry.url, repo, tag, image, self.registry.auth)
        return image

    def ref(self, repo: str, tag: str) -> str:
        return image_ref(self.host, repo, tag)

    def stop(self) -> None:
        """Connections refused, as with a registry that is not running."""
        self.proxy.refuse()

    def black_hole(self) -> None:
        """Connections accepted, never answered."""
        self.proxy.hang()

    def restore(self) -> None:
        self.proxy.start()
        self.proxy.passthrough()


@dataclass
class Node:
    mode: str  # "nodekeeper": the kubelet's image endpoint is nodekeeper; else containerd
    containerd: Containerd
    nodekeeper: Nodekeeper | None
    kubelet: Kubelet
    out_root: Path
    pods: dict[str, AppPod] = field(default_factory=dict)

    def run(self, name: str, image: str, pull_policy: str = "Always") -> AppPod:
        out = self.out_root / name
        out.mkdir(parents=True)
        pod = AppPod(name, image, out, pull_policy)
        self.kubelet.add_pod(pod.manifest())
        self.pods[name] = pod
        return pod

    def containers(self, pod: AppPod) -> list[Container]:
        """The pod's application containers as containerd knows them, oldest first."""
        with RuntimeClient(self.containerd.address) as runtime:
            sandboxes = {s.id for s in runtime.sandboxes()
                         if s.name == f"{pod.name}-{self.kubelet.node_name}"}
            found = [c for c in runtime.containers() if c.sandbox_id in sandboxes]
        return sorted(found, key=lambda c: (c.created_at_ns, c.attempt))

    def decisions(self) -> list[str]:
        assert self.nodekeeper is not None
        return [e["decision"] for e in self.nodekeeper.events()
                if e.get("rpc") == "PullImage" and "decision" in e]


MakeNode = Callable[..., Node]

# NODEKEEPER_KUBELET="1.36" narrows the matrix; every version by default.
KUBELET_RELEASES = selected_kubelets()


@pytest.fixture(params=KUBELET_RELEASES, ids=lambda release: f"kubelet-{release.name}")
def kubelet_release(request: pytest.FixtureRequest) -> KubeletRelease:
    """The kubelet version under test: every kubelet scenario runs once per version."""
    release: KubeletRelease = request.param
    return release
Record = Callable[[str, "float | None"], None]
Tally = Callable[[str, int], None]


@pytest.fixture(scope="session")
def pause(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return pause_image(tmp_path_factory.mktemp("pause"))


@pytest.fixture
def infra(make_registry: MakeRegistry, pause: Image) -> Registry:
    """Where the sandbox image lives; it stays up while the application registry fails."""
    registry = make_registry()
    push(registry.url, "pause", "1", pause)
    return registry


@dataclass
class Upstreams:
    """Every upstream a test made; nodes started afterwards know all of them."""

    made: list[Upstream] = field(default_factory=list)


@pytest.fixture
def upstreams() -> Upstreams:
    return Upstreams()


@pytest.fixture
def make_upstream(
    make_registry: MakeRegistry, upstreams: Upstreams
) -> Iterator[Callable[..., Upstream]]:
    def make(**registry_options: Any) -> Upstream:
        registry = make_registry(**registry_options)
        up = Upstream(registry, FaultProxy(registry.url))
        upstreams.made.append(up)
        return up

    try:
        yield make
    finally:
        for up in upstreams.made:
            up.proxy.close()


@pytest.fixture
def upstream(make_upstream: Callable[..., Upstream]) -> Upstream:
    return make_upstream()


@pytest.fixture
def make_node(
    tmp_path: Path, infra: Registry, upstreams: Upstreams, make_upstream: Callable[..., Upstream],
    make_containerd: MakeContainerd, make_nodekeeper: MakeNodekeeper,
    kubelet_release: KubeletRelease,
) -> Iterator[MakeNode]:
    """Start a node: its own containerd (or the one given), nodekeeper in ``mode``
    "nodekeeper", and a kubelet. Starting one closes the previous node's kubelet."""
    kubelets: list[Kubelet] = []
    sandbox = image_ref(infra.host, "pause", "1")

    def make(mode: str, *, containerd: Containerd | None = None,
             nodekeeper: Nodekeeper | None = None, backing_url: str | None = None,
             credentials: dict[str, tuple[str, str]] | None = None,
             kubernetes: dict[str, str] | None = None,
             feature_gates: dict[str, bool] | None = None) -> Node:
        assert mode in MODES
        for previous in kubelets:
            previous.close()
        number = len(kubelets)
        if containerd is None:
            containerd = make_containerd(f"node{number}-containerd", sandbox_image=sandbox)
            with CriClient(containerd.address) as cri:
                cri.pull(sandbox, timeout=60)
        for up in upstreams.made:
            # The fault proxy speaks plain HTTP only; 1.7 and later try HTTPS first.
            containerd.write_hosts_toml(up.host, plain_http_hosts_toml(up.host))
        if mode == "nodekeeper" and nodekeeper is None:
            settings: dict[str, Any] = {}
            if backing_url is not None:
                settings["backing"] = {"url": backing_url, "timeout": "2s"}
            if kubernetes is not None:
                settings["kubernetes"] = kubernetes
            nodekeeper = make_nodekeeper(containerd.address, policy=POLICY, settings=settings)
        endpoint = nodekeeper.socket if nodekeeper is not None else containerd.address
        kubelet = Kubelet(tmp_path / f"node{number}-kubelet", runtime_endpoint=containerd.address,
                          image_endpoint=endpoint, release=kubelet_release,
                          credentials=credentials, feature_gates=feature_gates)
        kubelets.append(kubelet)
        kubelet.start()
        return Node(mode, containerd, nodekeeper if mode == "nodekeeper" else None, kubelet,
                    tmp_path / f"node{number}-out")

    try:
        yield make
    finally:
        for kubelet in kubelets:
            kubelet.close()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Record:
    """Note a measured time (None: did not happen within its bound) for the summary."""

    def note(label: str, seconds: float | None) -> None:
        request.node.user_properties.append(("kubelet timing", (label, seconds)))

    return note


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    """Note a count (requests, say) for the summary, beside the measured times."""

    def note(label: str, count: int) -> None:
        request.node.user_properties.append(("kubelet count", (label, count)))

    return note


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = []
    for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        if report.when != "call":
            continue
        for key, value in report.user_properties:
            if key == "kubelet timing":
                label, seconds = value
                shown = "not within its bound" if seconds is None else f"{seconds:.2f} s"
            elif key == "kubelet count":
                label, shown = value
            else:
                continue
            lines.append(f"  {report.nodeid.split('::')[-1]}: {label}: {shown}")
    if lines:
        terminalreporter.write_sep("-", "kubelet tier: measured times")
        for line in lines:
            terminalreporter.write_line(line)


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
