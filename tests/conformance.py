"""What the PullImage core relies on from each of its edges (nodekeeper/pull/edges.py), as test
suites that the in-memory fakes (tests/fakes.py) and the real parts both pass.

A suite is a class of tests over fixtures that a subclass provides: the unit tier runs
each suite against its fake (tests/unit/test_fakes.py), the integration tier against the
real part, with a real containerd and real registries (tests/integration/test_edges.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import pytest

from nodekeeper.errors import ContainerdRefusedPull, PostFailed
from nodekeeper.failures import Failure, Kind
from nodekeeper.kube.events import event_name
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.edges import (
    Answer,
    BackingStore,
    Cluster,
    Decision,
    Images,
    Location,
    Pod,
    Sink,
    StateStore,
    Upstream,
)
from nodekeeper.pull.reference import Reference, parse
from tests.fakes import Published

USER, PASSWORD = "alice", "alice-pw"


async def _resolves(backing: BackingStore, ref: Reference, digest: str) -> bool:
    return await backing.resolve_tag(ref) == digest


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Await `check()` until it is true (copies to backing run in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- containerd's images -----------------------------------------------------------------

class ImageWorld(Protocol):
    """Registries an Images implementation pulls from."""

    def publish(self, repository: str, tag: str, seed: str) -> tuple[str, Published]:
        """Push an image; return its reference (as written in a pod) and what it is."""

    def request(self, reference: str) -> object:
        """The PullImage request for `reference`, as the implementation receives it."""

    def unreachable(self) -> str:
        """A reference on a registry that does not answer."""


class ImagesSuite:
    async def test_an_absent_name_holds_nothing(self, images: Images,
                                                image_world: ImageWorld) -> None:
        reference, _ = image_world.publish("absent", "1", "absent")
        name = str(parse(reference))
        assert await images.held_image_id(name) == ""
        assert await images.target_digest(name) == ""
        assert images.known_image_id(name) == ""

    async def test_a_pull_records_the_image_under_its_names(self, images: Images,
                                                           image_world: ImageWorld) -> None:
        reference, image = image_world.publish("app", "1", "pulled")
        assert await images.pull(image_world.request(reference)) == image.image_id
        ref = parse(reference)
        assert await images.held_image_id(str(ref)) == image.image_id
        assert await images.target_digest(str(ref)) == image.digest
        assert await images.held_image_id(str(ref.with_digest(image.digest))) == image.image_id
        assert images.known_image_id(str(ref)) in ("", image.image_id)
        assert await images.wait_visible(str(ref))

    async def test_a_missing_tag_is_refused_as_not_found(self, images: Images,
                                                         image_world: ImageWorld) -> None:
        reference, _ = image_world.publish("app", "1", "present")
        missing = reference.rsplit(":", 1)[0] + ":missing"
        with pytest.raises(ContainerdRefusedPull) as refused:
            await images.pull(image_world.request(missing))
        assert refused.value.kind is Kind.NOT_FOUND
        assert refused.value.containerd.message

    async def test_an_unreachable_registry_is_refused_as_unavailable(
            self, images: Images, image_world: ImageWorld) -> None:
        with pytest.raises(ContainerdRefusedPull) as refused:
            await images.pull(image_world.request(image_world.unreachable()))
        assert refused.value.kind.unavailable

    async def test_a_pull_under_another_name_can_be_recorded_under_the_requested_one(
            self, images: Images, image_world: ImageWorld) -> None:
        wanted, image = image_world.publish("wanted", "1", "aliased")
        copy, same = image_world.publish("elsewhere/wanted", "1", "aliased")
        assert same == image
        source = str(parse(copy).with_digest(image.digest))
        assert await images.pull(image_world.request(wanted), source) == image.image_id
        ref = parse(wanted)
        names = [str(ref.with_digest(image.digest)), str(ref)]
        await images.alias(source, names)
        assert await images.wait_visible(str(ref))
        for name in names:
            assert await images.held_image_id(name) == image.image_id
            assert await images.target_digest(name) == image.digest
        assert await images.target_digest(source) == ""


    async def test_discarding_what_no_download_left_is_harmless(
            self, images: Images, image_world: ImageWorld) -> None:
        reference, image = image_world.publish("app", "1", "discarded")
        assert await images.discard([image.digest, image.image_id]) == 0
        assert await images.pull(image_world.request(reference)) == image.image_id


# -- the upstream registry ---------------------------------------------------------------

class UpstreamWorld(Protocol):
    """A registry the Upstream implementation probes; `private` ones need USER/PASSWORD."""

    def publish(self, repository: str, tag: str, seed: str,
                private: bool = False) -> tuple[str, Published]: ...

    def remove_tag(self, reference: str) -> None: ...

    def stop(self) -> None:
        """The registry stops answering: connections are refused."""

    def black_hole(self) -> None:
        """The registry takes connections and never answers."""


class UpstreamSuite:
    async def test_a_probe_answers_the_tags_digest(self, upstream: Upstream,
                                                   upstream_world: UpstreamWorld) -> None:
        reference, image = upstream_world.publish("app", "1", "probed")
        found = await upstream.probe(parse(reference), None, 5.0)
        assert found.digest == image.digest
        assert not found.authenticated
        assert found.source is not None

    async def test_a_moved_tag_answers_its_new_digest(self, upstream: Upstream,
                                                      upstream_world: UpstreamWorld) -> None:
        reference, _ = upstream_world.publish("app", "1", "before")
        _, moved = upstream_world.publish("app", "1", "after")
        assert (await upstream.probe(parse(reference), None, 5.0)).digest == moved.digest

    async def test_a_removed_tag_is_not_found(self, upstream: Upstream,
                                              upstream_world: UpstreamWorld) -> None:
        reference, _ = upstream_world.publish("app", "1", "removed")
        upstream_world.remove_tag(reference)
        with pytest.raises(Failure) as failure:
            await upstream.probe(parse(reference), None, 5.0)
        assert failure.value.kind is Kind.NOT_FOUND

    async def test_credentials_decide_a_private_repository(
            self, upstream: Upstream, upstream_world: UpstreamWorld) -> None:
        reference, image = upstream_world.publish("private/app", "1", "private", private=True)
        ref = parse(reference)
        found = await upstream.probe(ref, Credentials(USER, PASSWORD), 5.0)
        assert (found.digest, found.authenticated) == (image.digest, True)
        for wrong in (None, Credentials(USER, "guess")):
            with pytest.raises(Failure) as failure:
                await upstream.probe(ref, wrong, 5.0)
            assert failure.value.kind is Kind.UNAUTHORIZED

    async def test_credentials_for_another_registry_do_not_apply(
            self, upstream: Upstream, upstream_world: UpstreamWorld) -> None:
        reference, _ = upstream_world.publish("app", "1", "applies")
        ref = parse(reference)
        here = Credentials(USER, PASSWORD, server_address=f"https://{ref.domain}")
        other = Credentials(USER, PASSWORD, server_address="https://elsewhere.example")
        anywhere = Credentials(USER, PASSWORD)
        assert upstream.applicable(ref, None) is None
        assert upstream.applicable(ref, anywhere) is anywhere
        assert upstream.applicable(ref, here) is here
        assert upstream.applicable(ref, other) is None

    async def test_a_stopped_registry_is_unreachable(self, upstream: Upstream,
                                                     upstream_world: UpstreamWorld) -> None:
        reference, _ = upstream_world.publish("app", "1", "stopped")
        upstream_world.stop()
        with pytest.raises(Failure) as failure:
            await upstream.probe(parse(reference), None, 5.0)
        assert failure.value.kind is Kind.UNREACHABLE

    async def test_a_black_hole_times_out_within_the_deadline(
            self, upstream: Upstream, upstream_world: UpstreamWorld) -> None:
        reference, _ = upstream_world.publish("app", "1", "silent")
        upstream_world.black_hole()
        started = time.monotonic()
        with pytest.raises(Failure) as failure:
            await upstream.probe(parse(reference), None, 0.5)
        assert failure.value.kind is Kind.TIMEOUT
        assert "0.5s" in failure.value.detail
        # A hang guard: a probe that ignored its deadline would not come back at all.
        assert time.monotonic() - started < 15.0


# -- the backing registry ----------------------------------------------------------------

class BackingWorld(Protocol):
    def publish_source(self, repository: str, tag: str, seed: str
                       ) -> tuple[str, Location, Published]:
        """Push an image to a source registry: its reference, the source, what it is."""

    def stop_backing(self) -> None: ...


class BackingSuite:
    async def test_nothing_is_held_before_a_copy(self, backing: BackingStore,
                                                 backing_world: BackingWorld) -> None:
        reference, _, image = backing_world.publish_source("app", "1", "uncopied")
        ref = parse(reference)
        assert not await backing.holds(ref, image.digest)
        assert await backing.resolve_tag(ref) == ""
        assert not await backing.is_public(ref)
        assert backing.down_reason == ""

    async def test_write_through_copies_the_image_and_its_tag(
            self, backing: BackingStore, backing_world: BackingWorld) -> None:
        reference, source, image = backing_world.publish_source("app", "2", "copied")
        ref = parse(reference)
        backing.write_through(ref, image.digest, source, public=True)
        await eventually(lambda: backing.holds(ref, image.digest))
        # The tag is PUT after the manifest, so it may trail `holds` by one request.
        await eventually(lambda: _resolves(backing, ref, image.digest))
        await eventually(lambda: backing.is_public(ref))
        name = backing.name(ref, image.digest)
        assert name.endswith(f"@{image.digest}")
        assert ref.path in name

    async def test_a_private_copy_is_not_marked_public(self, backing: BackingStore,
                                                       backing_world: BackingWorld) -> None:
        reference, source, image = backing_world.publish_source("secret/app", "1", "private")
        ref = parse(reference)
        backing.write_through(ref, image.digest, source, public=False)
        await eventually(lambda: backing.holds(ref, image.digest))
        assert not await backing.is_public(ref)

    async def test_a_digest_marked_bad_is_not_held_on_this_node(
            self, backing: BackingStore, backing_world: BackingWorld) -> None:
        reference, source, image = backing_world.publish_source("app", "9", "bad")
        ref = parse(reference)
        backing.write_through(ref, image.digest, source, public=True)
        await eventually(lambda: backing.holds(ref, image.digest))
        backing.mark_bad(ref, image.digest, "unexpected commit digest")
        assert not await backing.holds(ref, image.digest)

    async def test_a_backing_that_is_down_holds_nothing_and_says_why(
            self, backing: BackingStore, backing_world: BackingWorld) -> None:
        reference, _, _ = backing_world.publish_source("app", "3", "down")
        backing_world.stop_backing()
        ref = parse(reference)
        assert not await backing.holds(ref, "sha256:" + "0" * 64)
        assert backing.down_reason
        assert await backing.resolve_tag(ref) == ""
        assert not await backing.is_public(ref)


# -- what the nodes share through backing ---------------------------------------------------

class ClusterWorld(BackingWorld, Protocol):
    def node(self, name: str, fetch_wait: float) -> Cluster:
        """A node of the cluster, sharing the one backing registry with the others."""

    def writer(self) -> BackingStore:
        """A node's backing registry, for write-through copies."""


