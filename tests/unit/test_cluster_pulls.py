"""Pullers of several nodes on one backing registry (fakes): one fetch upstream per digest
for the cluster, each wait bounded, and checks of tags shared without sharing trust."""

from __future__ import annotations

import asyncio

import pytest

from nodekeeper import metrics
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.decision import Decision
from nodekeeper.pull.edges import Answer
from nodekeeper.pull.policy import parse as parse_policy
from nodekeeper.pull.puller import Puller, PullRequest
from nodekeeper.pull.reference import parse
from nodekeeper.settings import Document
from tests.fakes import (
    FakeBacking,
    FakeCluster,
    FakeImages,
    FakeRegistry,
    FakeState,
    FakeUpstream,
    RecordingMetric,
    Registries,
    Requested,
    published,
)

HOST = "registry.test:5000"
REF = f"{HOST}/team/app:1"
V1, V2 = published("v1"), published("v2")
ALICE = Credentials("alice", "alice-pw")
INTERVAL = "defaults:\n  update: interval\n  interval: 60s\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """One node: its own containerd, state and name; upstream and backing are shared."""

    def __init__(self, name: str, registries: Registries, backing: FakeBacking, clock: Clock,
                 policy: str, fetch_wait: float) -> None:
        self.images = FakeImages(registries)
        self.prober = FakeUpstream(registries)
        self.state = FakeState()
        self.clock = clock
        self.cluster = FakeCluster(backing, name, fetch_wait, clock)
        rules = parse_policy(Document("policy.yaml", policy))
        self.puller = Puller(self.images, self.prober, self.state, lambda: rules, backing,
                             cluster=self.cluster, clock=clock)

    async def pull(self, credentials: Credentials | None = None) -> Answer:
        self.state.now = self.clock.now
        return await self.puller.pull(PullRequest(REF, credentials,
                                                  Requested(REF, credentials)))

    @property
    def upstream_pulls(self) -> int:
        return sum(1 for _, name, _ in self.images.pulls if name is None)


class Cluster:
    def __init__(self, nodes: int, policy: str = "defaults:\n  update: always\n",
                 fetch_wait: float = 5.0, private: bool = False) -> None:
        self.registries: Registries = {HOST: FakeRegistry(
            users={"alice": "alice-pw"} if private else {})}
        self.upstream = self.registries[HOST]
        self.backing = FakeBacking(self.registries)
        self.clock = Clock()
        self.nodes = [Node(f"node-{i}", self.registries, self.backing, self.clock, policy,
                           fetch_wait) for i in range(nodes)]

    @property
    def probes(self) -> int:
        return sum(len(node.prober.probes) for node in self.nodes)


async def test_a_digest_pulled_at_once_by_every_node_is_fetched_upstream_once() -> None:
    cluster = Cluster(4)
    cluster.upstream.publish(REF, V1)
    for node in cluster.nodes:
        node.images.pull_seconds = 0.05   # the fetch takes a while: the others wait
    answers = await asyncio.gather(*(node.pull() for node in cluster.nodes))
    assert sum(node.upstream_pulls for node in cluster.nodes) == 1
    assert sorted(a.decision.value for a in answers) == ["backing"] * 3 + ["pulled"]
    (holder,) = [n.cluster.node for n, a in zip(cluster.nodes, answers, strict=True)
                 if a.decision is Decision.PULLED]
    assert {a.reason for a in answers if a.decision is Decision.BACKING} == {
        f"fetched upstream by {holder}"}
    assert {a.image_id for a in answers} == {V1.image_id}
    assert cluster.backing.copies == [(str(parse(REF)), V1.digest)]


async def test_a_holder_that_never_feeds_backing_holds_the_others_only_fetch_wait() -> None:
    cluster = Cluster(2, fetch_wait=0.2)
    cluster.upstream.publish(REF, V1)
    stuck, other = cluster.nodes
    stuck.images.pull_seconds = 3600   # the holder hangs (or died) mid-fetch
    holding = asyncio.ensure_future(stuck.pull())
    for _ in range(1000):
        if stuck.cluster.claims:
            break
        await asyncio.sleep(0.01)
    assert stuck.cluster.claims == [V1.digest]
    answer = await other.pull()
    assert (answer.decision, answer.image_id) == (Decision.PULLED, V1.image_id)
    assert other.cluster.claims == [V1.digest]
    holding.cancel()


async def test_a_dead_backing_sends_every_node_upstream_without_a_lease() -> None:
    cluster = Cluster(3)
    cluster.upstream.publish(REF, V1)
    cluster.backing.down_reason = "connection refused"
    answers = await asyncio.gather(*(node.pull() for node in cluster.nodes))
    assert [a.decision for a in answers] == [Decision.PULLED] * 3
    assert all(not node.cluster.claims for node in cluster.nodes)


async def test_without_fetch_wait_every_node_fetches_for_itself() -> None:
    cluster = Cluster(2, fetch_wait=0)
    cluster.upstream.publish(REF, V1)
    for node in cluster.nodes:
        node.images.pull_seconds = 0.05
    await asyncio.gather(*(node.pull() for node in cluster.nodes))
    assert sum(node.upstream_pulls for node in cluster.nodes) == 2


async def test_one_check_upstream_per_interval_serves_the_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    saved = RecordingMetric()
    monkeypatch.setattr(metrics, "UPSTREAM_SAVED", saved)
    cluster = Cluster(3, INTERVAL)
    cluster.upstream.publish(REF, V1)
    for node in cluster.nodes:
        await node.pull()
    first = cluster.probes
    cluster.clock.now += 100       # every node's own check is older than the interval
    answers = [await node.pull() for node in cluster.nodes]
    assert cluster.probes == first + 1
    assert [a.decision for a in answers] == [Decision.FRESH] + [
        Decision.CLUSTER_INTERVAL] * 2
    assert answers[1].reason == "checked by node-0 0s ago"
    assert not answers[1].confirmed
    # The first round: two nodes pulled what the first fetched, from backing; then two
    # HEADs the other nodes did not send.
    assert saved.counts == {"pull": 2, "check": 2}


async def test_a_moved_tag_seen_by_another_node_is_checked_upstream() -> None:
    cluster = Cluster(2, INTERVAL)
    cluster.upstream.publish(REF, V1)
    for node in cluster.nodes:
        await node.pull()
    cluster.upstream.publish(REF, V2)
    cluster.clock.now += 100
    await cluster.nodes[0].pull()
    answer = await cluster.nodes[1].pull()
    assert (answer.decision, answer.image_id) == (Decision.BACKING, V2.image_id)
    assert len(cluster.nodes[1].prober.probes) == 2


async def test_under_always_every_pull_asks_upstream() -> None:
    cluster = Cluster(2)
    cluster.upstream.publish(REF, V1)
    for _ in range(2):
        for node in cluster.nodes:
            await node.pull()
    assert cluster.probes == 4


async def test_private_checks_are_shared_only_with_credentials_seen_working_here() -> None:
    cluster = Cluster(2, INTERVAL, private=True)
    cluster.upstream.publish(REF, V1)
    seen, fresh = cluster.nodes
    await seen.pull(ALICE)
    await fresh.pull(ALICE)       # this node saw alice's credentials work too
    cluster.clock.now += 100
    await seen.pull(ALICE)
    assert (await fresh.pull(ALICE)).decision is Decision.CLUSTER_INTERVAL
    # Credentials this node never saw work: upstream decides, not another node's check.
    bob = Credentials("bob", "guess")
    probes = len(fresh.prober.probes)
    refused = await asyncio.gather(fresh.pull(bob), return_exceptions=True)
    assert len(fresh.prober.probes) == probes + 1
    assert not isinstance(refused[0], Answer)
    # Nor without credentials, however recent the cluster's check.
    probes = len(fresh.prober.probes)
    await asyncio.gather(fresh.pull(), return_exceptions=True)
    assert len(fresh.prober.probes) == probes + 1
