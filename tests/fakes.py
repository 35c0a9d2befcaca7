"""In-memory stand-ins for the PullImage core's edges (nodekeeper/pull/edges.py).

Each passes the same conformance suite (tests/conformance.py) as the real part it stands
for, so a unit test of the puller on these fakes means what it would on real parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodekeeper.errors import ContainerdError, ContainerdRefusedPull, PostFailed
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.edges import (
    Answer,
    BackingStore,
    Check,
    Cluster,
    Endpoint,
    Images,
    Location,
    Pod,
    ProbeResult,
    SharedCheck,
    Sink,
    StateStore,
    Upstream,
)
from nodekeeper.pull.reference import Reference, parse
from nodekeeper.registry.hosts import default_host, default_server


@dataclass(frozen=True)
class Published:
    """An image as a registry serves it: its ID (config digest) and manifest digest."""

    image_id: str
    digest: str


def published(seed: str) -> Published:
    def sha(text: str) -> str:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    return Published(sha(f"config {seed}"), sha(f"manifest {seed}"))


@dataclass
class FakeRegistry:
    """What a registry holds, shared by FakeUpstream (which probes it) and FakeImages
    (which pulls from it): normalized reference -> image, and who may pull."""

    images: dict[str, Published] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)   # private when not empty
    down: bool = False
    black_hole: bool = False

    def publish(self, reference: str, image: Published) -> None:
        ref = parse(reference)
        self.images[str(ref)] = image
        self.images[str(ref.with_digest(image.digest))] = image

    def remove(self, reference: str) -> None:
        self.images.pop(str(parse(reference)), None)

    def allows(self, credentials: Credentials | None) -> bool:
        if not self.users:
            return True
        return credentials is not None and self.users.get(credentials.username) == (
            credentials.password)


Registries = dict[str, FakeRegistry]  # by host, as in image names


@dataclass(frozen=True)
class Requested:
    """A PullImage request as FakeImages receives it (the real one gets its bytes)."""

    image: str
    credentials: Credentials | None = None
    annotations: tuple[tuple[str, str], ...] = ()


class FakeImages:
    """containerd's images, pulled from FakeRegistries."""

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self.records: dict[str, Published] = {}
        self.vouched: set[str] = set()      # names image events vouch for
        self.pulls: list[tuple[object, str | None, Credentials | None]] = []
        self.refuse_with: ContainerdRefusedPull | None = None  # the next pull fails so
        self.pull_seconds = 0.0
        self.partial: set[str] = set()      # digests with a failed download kept
        self.discarded: list[str] = []

    def known_image_id(self, name: str) -> str:
        held = self.records.get(name)
        return held.image_id if held is not None and name in self.vouched else ""

    async def held_image_id(self, name: str) -> str:
        held = self.records.get(name)
        return held.image_id if held is not None else ""

    async def target_digest(self, name: str) -> str:
        held = self.records.get(name)
        return held.digest if held is not None else ""

    async def pull(self, original: object, name: str | None = None,
                   credentials: Credentials | None = None) -> str:
        assert isinstance(original, Requested)
        self.pulls.append((original, name, credentials))
        if self.pull_seconds:
            await asyncio.sleep(self.pull_seconds)
        if self.refuse_with is not None:
            refused, self.refuse_with = self.refuse_with, None
            raise refused
        ref = parse(name or original.image)
        registry = self.registries.get(ref.domain)
        if registry is None or registry.down:
            raise ContainerdRefusedPull(Kind.UNREACHABLE, ContainerdError(
                "UNKNOWN", f"failed to do request: dial tcp {ref.domain}: connection refused"))
        if not registry.allows(credentials if name else original.credentials):
            raise ContainerdRefusedPull(Kind.UNAUTHORIZED,
                                        ContainerdError("UNKNOWN", "401 Unauthorized"))
        image = registry.images.get(str(ref))
        if image is None:
            raise ContainerdRefusedPull(Kind.NOT_FOUND,
                                        ContainerdError("NOT_FOUND", f"{ref}: not found"))
        self.records[str(ref)] = image
        if ref.tag:
            self.records[str(ref.with_digest(image.digest))] = image
        self.vouched.discard(str(ref))
        return image.image_id

    async def alias(self, source: str, names: Sequence[str]) -> None:
        held = self.records.get(source)
        if held is None:
            raise ContainerdError("NOT_FOUND", f"image {source!r}: not found")
        for name in names:
            self.records[name] = held
            self.vouched.discard(name)
        if source not in names:
            del self.records[source]

    async def wait_visible(self, name: str) -> bool:
        return name in self.records

    async def discard(self, digests: Sequence[str]) -> int:
        found = [d for d in digests if d in self.partial]
        for digest in found:
            self.partial.discard(digest)
        self.discarded.extend(digests)
        return len(found)

    def remove(self, name: str) -> None:
        self.records.pop(name, None)
        self.vouched.discard(name)