class ClusterSuite:
    async def test_the_first_claim_holds_the_lease(self, cluster_world: ClusterWorld) -> None:
        reference, _, image = cluster_world.publish_source("app", "l1", "lease-1")
        ref = parse(reference)
        a, b = cluster_world.node("node-a", 30), cluster_world.node("node-b", 30)
        assert await a.claim(ref, image.digest) == "node-a"
        assert await b.claim(ref, image.digest) == "node-a"
        assert await a.claim(ref, image.digest) == "node-a"  # its own lease, renewed

    async def test_leases_are_per_digest(self, cluster_world: ClusterWorld) -> None:
        reference, _, one = cluster_world.publish_source("app", "l2", "lease-2")
        _, _, two = cluster_world.publish_source("app", "l3", "lease-3")
        ref = parse(reference)
        a, b = cluster_world.node("node-a", 30), cluster_world.node("node-b", 30)
        assert await a.claim(ref, one.digest) == "node-a"
        assert await b.claim(ref, two.digest) == "node-b"

    async def test_an_expired_lease_goes_to_the_next_claimant(
            self, cluster_world: ClusterWorld) -> None:
        reference, _, image = cluster_world.publish_source("app", "l4", "lease-4")
        ref = parse(reference)
        a, b = cluster_world.node("node-a", 0.2), cluster_world.node("node-b", 0.2)
        assert await a.claim(ref, image.digest) == "node-a"
        await asyncio.sleep(0.3)
        assert await b.claim(ref, image.digest) == "node-b"
        assert await a.claim(ref, image.digest) == "node-b"

    async def test_awaiting_a_digest_that_never_lands_ends_at_the_bound(
            self, cluster_world: ClusterWorld) -> None:
        reference, _, image = cluster_world.publish_source("app", "w1", "never")
        node = cluster_world.node("node-b", 30)
        started = time.monotonic()
        assert not await node.await_held(parse(reference), image.digest, 0.3)
        assert time.monotonic() - started >= 0.3

    async def test_a_digest_that_lands_while_awaited_ends_the_wait(
            self, cluster_world: ClusterWorld) -> None:
        reference, source, image = cluster_world.publish_source("app", "w2", "lands")
        ref = parse(reference)
        waiting = asyncio.ensure_future(
            cluster_world.node("node-b", 30).await_held(ref, image.digest, 60))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        cluster_world.writer().write_through(ref, image.digest, source, public=True)
        assert await waiting

    async def test_no_check_before_one_is_shared(self, cluster_world: ClusterWorld) -> None:
        reference, _, _ = cluster_world.publish_source("app", "c0", "unchecked")
        assert await cluster_world.node("node-b", 30).last_check(parse(reference)) is None

    @pytest.mark.parametrize("tag", ["c1", "t" * 128])
    async def test_a_check_is_shared_with_the_other_nodes(self, cluster_world: ClusterWorld,
                                                          tag: str) -> None:
        reference, _, image = cluster_world.publish_source("app", tag, f"checked {tag}")
        ref = parse(reference)
        a, b = cluster_world.node("node-a", 30), cluster_world.node("node-b", 30)
        before = time.time()
        a.share_check(ref, image.digest)
        await eventually(lambda: _has_check(b, ref))
        check = await b.last_check(ref)
        assert check is not None
        assert (check.digest, check.node) == (image.digest, "node-a")
        assert before - 1 <= check.at <= time.time() + 1

    async def test_a_dead_backing_shares_nothing_and_holds_nobody(
            self, cluster_world: ClusterWorld) -> None:
        reference, _, image = cluster_world.publish_source("app", "d1", "dead")
        ref = parse(reference)
        node = cluster_world.node("node-a", 30)
        cluster_world.stop_backing()
        assert await node.claim(ref, image.digest) == ""
        assert not await node.await_held(ref, image.digest, 5)
        assert await node.last_check(ref) is None
        node.share_check(ref, image.digest)  # never raises


