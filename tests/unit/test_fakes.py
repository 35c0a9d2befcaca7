"""The in-memory fakes of the core's edges pass the same suites as the real parts
(tests/conformance.py; the real parts in tests/integration/test_edges.py)."""

from __future__ import annotations

from typing import Any

import pytest

from nodekeeper.pull.edges import Endpoint, Location, Pod
from nodekeeper.pull.reference import parse
from tests import conformance
from tests.fakes import (
    FakeBacking,
    FakeCluster,
    FakeImages,
    FakeRegistry,
    FakeSink,
    FakeState,
    FakeUpstream,
    Published,
    Registries,
    Requested,
    published,
)

HOST = "registry.test:5000"


class FakeWorld:
    """Registries for the fakes, with the verbs the suites use."""

    def __init__(self) -> None:
        self.registries: Registries = {HOST: FakeRegistry()}
        self.private = FakeRegistry(users={conformance.USER: conformance.PASSWORD})
        self.registries["private.test:5000"] = self.private

    def _registry(self, private: bool) -> tuple[str, FakeRegistry]:
        return ("private.test:5000", self.private) if private else (HOST, self.registries[HOST])

    def publish(self, repository: str, tag: str, seed: str,
                private: bool = False) -> tuple[str, Published]:
        host, registry = self._registry(private)
        reference = f"{host}/{repository}:{tag}"
        image = published(seed)
        registry.publish(reference, image)
        return reference, image

    def request(self, reference: str) -> object:
        return Requested(reference)

    def unreachable(self) -> str:
        return "nowhere.test:1/app:1"

    def remove_tag(self, reference: str) -> None:
        self.registries[parse(reference).domain].remove(reference)

    def stop(self) -> None:
        self.registries[HOST].down = True

    def black_hole(self) -> None:
        self.registries[HOST].black_hole = True


class FakeBackingWorld(FakeWorld):
    def __init__(self) -> None:
        super().__init__()
        self.backing = FakeBacking(self.registries)

    def publish_source(self, repository: str, tag: str, seed: str
                       ) -> tuple[str, Location, Published]:
        reference, image = FakeWorld.publish(self, repository, tag, seed)
        source = Location(Endpoint(f"http://{HOST}/v2", HOST), parse(reference).path)
        return reference, source, image

    def stop_backing(self) -> None:
        self.backing.down_reason = "connection refused"


class TestFakeImages(conformance.ImagesSuite):
    @pytest.fixture
    def image_world(self) -> FakeWorld:
        return FakeWorld()

    @pytest.fixture
    def images(self, image_world: FakeWorld) -> FakeImages:
        return FakeImages(image_world.registries)


class TestFakeUpstream(conformance.UpstreamSuite):
    @pytest.fixture
    def upstream_world(self) -> FakeWorld:
        return FakeWorld()

    @pytest.fixture
    def upstream(self, upstream_world: FakeWorld) -> FakeUpstream:
        return FakeUpstream(upstream_world.registries)


class TestFakeBacking(conformance.BackingSuite):
    @pytest.fixture
    def backing_world(self) -> FakeBackingWorld:
        return FakeBackingWorld()

    @pytest.fixture
    def backing(self, backing_world: FakeBackingWorld) -> FakeBacking:
        return backing_world.backing


class FakeClusterWorld(FakeBackingWorld):
    def node(self, name: str, fetch_wait: float) -> FakeCluster:
        return FakeCluster(self.backing, name, fetch_wait)

    def writer(self) -> FakeBacking:
        return self.backing


class TestFakeCluster(conformance.ClusterSuite):
    @pytest.fixture
    def cluster_world(self) -> FakeClusterWorld:
        return FakeClusterWorld()


class TestFakeState(conformance.StateSuite):
    @pytest.fixture
    def state(self) -> FakeState:
        return FakeState()


class FakeSinkWorld:
    def __init__(self) -> None:
        self.sink = FakeSink()
        self._pods = 0

    def pod(self) -> Pod:
        self._pods += 1
        return Pod(f"web-{self._pods}", "shop", f"uid-{self._pods}")

    def events(self, pod: Pod) -> list[dict[str, Any]]:
        return self.sink.events(pod)


class TestFakeSink(conformance.SinkSuite):
    @pytest.fixture
    def sink_world(self) -> FakeSinkWorld:
        return FakeSinkWorld()

    @pytest.fixture
    def sink(self, sink_world: FakeSinkWorld) -> FakeSink:
        return sink_world.sink
