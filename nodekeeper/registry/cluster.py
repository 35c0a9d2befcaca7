"""What the nodes of a cluster share through the backing registry: no server of its own,
no database, only tags in the image's backing repository (docs/operations.md).

- Leases: `nodekeeper.lease-<first 32 hex of the digest>` names the node fetching that
  digest upstream to feed backing, and until when (its clock). A node that needs a digest
  backing lacks reads the lease; when another node holds a live one it waits (bounded by
  `fetch_wait`) for backing to hold the digest's manifest, which a copy writes last.
  Otherwise it writes a lease of its own and, twice the write's round trip later (50 to
  150 ms), reads it back: the registry has no compare-and-set, the last writer wins, and
  two nodes that both read themselves back both fetch (one fetch more, never a wrong
  image: containerd checks every digest).
- Checks: `nodekeeper.check-<tag>` (`nodekeeper.check--<sha256 of the tag>` when too
  long for a tag) carries the digest upstream named for the tag, when and by which node.
  Written in the background after each successful probe (at most every SHARE_EVERY per
  tag and digest); read with one request bounded by backing's timeout.

Both are tiny OCI indexes naming no manifest, the facts in their annotations: writing one
takes one PUT and no blob. Every call is bounded and never raises: a failure answers as if
nothing were shared, so the pull goes upstream as it would without backing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nodekeeper import logs, metrics
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import Location, SharedCheck
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.probe import ACCEPT
from nodekeeper.registry.session import Session
from nodekeeper.registry.wire import valid_digest

LEASE_PREFIX = "nodekeeper.lease-"
CHECK_PREFIX = "nodekeeper.check-"
# Between writing a lease and reading it back: twice the write's round trip, within these.
SETTLE_MIN, SETTLE_MAX = 0.05, 0.15
# A waiting node asks whether backing holds the digest again after a tenth of the time it
# has waited so far, within these: the pull learns of the copy at most about 10% late, and
# a long wait costs backing a few HEADs a second, not twenty.
POLL_MIN, POLL_MAX, POLL_SHARE = 0.05, 1.0, 0.1
SHARE_EVERY = 5.0            # one shared check per tag and digest at most this often
_MAX_TAG = 128
_INDEX = "application/vnd.oci.image.index.v1+json"
_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LEASE_NODE, _LEASE_UNTIL = "dev.nodekeeper.lease.node", "dev.nodekeeper.lease.until"
_CHECK_NODE, _CHECK_AT = "dev.nodekeeper.check.node", "dev.nodekeeper.check.at"
_CHECK_DIGEST = "dev.nodekeeper.check.digest"

_log = logs.get("cluster")
T = TypeVar("T")


def lease_tag(digest: str) -> str:
    return LEASE_PREFIX + digest.partition(":")[2][:32]


def check_tag(tag: str) -> str:
    """The tag of the shared check of `tag`. A tag never starts with '-', so the hashed
    form of a long tag cannot be taken by a short one."""
    if len(CHECK_PREFIX) + len(tag) <= _MAX_TAG:
        return CHECK_PREFIX + tag
    return CHECK_PREFIX + "-" + hashlib.sha256(tag.encode()).hexdigest()


def poll_gap(waited: float) -> float:
    """Seconds until a node that has waited `waited` seconds asks backing again."""
    return min(max(POLL_SHARE * waited, POLL_MIN), POLL_MAX)


def marker(annotations: dict[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": _INDEX, "manifests": [],
                       "annotations": annotations},
                      separators=(",", ":"), sort_keys=True).encode()


class Cluster:
    def __init__(self, backing: Backing, session: Session, node: str,
                 fetch_wait: float, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._backing = backing
        self._session = session
        self.node = node
        self.fetch_wait = fetch_wait
        self._clock = clock
        self._monotonic = monotonic
        self._timeout = backing.config.timeout
        self._shared: dict[tuple[str, str, str], float] = {}  # (repo, tag, digest) -> when
        self._tasks: set[asyncio.Task[None]] = set()

    # -- leases --------------------------------------------------------------------------

    async def claim(self, ref: Reference, digest: str) -> str:
        holder = await self._claim(ref, digest)
        metrics.LEASES.labels("failed" if not holder else "won" if holder == self.node
                              else "elsewhere").inc()
        return holder

    async def _claim(self, ref: Reference, digest: str) -> str:
        if self._backing.down_reason:
            return ""
        tag = lease_tag(digest)
        held = await self._bounded(self._annotations(ref, tag), "read a lease")
        if held is None:
            return ""
        holder = self._live_holder(held)
        if holder and holder != self.node:
            return holder
        until = self._clock() + self.fetch_wait
        lease = marker({_LEASE_NODE: self.node, _LEASE_UNTIL: f"{until:.3f}"})
        started = self._monotonic()
        if not await self._bounded(self._put(ref, tag, lease), "write a lease"):
            return ""
        # No compare-and-set: whoever wrote last holds the lease. Nodes that found no lease
        # at about the same moment write within about one round trip of each other;
        # reading back once their writes have landed gives them all the same last writer.
        await asyncio.sleep(min(max(2 * (self._monotonic() - started), SETTLE_MIN),
                                SETTLE_MAX))
        held = await self._bounded(self._annotations(ref, tag), "read a lease back")
        return (self._live_holder(held) or self.node) if held is not None else ""

    def _live_holder(self, annotations: dict[str, str]) -> str:
        node = annotations.get(_LEASE_NODE, "")
        until = _number(annotations.get(_LEASE_UNTIL, ""))
        if not _NODE.match(node) or until is None or until <= self._clock():
            return ""
        return node

    async def await_held(self, ref: Reference, digest: str, bound: float) -> bool:
        started = self._monotonic()
        deadline = started + bound

        async def poll() -> bool:
            while True:
                if await self._backing.holds(ref, digest):
                    return True
                now = self._monotonic()
                left = deadline - now
                if self._backing.down_reason or left <= 0:
                    return False
                await asyncio.sleep(min(poll_gap(now - started), left))

        try:
            arrived = await asyncio.wait_for(poll(), max(bound, 0.0))
        except asyncio.TimeoutError:
            arrived = False
        metrics.LEASES.labels("arrived" if arrived else "gave_up").inc()
        return arrived

    # -- checks --------------------------------------------------------------------------

    async def last_check(self, ref: Reference) -> SharedCheck | None:
        if not ref.tag or self._backing.down_reason:
            return None
        found = await self._bounded(self._annotations(ref, check_tag(ref.tag)),
                                    "read the cluster's check")
        if not found:
            return None
        digest, node = found.get(_CHECK_DIGEST, ""), found.get(_CHECK_NODE, "")
        at = _number(found.get(_CHECK_AT, ""))
        if not valid_digest(digest) or not _NODE.match(node) or at is None:
            return None
        return SharedCheck(digest, at, node)

    def share_check(self, ref: Reference, digest: str) -> None:
        if not ref.tag or self._backing.down_reason or not self._backing.config.write:
            return
        now = self._clock()
        key = (self._backing.repository(ref), ref.tag, digest)
        if now - self._shared.get(key, -math.inf) < SHARE_EVERY:
            return
        self._shared = {k: at for k, at in self._shared.items() if now - at < SHARE_EVERY}
        self._shared[key] = now
        check = marker({_CHECK_DIGEST: digest, _CHECK_NODE: self.node,
                        _CHECK_AT: f"{now:.3f}"})
        task = asyncio.create_task(self._share(ref, check_tag(ref.tag), check))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _share(self, ref: Reference, tag: str, check: bytes) -> None:
        await self._bounded(self._put(ref, tag, check), "share a check")

    # -- the wire --------------------------------------------------------------------------

    def _location(self, ref: Reference) -> Location:
        backing = self._backing
        return Location(backing.endpoint, backing.repository(ref), backing.credentials)

    async def _annotations(self, ref: Reference, tag: str) -> dict[str, str]:
        """The annotations of the marker under `tag` ({} when there is none)."""
        where = self._location(ref)
        try:
            response = await self._session.request(
                "GET", where.endpoint, f"{where.base}/manifests/{tag}",
                creds=where.credentials, scope=f"repository:{where.repository}:pull",
                headers={"Accept": ACCEPT})
        except Failure as failure:
            if failure.kind is Kind.NOT_FOUND:
                return {}
            raise
        try:
            found = json.loads(response.content).get("annotations") or {}
        except (ValueError, AttributeError):
            return {}
        if not isinstance(found, dict):
            return {}
        return {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, str)}

    async def _put(self, ref: Reference, tag: str, manifest: bytes) -> bool:
        where = self._location(ref)
        await self._session.request(
            "PUT", where.endpoint, f"{where.base}/manifests/{tag}", creds=where.credentials,
            scope=f"repository:{where.repository}:pull,push", content=manifest,
            headers={"Content-Type": _INDEX})
        return True

    async def _bounded(self, call: Awaitable[T], what: str) -> T | None:
        try:
            return await asyncio.wait_for(call, self._timeout)
        except Exception as exc:  # a failure shares nothing; the pull goes on without
            _log.info(f"could not {what} in the backing registry",
                      backing=self._backing.host, error=str(exc) or type(exc).__name__)
            return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
