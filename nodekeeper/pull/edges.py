"""The edges of the PullImage core: what the puller needs from the world, as Protocols.

    Images        containerd's images (containerd.Containerd)
    Upstream      the registry a reference names (registry.Prober)
    BackingStore  the cluster-wide backing registry (backing.Backing)
    StateStore    what this node remembers (state.State)
    Observer      who hears of answers the pod's owner should see (events.Events)

The first four each have an in-memory fake in tests/fakes.py, and a conformance suite in
tests/conformance.py that the fake and the real implementation both pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nodekeeper.kube.events import Served
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.reference import Reference
from nodekeeper.registry.copy import Location
from nodekeeper.registry.probe import ProbeResult
from nodekeeper.state.memory import Check, PullRecord


class Images(Protocol):
    def known_image_id(self, name: str) -> str:
        """The image ID held under `name` as vouched for without asking ('' : ask)."""

    async def held_image_id(self, name: str) -> str:
        """The image ID held under `name` ('' when none)."""

    async def target_digest(self, name: str) -> str:
        """The manifest or index digest `name` points at ('' when no such image)."""

    async def pull(self, original: object, name: str | None = None,
                   credentials: Credentials | None = None) -> str:
        """Pull as `original` (the PullImage request as it came, opaque to the core) asks,
        or `name` instead with `credentials` instead; return the image ID. Raises
        errors.PullRefused when containerd refuses."""

    async def alias(self, source: str, names: Sequence[str]) -> None:
        """Record `names` for what `source` points at, as if pulled under them; then drop
        `source`."""

    async def wait_visible(self, name: str) -> bool:
        """Wait (briefly) until `name` answers ImageStatus; False if it never did."""

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


class StateStore(Protocol):
    @property
    def key(self) -> bytes:
        """The node-local key of credential fingerprints."""

    def check(self, reference: str) -> Check | None: ...

    def seen_working(self, repository: str, fingerprint: str) -> bool: ...

    def record_check(self, reference: str, result: str, digest: str = "") -> None: ...

    def record_access(self, repository: str, fingerprint: str) -> None: ...

    def record_decision(self, record: PullRecord) -> None: ...

    def mark_stale(self, reference: str, digest: str, kind: str) -> None:
        """`reference` was answered with `digest` though upstream did not confirm it."""

    def clear_stale(self, reference: str) -> None:
        """Upstream confirmed what `reference` is answered with."""


class Observer(Protocol):
    def observe(self, served: Served) -> None:
        """Never waits, never raises."""