async def _has_check(node: Cluster, ref: Reference) -> bool:
    return await node.last_check(ref) is not None


# -- state ---------------------------------------------------------------------------------

class StateSuite:
    def test_the_key_is_32_bytes(self, state: StateStore) -> None:
        assert isinstance(state.key, bytes)
        assert len(state.key) == 32

    def test_checks_keep_the_last_success(self, state: StateStore) -> None:
        reference = "registry.example/team/app:1"
        assert state.check(reference) is None
        state.record_check(reference, None, "sha256:" + "a" * 64)
        first = state.check(reference)
        assert first is not None
        assert (first.result, first.digest) == ("ok", "sha256:" + "a" * 64)
        assert first.ok_at is not None
        state.record_check(reference, Kind.TIMEOUT)
        failed = state.check(reference)
        assert failed is not None
        assert (failed.result, failed.ok_at, failed.digest) == (
            "timeout", first.ok_at, first.digest)

    def test_access_is_per_repository_and_fingerprint(self, state: StateStore) -> None:
        state.record_access("registry.example/team/app", "f1")
        assert state.seen_working("registry.example/team/app", "f1")
        assert not state.seen_working("registry.example/team/app", "f2")
        assert not state.seen_working("registry.example/team/other", "f1")

    def test_decisions_are_recorded_in_order(self, state: StateStore) -> None:
        before = len(state.recent())
        answers = [Answer(image=f"app:{n}", reference=f"registry.example/app:{n}",
                          rule="defaults", decision=decision, reason="digest unchanged",
                          at=float(n), duration_ms=1.0)
                   for n, decision in enumerate((Decision.FRESH, Decision.FALLBACK))]
        for answer in answers:
            state.record_decision(answer)
        assert state.recent()[before:] == answers

    def test_a_stale_answer_is_remembered_until_upstream_confirms(self,
                                                                  state: StateStore) -> None:
        reference, digest = "registry.example/team/app:1", "sha256:" + "b" * 64
        assert state.stale(reference) == ""
        state.mark_stale(reference, digest, Kind.UNREACHABLE)
        state.mark_stale(reference, digest, Kind.TIMEOUT)
        assert state.stale(reference) == digest
        state.clear_stale(reference)
        state.clear_stale(reference)
        assert state.stale(reference) == ""


