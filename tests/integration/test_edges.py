"""The real edges of the PullImage core pass the same suites as the fakes
(tests/conformance.py): containerd's images against a real containerd, the prober and the
backing registry against real registries, state on a real disk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.config import BackingConfig
from nodekeeper.containerd.client import Containerd as ContainerdClient
from nodekeeper.pull.reference import parse
from nodekeeper.registry import Copier, Endpoint, Hosts, Location, Prober, Session
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.cluster import Cluster, check_tag, lease_tag, marker
from nodekeeper.state.memory import State
from tests import conformance
from tests.conftest import MakeRegistry
from tests.fakes import Published
from tests.harness import Containerd, Registry, free_port, image_ref, plain_http_hosts_toml
from tests.harness.oci import delete_tag, push_new

pytestmark = pytest.mark.integration


class RegistryWorld:
    """Real registries, with the verbs the suites use."""

    def __init__(self, registry: Registry, private: Registry | None = None) -> None:
        self.registry = registry
        self.private_registry = private

    def publish(self, repository: str, tag: str, seed: str,
                private: bool = False) -> tuple[str, Published]:
        registry = self.private_registry if private else self.registry
        assert registry is not None
        auth = (conformance.USER, conformance.PASSWORD) if private else None
        image = push_new(registry.url, repository, tag, seed=seed, auth=auth)
        return image_ref(registry.host, repository, tag), Published(image.config_digest,
                                                                    image.digest)

    def request(self, reference: str) -> object:
        return cri.PullImageRequest(image=cri.ImageSpec(image=reference)).SerializeToString()

    def unreachable(self) -> str:
        return image_ref(f"127.0.0.1:{free_port()}", "app", "1")

    def remove_tag(self, reference: str) -> None:
        ref = parse(reference)
        delete_tag(self.registry.url, ref.path, ref.tag)

    def stop(self) -> None:
        self.registry.stop()

    def black_hole(self) -> None:
        self.registry.freeze()


class TestContainerdImages(conformance.ImagesSuite):
    @pytest.fixture
    def image_world(self, registry: Registry, containerd: Containerd) -> RegistryWorld:
        containerd.write_hosts_toml(registry.host, plain_http_hosts_toml(registry.host))
        return RegistryWorld(registry)

    @pytest.fixture
    async def images(self, containerd: Containerd) -> AsyncIterator[ContainerdClient]:
        client = ContainerdClient(containerd.address)
        yield client
        await client.close()


class TestProber(conformance.UpstreamSuite):
    @pytest.fixture
    def upstream_world(self, make_registry: MakeRegistry) -> RegistryWorld:
        private = make_registry(htpasswd={conformance.USER: conformance.PASSWORD})
        return RegistryWorld(make_registry(), private)

    @pytest.fixture
    async def upstream(self, tmp_path: Path) -> AsyncIterator[Prober]:
        session = Session()
        yield Prober(Hosts([tmp_path / "no-hosts-dir"]), session)
        await session.close()


class BackingRegistries(RegistryWorld):
    def __init__(self, source: Registry, backing: Registry) -> None:
        super().__init__(source)
        self.backing = backing

    def publish_source(self, repository: str, tag: str, seed: str
                       ) -> tuple[str, Location, Published]:
        reference, image = self.publish(repository, tag, seed)
        source = Location(Endpoint(f"{self.registry.url}/v2", self.registry.host),
                          parse(reference).path)
        return reference, source, image

    def stop_backing(self) -> None:
        self.backing.stop()


class TestBacking(conformance.BackingSuite):
    @pytest.fixture
    def backing_world(self, make_registry: MakeRegistry) -> BackingRegistries:
        return BackingRegistries(make_registry(), make_registry())

    @pytest.fixture
    async def backing(self, backing_world: BackingRegistries) -> AsyncIterator[Backing]:
        session = Session()
        backing = Backing(BackingConfig(url=backing_world.backing.url, timeout=2.0), session,
                          Copier(session))
        yield backing
        await backing.close()
        await session.close()


class ClusterRegistries(BackingRegistries):
    """Nodes of one cluster: each its own Backing and Cluster on the one backing
    registry."""

    def __init__(self, source: Registry, backing: Registry, session: Session) -> None:
        super().__init__(source, backing)
        self.session = session
        self.backings: list[Backing] = []
        self.nodes: list[Cluster] = []

    def _backing(self) -> Backing:
        backing = Backing(BackingConfig(url=self.backing.url, timeout=2.0), self.session,
                          Copier(self.session))
        self.backings.append(backing)
        return backing

    def node(self, name: str, fetch_wait: float) -> Cluster:
        node = Cluster(self._backing(), self.session, name, fetch_wait)
        self.nodes.append(node)
        return node

    def writer(self) -> Backing:
        return self._backing()


class TestCluster(conformance.ClusterSuite):
    @pytest.fixture
    async def cluster_world(self, make_registry: MakeRegistry
                            ) -> AsyncIterator[ClusterRegistries]:
        session = Session()
        world = ClusterRegistries(make_registry(), make_registry(), session)
        yield world
        for part in (*world.nodes, *world.backings):
            await part.close()
        await session.close()


@pytest.mark.parametrize("annotations", [
    {"dev.nodekeeper.check.digest": "sha256:short", "dev.nodekeeper.check.at": "1",
     "dev.nodekeeper.check.node": "node-a"},
    {"dev.nodekeeper.check.digest": "sha256:" + "a" * 64, "dev.nodekeeper.check.at": "nan",
     "dev.nodekeeper.check.node": "node-a"},
    {"dev.nodekeeper.check.digest": "sha256:" + "a" * 64, "dev.nodekeeper.check.at": "1",
     "dev.nodekeeper.check.node": "Not A Node\n"},
    {},
])
async def test_a_malformed_shared_check_is_no_check(make_registry: MakeRegistry,
                                                    annotations: dict[str, str]) -> None:
    world = ClusterRegistries(make_registry(), make_registry(), Session())
    reference, _, _ = world.publish_source("app", "m1", "malformed")
    node = world.node("node-b", 5)
    ref = parse(reference)
    repository = world.backings[0].repository(ref)
    digest = "sha256:" + "b" * 64
    lease = {"dev.nodekeeper.lease.node": "node-a", "dev.nodekeeper.lease.until": "later"}
    async with httpx.AsyncClient() as client:
        for tag, document in ((check_tag("m1"), annotations), (lease_tag(digest), lease)):
            response = await client.put(
                f"{world.backing.url}/v2/{repository}/manifests/{tag}",
                content=marker(document),
                headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
            assert response.status_code == 201, response.text
    try:
        assert await node.last_check(ref) is None
        # A lease nobody can read as live is no lease: this node takes it.
        assert await node.claim(ref, digest) == "node-b"
    finally:
        await node.close()
        await world.backings[0].close()
        await world.session.close()


class TestState(conformance.StateSuite):
    @pytest.fixture
    def state(self, tmp_path: Path) -> Iterator[State]:
        opened = State(tmp_path / "state")
        yield opened
        opened.close()
