"""The edges of the PullImage core: what the puller needs from the world, as Protocols,
and every value that crosses them (defined in `values`, re-exported here).

    Images        containerd's images (containerd.Containerd)
    Upstream      the registry a reference names (registry.Prober)
    BackingStore  the cluster-wide backing registry (registry.Backing)
    Cluster       what the nodes share through it: leases on fetches, checks of tags
                  (registry.Cluster)
    StateStore    what this node remembers (state.State)
    Observer      who hears of answers the pod's owner should see (kube.Events)
    Sink          where kube.Events posts them (kube.ApiSink)

Each has an in-memory fake in tests/fakes.py (Observer: tests/unit/test_puller.py), and a
conformance suite in tests/conformance.py that the fake and the real implementation both
pass. This module imports no implementation: adapters import from it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import (
    Answer,
    Check,
    Decision,
    Endpoint,
    Location,
    NodeCopy,
    Pod,
    ProbeResult,
    SharedCheck,
)

__all__ = [
    "Answer",
    "BackingStore",
    "Check",
    "Cluster",
    "Decision",
    "Endpoint",
    "Images",
    "Location",
    "NodeCopy",
    "Observer",
    "Pod",
    "ProbeResult",
    "SharedCheck",
    "Sink",
    "StateStore",
    "Upstream",
]


class Images(Protocol):
    def known_image_id(self, reference: str) -> str:
        """The image ID held under `reference` as vouched for without asking ('' : ask)."""

    async def held_image_id(self, reference: str) -> str:
        """The image ID held under `reference` ('' when none)."""

    async def target_digest(self, reference: str) -> str:
        """The manifest or index digest `reference` points at ('' when no such image)."""

    async def pull(self, original: object, reference: str | None = None,
                   credentials: Credentials | None = None) -> str:
        """Pull as `original` (the PullImage request as it came, opaque to the core) asks,
        or `reference` instead with `credentials` instead; return the image ID. Raises
        errors.ContainerdRefusedPull when containerd refuses."""

    async def alias(self, source: str, references: Sequence[str]) -> None:
        """Record `references` for what `source` points at, as if pulled under them; then
        drop `source`."""

    async def wait_visible(self, reference: str) -> bool:
        """Wait (briefly) until `reference` answers ImageStatus; False if it never did."""

    async def discard(self, digests: Sequence[str]) -> int:
        """Drop what failed downloads of `digests` left behind, so that the next pull
        fetches their bytes afresh; how many were dropped."""


class Upstream(Protocol):
    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        """The digest `ref` names upstream now; failures.Failure otherwise. At most
        `timeout` seconds."""

    def applicable(self, ref: Reference, credentials: Credentials | None
                   ) -> Credentials | None:
        """`credentials` if containerd would use them for `ref`'s registry, else None."""

    def default_host(self, ref: Reference) -> str:
        """The host containerd asks for `ref`'s registry unless a hosts.toml says
        otherwise (docker.io: registry-1.docker.io)."""


class BackingStore(Protocol):
    @property
    def credentials(self) -> Credentials | None: ...

    @property
    def down_reason(self) -> str: ...

    def name(self, ref: Reference, digest: str) -> str:
        """containerd's reference for backing's copy of `digest`."""

    async def holds(self, ref: Reference, digest: str) -> bool: ...

    async def resolve_tag(self, ref: Reference) -> str:
        """The digest backing holds under `ref`'s tag ('' when none or unknown)."""

    async def is_public(self, ref: Reference) -> bool: ...

    def write_through(self, ref: Reference, digest: str, source: Location,
                      public: bool) -> None:
        """Copy `digest` to backing in the background, unless it is there."""

    def mark_bad(self, ref: Reference, digest: str, detail: str) -> None:
        """Backing served content for `digest` that does not match it: do not pull it from
        backing for a while, and check it at the next write-through."""


class Cluster(Protocol):
    """What the nodes of a cluster share through the backing registry. Every call is
    bounded (by backing's timeout, or the bound given) and never raises."""

    @property
    def node(self) -> str:
        """This node's name, as its leases and checks carry it."""

    @property
    def fetch_wait(self) -> float:
        """The longest a pull waits for another node's fetch (0: no leases)."""

    async def claim(self, ref: Reference, digest: str) -> str:
        """Claim the lease on fetching `digest` upstream, unless another node holds a live
        one; return the holder afterwards: `node` when this node won, another node's name,
        or '' when backing could not be asked."""

    async def await_held(self, ref: Reference, digest: str, bound: float) -> bool:
        """Wait until backing holds `digest` (its manifest: the last thing a copy
        writes), at most `bound` seconds; whether it does."""

    async def last_check(self, ref: Reference) -> SharedCheck | None:
        """The cluster's last successful check of `ref`'s tag (None: none, or unknown)."""

    def share_check(self, ref: Reference, digest: str) -> None:
        """Record in the background that upstream named `digest` for `ref`'s tag now."""


class StateStore(Protocol):
    @property
    def key(self) -> bytes:
        """The node-local key of credential fingerprints."""

    def check(self, reference: str) -> Check | None: ...

    def seen_working(self, repository: str, fingerprint: str) -> bool: ...

    def record_check(self, reference: str, failure: Kind | None, digest: str = "") -> None:
        """A check upstream: it succeeded (`failure` None; upstream named `digest`) or
        failed so; a failure leaves the last success standing. Check.result reads "ok" or
        the kind's value."""

    def record_access(self, repository: str, fingerprint: str) -> None: ...

    def record_decision(self, answer: Answer) -> None: ...

    def recent(self) -> list[Answer]:
        """The answers recorded most recently, oldest first."""

    def mark_stale(self, reference: str, digest: str, kind: Kind) -> None:
        """`reference` was answered with `digest` though upstream did not confirm it."""

    def clear_stale(self, reference: str) -> None:
        """Upstream confirmed what `reference` is answered with."""

    def stale(self, reference: str) -> str:
        """The digest `reference` is answered with while upstream has not confirmed it
        ('' when upstream confirmed what it is answered with)."""


class Observer(Protocol):
    def observe(self, answer: Answer) -> None:
        """Never waits, never raises."""


class Sink(Protocol):
    """Where Events on pods are posted: core/v1 Event bodies by namespace. Failures are
    errors.PostFailed, saying whether trying again may work."""

    async def prepare(self) -> None: ...

    async def create(self, namespace: str, event: dict[str, Any]) -> None:
        """Post a new Event (one already there under its name counts as posted)."""

    async def patch(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        """Change an Event posted before; PostFailed(missing=True) when it is gone."""

    async def close(self) -> None: ...