class FakeUpstream:
    """A probe answers the digest a FakeRegistry holds for a reference, or a Failure."""

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self.probes: list[tuple[str, Credentials | None]] = []

    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        self.probes.append((str(ref), credentials))
        registry = self.registries.get(ref.domain)
        if registry is None or registry.down:
            raise Failure(Kind.UNREACHABLE, f"{ref.domain}: connection refused")
        if registry.black_hole:
            await asyncio.sleep(timeout)
            raise Failure(Kind.TIMEOUT, f"no answer from {ref.domain} within probe_timeout "
                                        f"{timeout:g}s")
        if not registry.allows(credentials):
            raise Failure(Kind.UNAUTHORIZED, f"{ref.domain} refused access (401)")
        image = registry.images.get(str(ref))
        if image is None:
            raise Failure(Kind.NOT_FOUND, f"{ref.domain}: /v2/{ref.path}/manifests/"
                                          f"{ref.digest or ref.tag} not found")
        server = default_server(ref.domain)
        host = server.split("://", 1)[1]
        used = credentials if registry.users else None
        return ProbeResult(image.digest, host, authenticated=bool(registry.users),
                           source=Location(Endpoint(f"{server}/v2", host), ref.path, used))

    def default_host(self, ref: Reference) -> str:
        return default_host(ref.domain)

    def applicable(self, ref: Reference, credentials: Credentials | None
                   ) -> Credentials | None:
        if credentials is None or not credentials.server_address:
            return credentials
        host = default_server(ref.domain).split("://", 1)[1]
        return credentials if credentials.applies_to(host) else None


class FakeBacking:
    """The backing registry, itself a FakeRegistry under `host`: write-through copies an
    image from the registry it came from, and marks the repository public when asked."""

    def __init__(self, registries: Registries, host: str = "backing.test:5000",
                 prefix: str = "cache") -> None:
        self.registries = registries
        self.host = host
        self.prefix = prefix
        self.registry = registries.setdefault(host, FakeRegistry())
        self.public: set[str] = set()
        self.copies: list[tuple[str, str]] = []
        self.credentials: Credentials | None = Credentials("node", "backing-secret")
        self.down_reason = ""
        self.bad: set[tuple[str, str]] = set()
        # What the nodes share through this registry (FakeCluster): by repository and digest,
        # the lease (holder, until); by repository and tag, the last check.
        self.leases: dict[tuple[str, str], tuple[str, float]] = {}
        self.checks: dict[tuple[str, str], SharedCheck] = {}

    def repository(self, ref: Reference) -> str:
        return f"{self.prefix}/{ref.domain.replace(':', '_')}/{ref.path}"

    def name(self, ref: Reference, digest: str) -> str:
        return f"{self.host}/{self.repository(ref)}@{digest}"

    def _ref(self, ref: Reference) -> str:
        return str(Reference(self.host, self.repository(ref), ref.tag, ref.digest))

    async def holds(self, ref: Reference, digest: str) -> bool:
        if self.down_reason or (self.repository(ref), digest) in self.bad:
            return False
        return self._ref(ref.with_digest(digest)) in self.registry.images

    def mark_bad(self, ref: Reference, digest: str, detail: str) -> None:
        self.bad.add((self.repository(ref), digest))

    async def resolve_tag(self, ref: Reference) -> str:
        if self.down_reason or not ref.tag:
            return ""
        image = self.registry.images.get(self._ref(ref))
        return image.digest if image else ""

    async def is_public(self, ref: Reference) -> bool:
        return not self.down_reason and self.repository(ref) in self.public

    def write_through(self, ref: Reference, digest: str, source: Location,
                      public: bool) -> None:
        if self.down_reason or self._ref(ref.with_digest(digest)) in self.registry.images:
            return
        image = self.registries[ref.domain].images.get(str(ref.with_digest(digest)))
        if image is None:
            return  # the source lacks it: a real copy fails in the background too
        self.copies.append((str(ref), digest))
        self.registry.publish(self._ref(ref) if ref.tag else self._ref(ref.with_digest(digest)),
                              image)
        if public:
            self.public.add(self.repository(ref))


