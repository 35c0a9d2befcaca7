"""The cluster-wide backing registry: a copy of every image any node pulled.

Images live at `<backing>/<prefix>/<source registry>/<repository>`, digests unchanged.

- Write-through: a digest a node obtained upstream and backing lacks is copied there in
  the background; the kubelet's pull never waits for it. Given the node's content store
  (`node`), the copy reads what the pull just stored from there, and asks upstream only
  for what the node lacks (an index's other platforms): upstream serves each digest to a
  node once. Without it, the copy reads everything from upstream again.
- Read: containerd pulls from backing when backing holds the digest a pull needs, or when
  upstream fails and the node has no copy (subject to the rule below).
- Anonymous marker: when the copying node found the repository pullable without
  credentials, it tags a tiny marker manifest `nodekeeper.public` beside the image. Other
  nodes, which cannot check a pod's credentials while upstream is down, fall back to
  backing only for repositories carrying that marker, or where the policy rule says
  `backing_private_fallback: allow`.
- Isolation: every call on the pull path is bounded by `timeout`. A failure marks backing
  down for DOWN_SECONDS, logged once; meanwhile pulls go straight upstream.
- Integrity: when containerd finds that backing's bytes for a digest do not match it,
  that (repository, digest) is not pulled from backing on this node for BAD_SECONDS,
  logged once, and the next write-through of it checks every manifest and blob that
  backing holds for it. Content a registry already holds cannot be overwritten through
  its API (distribution keeps the first bytes it stored under a digest), so a check that
  still finds bad content says what the registry's operator has to remove.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from nodekeeper import logs, metrics
from nodekeeper.config import BackingConfig
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import Endpoint, Location
from nodekeeper.registry import Session
from nodekeeper.registry.copy import Copier
from nodekeeper.registry.probe import ACCEPT
from nodekeeper.registry.sources import NodeContent, NodeSource, RegistrySource, Source
from nodekeeper.registry.wire import classify, valid_digest

PUBLIC_TAG = "nodekeeper.public"
DOWN_SECONDS = 30.0
BAD_SECONDS = 600.0
MOUNT_CANDIDATES = 3
_EMPTY = b"{}"
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(_EMPTY).hexdigest()
_MARKER = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": _EMPTY_DIGEST, "size": len(_EMPTY)},
    "layers": [],
    "annotations": {"dev.nodekeeper.public": "true"},
}, separators=(",", ":"), sort_keys=True).encode()

_log = logs.get("backing")


class Backing:
    def __init__(self, config: BackingConfig, session: Session, copier: Copier,
                 on_health: Callable[[str], None] = lambda _: None,
                 clock: Callable[[], float] = time.monotonic,
                 node: NodeContent | None = None) -> None:
        self.config = config
        self._node = node
        self._on_health = on_health
        self.host = urlsplit(config.url).netloc
        self.endpoint = Endpoint(base=f"{config.url}/v2", host=self.host,
                                 ca=(config.ca,) if config.ca else ())
        self.credentials = config.credentials
        self._session = session
        self._copier = copier
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_concurrent_copies)
        self._known: set[tuple[str, str]] = set()   # (repository, digest) seen in backing
        # Repositories this node filled lately: images share base layers, so a blob missing
        # in one repository is often in these, and backing can mount it without a copy.
        self._recent: collections.deque[str] = collections.deque(maxlen=MOUNT_CANDIDATES)
        self._copying: set[tuple[str, str]] = set()
        # (repository, digest) backing served bad bytes for: until when it is not used.
        self._bad: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self.down_reason = ""

    # -- naming ----------------------------------------------------------------------------

    def repository(self, ref: Reference) -> str:
        # A registry host may carry a port, and ':' (like uppercase) is not allowed in a
        # repository path. DNS names never contain '_', so the mapping cannot collide.
        source = ref.domain.lower().replace(":", "_")
        return "/".join(part for part in (self.config.prefix, source, ref.path) if part)

    def name(self, ref: Reference, digest: str) -> str:
        """containerd's reference for backing's copy of `digest`."""
        return f"{self.host}/{self.repository(ref)}@{digest}"

    def _location(self, ref: Reference) -> Location:
        return Location(self.endpoint, self.repository(ref), self.credentials)

    # -- the pull path: bounded, never raises ---------------------------------------------

    async def holds(self, ref: Reference, digest: str) -> bool:
        if not self.config.read or self._down():
            return False
        key = (self.repository(ref), digest)
        if self._is_bad(key):
            return False
        if key in self._known:
            return True
        found = await self._bounded(self._copier.has_manifest(self._location(ref), digest))
        if found:
            self._known.add(key)
        return bool(found)

    async def resolve_tag(self, ref: Reference) -> str:
        """The digest backing holds under `ref`'s tag ('' when none or unknown)."""
        if not self.config.read or self._down() or not ref.tag:
            return ""
        response = await self._bounded(self._head(ref, ref.tag))
        digest = response.get("docker-content-digest", "") if response else ""
        return digest if valid_digest(digest) else ""

    async def is_public(self, ref: Reference) -> bool:
        """Did a node that copied this repository find it pullable without credentials?"""
        if self._down():
            return False
        return bool(await self._bounded(self._head(ref, PUBLIC_TAG)))

    async def _head(self, ref: Reference, tag: str) -> dict[str, str]:
        url = f"{self.endpoint.base}/{self.repository(ref)}/manifests/{tag}"
        try:
            response = await self._session.request(
                "HEAD", self.endpoint, url, creds=self.credentials,
                scope=f"repository:{self.repository(ref)}:pull", headers={"Accept": ACCEPT})
        except Failure as exc:
            if exc.kind is Kind.NOT_FOUND:
                return {}
            raise
        return dict(response.headers)

    async def _bounded(self, call: Any) -> Any:
        try:
            answer = await asyncio.wait_for(call, self.config.timeout)
        except asyncio.TimeoutError:
            self._mark_down(f"no answer within {self.config.timeout:g}s")
            return None
        except Exception as exc:  # classify: a Failure, or whatever else went wrong
            self._mark_down(str(classify(exc, self.host)))
            return None
        self._mark_up()
        metrics.BACKING_READS.labels("ok").inc()
        return answer

    def _down(self) -> bool:
        return self._clock() < self._down_until

    def _mark_down(self, reason: str) -> None:
        metrics.BACKING_READS.labels("failed").inc()
        if not self.down_reason:
            _log.warning("backing registry unavailable; pulls use upstream only",
                         backing=self.host, reason=reason, retry_after_s=DOWN_SECONDS)
            metrics.BACKING_UP.set(0)
            self._on_health(f"down: {reason}")
        self.down_reason = reason
        self._down_until = self._clock() + DOWN_SECONDS

    def _mark_up(self) -> None:
        if self.down_reason:
            _log.info("backing registry available again", backing=self.host)
            self._on_health("up")
        self.down_reason = ""
        metrics.BACKING_UP.set(1)

    # -- integrity -----------------------------------------------------------------------

    def mark_bad(self, ref: Reference, digest: str, detail: str) -> None:
        key = (self.repository(ref), digest)
        self._known.discard(key)
        metrics.BACKING_CORRUPT.inc()
        if not self._is_bad(key):
            _log.error("backing served content that does not match its digest; this node "
                       "pulls it from upstream instead for a while", backing=self.host,
                       repository=key[0], digest=digest, error=detail,
                       retry_after_s=BAD_SECONDS)
        self._bad[key] = self._clock() + BAD_SECONDS

    def _is_bad(self, key: tuple[str, str]) -> bool:
        until = self._bad.get(key)
        if until is not None and self._clock() >= until:
            del self._bad[key]
            return False
        return until is not None

    async def _check(self, dest: Location, digest: str, key: tuple[str, str],
                     fields: dict[str, str]) -> None:
        """After a copy of a digest once found bad: is what backing holds right now?"""
        wrong = await self._copier.check(dest, digest)
        if not wrong:
            self._bad.pop(key, None)
            _log.info("backing's copy checked and correct again", **fields)
            return
        self._bad[key] = self._clock() + BAD_SECONDS
        _log.error("backing still holds content that does not match its digest; remove it "
                   "from backing's storage (for distribution: delete the blobs and run its "
                   "garbage collector), nodekeeper cannot overwrite it", **fields,
                   wrong=wrong)

    # -- write-through: in the background --------------------------------------------------

    def write_through(self, ref: Reference, digest: str, source: Location,
                      public: bool) -> None:
        """Copy `digest` (obtained from `source`) to backing unless it is there already:
        from the node's content store, and from `source` what the node lacks."""
        key = (self.repository(ref), digest)
        if not self.config.write or key in self._copying:
            return
        if key in self._known and not self._is_bad(key):
            return
        if self._down():
            return  # during an outage; the first pull of this image after it copies it
        self._copying.add(key)
        task = asyncio.create_task(self._copy(ref, digest, source, public, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _source(self, upstream: Location) -> Source:
        registry = RegistrySource(self._session, upstream)
        return registry if self._node is None else NodeSource(self._node, registry)

    async def _copy(self, ref: Reference, digest: str, upstream: Location, public: bool,
                    key: tuple[str, str]) -> None:
        dest = self._location(ref)
        source = self._source(upstream)
        fields = {"image": str(ref), "digest": digest, "backing": f"{self.host}/{dest.repository}"}
        try:
            async with self._slots:
                if self._is_bad(key):
                    # Fill in what may be missing, then look at every byte backing holds.
                    await asyncio.wait_for(self._copy_and_check(source, dest, ref, digest,
                                                                key, fields),
                                           self.config.copy_timeout)
                    return
                if await self._copier.has_manifest(dest, digest):
                    self._known.add(key)
                    metrics.COPIES.labels("skipped").inc()
                    _log.debug("backing holds it already; not copied", **fields)
                    if public:
                        await self._mark_public(dest)
                    return
                metrics.COPIES.labels("started").inc()
                started = self._clock()
                candidates = [repo for repo in self._recent if repo != dest.repository]
                report = await asyncio.wait_for(
                    self._copier.copy(source, dest, digest, ref.tag or None, candidates),
                    self.config.copy_timeout)
                if public:
                    await self._mark_public(dest)
            self._known.add(key)
            if dest.repository in self._recent:
                self._recent.remove(dest.repository)
            self._recent.appendleft(dest.repository)
            metrics.COPIES.labels("finished").inc()
            metrics.COPY_BYTES.inc(report.bytes_copied)
            metrics.UPSTREAM_SAVED_BYTES.inc(report.bytes_from_node)
            _log.info("copied to backing", **fields, bytes=report.bytes_copied,
                      bytes_from_node=report.bytes_from_node,
                      bytes_from_upstream=report.bytes_copied - report.bytes_from_node,
                      blobs_copied=report.blobs_copied, blobs_skipped=report.blobs_skipped,
                      blobs_mounted=report.blobs_mounted, public=public,
                      seconds=round(self._clock() - started, 3))
        except Exception as exc:
            if not isinstance(exc, asyncio.TimeoutError):
                exc = classify(exc, self.host)
            metrics.COPIES.labels("failed").inc()
            _log.warning("copy to backing failed; the next pull of this image retries it",
                         **fields, error=str(exc) or "copy_timeout")
        finally:
            self._copying.discard(key)

    async def _copy_and_check(self, source: Source, dest: Location, ref: Reference,
                              digest: str, key: tuple[str, str],
                              fields: dict[str, str]) -> None:
        await self._copier.copy(source, dest, digest, ref.tag or None)
        await self._check(dest, digest, key, fields)

    async def _mark_public(self, dest: Location) -> None:
        scope = f"repository:{dest.repository}:pull,push"
        base = f"{self.endpoint.base}/{dest.repository}"
        await self._copier.push_blob(dest, _EMPTY)
        await self._session.request(
            "PUT", self.endpoint, f"{base}/manifests/{PUBLIC_TAG}", creds=self.credentials,
            scope=scope, content=_MARKER,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})

    async def close(self) -> None:
        """Stop copies in flight; the next pull of each image completes it."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
