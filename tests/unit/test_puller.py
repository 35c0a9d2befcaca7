"""The puller's I/O around the decision, on the fakes of its edges: what it asks, what it
records, which rounds are shared, and what reaches containerd."""

from __future__ import annotations

import asyncio

import pytest

from nodekeeper import metrics
from nodekeeper.errors import ContainerdError, ContainerdRefusedPull, PullFailed
from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import ANONYMOUS, Credentials, fingerprint
from nodekeeper.pull.decision import Decision
from nodekeeper.pull.edges import Answer, Pod
from nodekeeper.pull.policy import parse as parse_policy
from nodekeeper.pull.puller import Puller, PullRequest
from nodekeeper.pull.reference import parse
from nodekeeper.settings import Document
from tests.fakes import (
    FakeBacking,
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
NAME = str(parse(REF))
V1, V2 = published("v1"), published("v2")
ALICE = Credentials("alice", "alice-pw")


class Heard:
    """Records what the puller tells the pod's owner (events.Events in the daemon)."""

    def __init__(self) -> None:
        self.served: list[Answer] = []

    def observe(self, answer: Answer) -> None:
        self.served.append(answer)


class Node:
    """A puller on fakes, with one upstream registry."""

    def __init__(self, policy: str = "defaults:\n  update: always\n", backing: bool = False,
                 private: bool = False) -> None:
        self.registries: Registries = {HOST: FakeRegistry(
            users={"alice": "alice-pw"} if private else {})}
        self.upstream = self.registries[HOST]
        self.images = FakeImages(self.registries)
        self.prober = FakeUpstream(self.registries)
        self.state = FakeState()
        self.backing = FakeBacking(self.registries) if backing else None
        rules = parse_policy(Document("policy.yaml", policy))
        self.heard = Heard()
        self.puller = Puller(self.images, self.prober, self.state, lambda: rules, self.backing,
                             self.heard)

    async def pull(self, credentials: Credentials | None = None,
                   original: Requested | None = None, pod: Pod | None = None) -> Answer:
        return await self.puller.pull(PullRequest(
            REF, credentials, original or Requested(REF, credentials), pod))

    async def failure(self, credentials: Credentials | None = None) -> PullFailed:
        with pytest.raises(PullFailed) as failed:
            await self.pull(credentials)
        return failed.value


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_first_pull_then_fresh_then_updated() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    assert (await node.pull()).decision is Decision.PULLED
    assert (await node.pull()).decision is Decision.FRESH
    node.upstream.publish(REF, V2)
    updated = await node.pull()
    assert (updated.decision, updated.image_id) == (Decision.UPDATED, V2.image_id)
    assert (updated.node_digest, updated.upstream_digest) == (V1.digest, V2.digest)
    await settle()
    assert [d.decision for d in node.state.decisions] == ["pulled", "fresh", "updated"]
    check = node.state.check(NAME)
    assert check is not None
    assert (check.result, check.digest) == ("ok", V2.digest)
    assert node.state.seen_working(parse(REF).repository, ANONYMOUS)


async def test_a_copy_vouched_for_by_image_events_is_answered_without_a_round() -> None:
    node = Node("defaults:\n  update: never\n")
    node.upstream.publish(REF, V1)
    await node.pull()  # the probe records the repository as public
    node.images.vouched.add(NAME)
    probes = len(node.prober.probes)
    answer = await node.pull()
    assert (answer.decision, answer.image_id) == (Decision.LOCAL_PINNED, V1.image_id)
    assert len(node.prober.probes) == probes
    assert not node.puller._rounds.busy((NAME, ANONYMOUS))


async def test_overlapping_pulls_share_one_round() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    node.images.pull_seconds = 0.05
    answers = await asyncio.gather(*(node.pull() for _ in range(10)))
    assert {a.image_id for a in answers} == {V1.image_id}
    assert len(node.prober.probes) == 1
    assert len(node.images.pulls) == 1
    assert sum(a.shared for a in answers) == 9
    await settle()
    assert len(node.state.decisions) == 1  # the shared answers are recorded once


async def test_a_pull_after_the_question_went_upstream_asks_again() -> None:
    node = Node("defaults:\n  update: always\n  probe_timeout: 200ms\n")
    node.upstream.publish(REF, V1)
    await node.pull()
    node.upstream.black_hole = True  # the first round's question hangs upstream
    first = asyncio.ensure_future(node.pull())
    for _ in range(1000):
        if len(node.prober.probes) == 2:
            break
        await asyncio.sleep(0.001)
    node.upstream.black_hole = False
    node.upstream.publish(REF, V2)
    second = await node.pull()  # started after the push: must not share the first round
    assert second.image_id == V2.image_id
    assert not second.shared
    assert (await first).decision is Decision.FALLBACK


async def test_write_through_follows_every_answer_upstream_confirmed() -> None:
    node = Node(backing=True)
    node.upstream.publish(REF, V1)
    await node.pull()
    assert node.backing is not None
    assert node.backing.copies == [(NAME, V1.digest)]
    assert node.backing.repository(parse(REF)) in node.backing.public


async def test_a_digest_backing_holds_is_pulled_from_backing_with_the_request_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    saved = RecordingMetric()
    monkeypatch.setattr(metrics, "UPSTREAM_SAVED", saved)
    node = Node(backing=True)
    assert node.backing is not None
    node.upstream.publish(REF, V1)
    node.backing.write_through(parse(REF), V1.digest, None, public=True)  # type: ignore[arg-type]
    original = Requested(REF, annotations=(("io.kubernetes.pod.name", "web-1"),))
    answer = await node.pull(original=original)
    assert answer.decision is Decision.BACKING
    ((sent, name, credentials),) = node.images.pulls
    assert sent is original  # annotations, sandbox config: all of it
    assert name == node.backing.name(parse(REF), V1.digest)
    assert credentials == node.backing.credentials
    assert await node.images.held_image_id(NAME) == V1.image_id
    assert saved.counts == {"pull": 1}  # upstream served no bytes for it


async def test_the_backing_fallback_forwards_the_original_request() -> None:
    node = Node(backing=True)
    assert node.backing is not None
    node.upstream.publish(REF, V1)
    node.backing.write_through(parse(REF), V1.digest, None, public=True)  # type: ignore[arg-type]
    node.upstream.down = True
    original = Requested(REF, annotations=(("io.kubernetes.pod.name", "web-2"),))
    answer = await node.pull(original=original)
    assert answer.decision is Decision.BACKING_FALLBACK
    assert answer.kind is Kind.UNREACHABLE
    ((sent, name, _),) = node.images.pulls
    assert sent is original
    assert name == node.backing.name(parse(REF), V1.digest)


async def test_a_refusal_names_what_was_tried_and_is_recorded() -> None:
    node = Node(private=True)
    node.upstream.publish(REF, V1)
    await node.pull(ALICE)
    node.upstream.down = True
    failed = await node.failure(Credentials("alice", "guess"))
    assert failed.kind is Kind.UNREACHABLE
    assert "these credentials were never seen to work" in failed.message
    assert failed.containerd is None
    await settle()
    assert node.state.decisions[-1] is failed.answer
    assert (failed.answer.decision, failed.answer.reference) == (Decision.ERROR, NAME)
    assert "guess" not in repr(node.state.decisions)


async def test_credentials_for_another_registry_count_as_none() -> None:
    # containerd drops credentials whose server_address names another host; so must the
    # fingerprint, or the node's copy would go where containerd answers 401.
    node = Node(private=True)
    node.upstream.publish(REF, V1)
    await node.pull(ALICE)
    assert node.state.seen_working(parse(REF).repository,
                                   fingerprint(node.state.key, parse(REF).repository, ALICE))
    node.upstream.down = True
    assert (await node.pull(ALICE)).decision is Decision.FALLBACK
    elsewhere = Credentials("alice", "alice-pw", server_address="https://other.example")
    failed = await node.failure(elsewhere)
    assert "was never seen to be pullable without credentials" in failed.message


async def test_containerds_refusal_is_passed_on_when_nothing_better_can_be_said() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    said = ContainerdError("NOT_FOUND", f'failed to pull and unpack image "{REF}": not found')
    node.images.refuse_with = ContainerdRefusedPull(Kind.NOT_FOUND, said)
    failed = await node.failure()
    assert (failed.kind, failed.containerd) == (Kind.NOT_FOUND, said)


WEB = Pod("web-1", "shop", "0b4c7d3e-0000-4000-8000-000000000001")
API = Pod("api-1", "shop", "0b4c7d3e-0000-4000-8000-000000000002")


async def test_each_pod_hears_of_the_fallback_it_got() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    await node.pull(pod=WEB)
    node.upstream.down = True
    answers = await asyncio.gather(node.pull(pod=WEB), node.pull(pod=API), node.pull())
    assert {a.decision for a in answers} == {Decision.FALLBACK}
    assert sorted(s.pod.name for s in node.heard.served) == ["api-1", "web-1"]
    served = node.heard.served[0]
    assert (served.image, served.reference, served.decision) == (REF, NAME, Decision.FALLBACK)
    assert (served.kind, served.upstream, served.digest) == (
        Kind.UNREACHABLE, HOST, V1.digest)
    assert "connection refused" in served.detail
    assert served.last_confirmed == node.state.check(NAME).ok_at  # type: ignore[union-attr]


async def test_an_update_is_heard_with_both_digests_and_a_fresh_answer_is_not() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    await node.pull(pod=WEB)
    await node.pull(pod=WEB)
    assert node.heard.served == []
    node.upstream.publish(REF, V2)
    await node.pull(pod=WEB)
    (served,) = node.heard.served
    assert (served.decision, served.node_digest, served.digest) == (
        Decision.UPDATED, V1.digest, V2.digest)


async def test_a_fallback_is_remembered_as_stale_until_upstream_confirms_again() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    await node.pull()
    node.upstream.down = True
    await node.pull()
    await node.pull()
    assert node.state.stale(NAME) == V1.digest
    node.upstream.down = False
    assert (await node.pull()).decision is Decision.FRESH
    assert node.state.stale(NAME) == ""


async def test_bad_bytes_from_backing_are_dropped_and_upstream_serves_the_pull() -> None:
    node = Node(backing=True)
    assert node.backing is not None
    node.upstream.publish(REF, V1)
    node.backing.write_through(parse(REF), V1.digest, None, public=True)  # type: ignore[arg-type]
    layer = "sha256:" + "e" * 64
    said = ContainerdError("FAILED_PRECONDITION", f'failed commit on ref "layer-{layer}": '
                           f"unexpected commit digest sha256:{'f' * 64}, expected {layer}")
    node.images.refuse_with = ContainerdRefusedPull(Kind.INVALID, said,
                                                    (f"sha256:{'f' * 64}", layer))
    answer = await node.pull()
    assert (answer.decision, answer.image_id) == (Decision.PULLED, V1.image_id)
    assert [name for _, name, _ in node.images.pulls] == [
        node.backing.name(parse(REF), V1.digest), None]
    assert node.images.discarded == [V1.digest, f"sha256:{'f' * 64}", layer]
    assert (node.backing.repository(parse(REF)), V1.digest) in node.backing.bad


async def test_a_backing_pull_failing_otherwise_marks_nothing_bad() -> None:
    node = Node(backing=True)
    assert node.backing is not None
    node.upstream.publish(REF, V1)
    node.backing.write_through(parse(REF), V1.digest, None, public=True)  # type: ignore[arg-type]
    node.images.refuse_with = ContainerdRefusedPull(Kind.UNREACHABLE,
                                                    ContainerdError("UNKNOWN", "dial"))
    assert (await node.pull()).decision is Decision.PULLED
    assert node.images.discarded == []
    assert node.backing.bad == set()


async def test_one_answer_is_what_is_returned_recorded_and_heard() -> None:
    node = Node()
    node.upstream.publish(REF, V1)
    await node.pull(pod=WEB)
    node.upstream.down = True
    answer = await node.pull(pod=WEB)
    await settle()
    assert node.state.decisions[-1] is answer
    assert node.heard.served == [answer]
    assert (answer.decision, answer.kind, answer.image_id, answer.pod) == (
        Decision.FALLBACK, Kind.UNREACHABLE, V1.image_id, WEB)
    assert not answer.confirmed
    assert node.state.stale(NAME) == V1.digest