class FakeCluster:
    """One node's view of what the nodes share through a FakeBacking: the same backing
    for every node of a cluster, each with its own name."""

    def __init__(self, backing: FakeBacking, node: str, fetch_wait: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.backing = backing
        self.node = node
        self.fetch_wait = fetch_wait
        self._clock = clock
        self.claims: list[str] = []        # the digests this node claimed

    async def claim(self, ref: Reference, digest: str) -> str:
        if self.backing.down_reason:
            return ""
        self.claims.append(digest)
        key = (self.backing.repository(ref), digest)
        holder, until = self.backing.leases.get(key, ("", 0.0))
        if holder and holder != self.node and until > self._clock():
            return holder
        self.backing.leases[key] = (self.node, self._clock() + self.fetch_wait)
        return self.node

    async def await_held(self, ref: Reference, digest: str, bound: float) -> bool:
        deadline = time.monotonic() + bound
        while not await self.backing.holds(ref, digest):
            if self.backing.down_reason or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.01, bound))
        return True

    async def last_check(self, ref: Reference) -> SharedCheck | None:
        if self.backing.down_reason or not ref.tag:
            return None
        return self.backing.checks.get((self.backing.repository(ref), ref.tag))

    def share_check(self, ref: Reference, digest: str) -> None:
        if self.backing.down_reason or not ref.tag:
            return
        self.backing.checks[(self.backing.repository(ref), ref.tag)] = SharedCheck(
            digest, self._clock(), self.node)


class FakeState:
    """What a node remembers, in memory only."""

    def __init__(self, key: bytes = b"k" * 32) -> None:
        self.key = key
        self.checks: dict[str, Check] = {}
        self.access: set[tuple[str, str]] = set()
        self.decisions: list[Answer] = []
        self.stale_since: dict[str, tuple[str, float]] = {}
        self.now = 1_000_000.0

    def check(self, reference: str) -> Check | None:
        return self.checks.get(reference)

    def seen_working(self, repository: str, fingerprint: str) -> bool:
        return (repository, fingerprint) in self.access

    def record_check(self, reference: str, failure: Kind | None, digest: str = "") -> None:
        previous = self.checks.get(reference)
        if failure is None:
            self.checks[reference] = Check(self.now, "ok", self.now, digest)
        else:
            self.checks[reference] = Check(self.now, failure.value,
                                           previous.ok_at if previous else None,
                                           previous.digest if previous else "")

    def record_access(self, repository: str, fingerprint: str) -> None:
        self.access.add((repository, fingerprint))

    def record_decision(self, answer: Answer) -> None:
        self.decisions.append(answer)

    def recent(self) -> list[Answer]:
        return list(self.decisions)

    def mark_stale(self, reference: str, digest: str, kind: Kind) -> None:
        held = self.stale_since.get(reference)
        if held is None or held[0] != digest:
            self.stale_since[reference] = (digest, self.now)

    def clear_stale(self, reference: str) -> None:
        self.stale_since.pop(reference, None)

    def stale(self, reference: str) -> str:
        held = self.stale_since.get(reference)
        return held[0] if held else ""



class FakeSink:
    """Where Events are posted (kube/sink.ApiSink): records calls, keeps Events by name,
    fails or hangs on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.stored: dict[str, dict[str, Any]] = {}
        self.failures: list[PostFailed] = []
        self.hang = False
        self.closed = False

    async def prepare(self) -> None:
        pass

    async def _maybe_fail(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.failures:
            raise self.failures.pop(0)

    async def create(self, namespace: str, event: dict[str, Any]) -> None:
        self.calls.append(("create", namespace, event))
        await self._maybe_fail()
        self.stored[event["metadata"]["name"]] = dict(event)

    async def patch(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        self.calls.append(("patch", name, changes))
        await self._maybe_fail()
        if name not in self.stored:
            raise PostFailed("404 not found", retry=False, missing=True)
        self.stored[name].update(changes)

    async def close(self) -> None:
        self.closed = True

    def events(self, pod: Pod) -> list[dict[str, Any]]:
        return [event for event in self.stored.values()
                if event["involvedObject"]["uid"] == pod.uid]


class RecordingMetric:
    """Stands in for a prometheus metric with one label: what was counted, by label."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self._label = ""

    def labels(self, label: str) -> RecordingMetric:
        self._label = label
        return self

    def inc(self, amount: float = 1) -> None:
        self.counts[self._label] = self.counts.get(self._label, 0) + amount


def _edges(registries: Registries
           ) -> tuple[Images, Upstream, BackingStore, Cluster, StateStore, Sink]:
    """Never called: mypy checks here that each fake is what its edge asks for."""
    return (FakeImages(registries), FakeUpstream(registries), FakeBacking(registries),
            FakeCluster(FakeBacking(registries), "node-a"), FakeState(), FakeSink())