# -- where Events on pods are posted ------------------------------------------------------

class SinkWorld(Protocol):
    """An API server (or its stand-in) the Sink posts to, as the node."""

    def pod(self) -> Pod:
        """A pod bound to the node: the node may post Events about it."""

    def events(self, pod: Pod) -> list[dict[str, Any]]:
        """The Events about `pod` as stored."""


_stamps = iter(range(1, 1 << 30))


def event_body(pod: Pod, message: str = "upstream unreachable", count: int = 1
               ) -> tuple[str, dict[str, Any]]:
    """A core/v1 Event about `pod` as kube/events.py posts it, and its name."""
    name = event_name(pod.name, time.time_ns() + next(_stamps))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return name, {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": pod.namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace,
                           "name": pod.name, "uid": pod.uid},
        "reason": "ImageFallback", "message": message, "type": "Warning",
        "source": {"component": "nodekeeper", "host": "node"},
        "reportingComponent": "nodekeeper", "reportingInstance": "node",
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": count,
    }


class SinkSuite:
    async def test_a_created_event_is_stored_on_the_pod(self, sink: Sink,
                                                        sink_world: SinkWorld) -> None:
        pod = sink_world.pod()
        name, body = event_body(pod)
        await sink.create(pod.namespace, body)
        (stored,) = sink_world.events(pod)
        assert (stored["metadata"]["name"], stored["message"], stored["count"]) == (
            name, "upstream unreachable", 1)
        assert stored["involvedObject"]["uid"] == pod.uid

    async def test_creating_an_event_again_counts_as_posted(self, sink: Sink,
                                                            sink_world: SinkWorld) -> None:
        pod = sink_world.pod()
        _, body = event_body(pod)
        await sink.create(pod.namespace, body)
        await sink.create(pod.namespace, body)  # its first answer was lost, say
        assert len(sink_world.events(pod)) == 1

    async def test_a_patch_changes_the_count_and_message(self, sink: Sink,
                                                         sink_world: SinkWorld) -> None:
        pod = sink_world.pod()
        name, body = event_body(pod)
        await sink.create(pod.namespace, body)
        await sink.patch(pod.namespace, name, {"count": 3, "message": "still unreachable"})
        (stored,) = sink_world.events(pod)
        assert (stored["count"], stored["message"]) == (3, "still unreachable")

    async def test_patching_an_event_that_is_gone_says_it_is_missing(
            self, sink: Sink, sink_world: SinkWorld) -> None:
        pod = sink_world.pod()
        name, _ = event_body(pod)
        with pytest.raises(PostFailed) as failed:
            await sink.patch(pod.namespace, name, {"count": 2})
        assert failed.value.missing
        assert not failed.value.retry
