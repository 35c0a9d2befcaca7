"""Copying an image to a registry, digests unchanged.

`Copier.copy(source, dest, digest, tag)`: `source` is a registry repository (a Location)
or any sources.Source, such as the node's content store backed by upstream (NodeSource).

1. Read the manifest or index `digest` from source (from a registry: GET with every
   manifest type in Accept) and check its hash: the bytes are copied as read, never
   re-serialized.
2. For an index, read every child the same way (all platforms; nested indexes too). A
   child the source lacks fails the copy, naming the child.
3. Copy every blob the manifests name (configs and layers), `parallel_blobs` at a time:
       HEAD in dest         present: skipped
       mount                POST …/blobs/uploads/?mount=&from= for each `mount_from`
                            repository: 201 mounted; 202 the upload it opened is used
       upload               read source, POST …/blobs/uploads/, then PUT dest?digest=
                            from the read, streamed in chunks and hashed on the way: a blob
                            that does not match its digest or size is cut off before its
                            last byte. Memory stays flat whatever the blob's size.
4. PUT every manifest by digest, children before their index (distribution 2.8 refuses
   an index naming manifests it lacks), with the media type it was served with.
5. PUT the top manifest under `tag`, last: a tag never names a partial image.

Every step is idempotent: an interrupted copy is completed by calling copy() again (it
skips what dest holds), and two nodes copying one digest at once write the same bytes
under the same names (distribution's glitches meanwhile are retried: RACE_ATTEMPTS).
Every failure is a failures.Failure with one Kind: registry/wire.py's `classify` turns
whatever an exchange raised into one, at each public method here.

Authorization: a streamed PUT cannot be answered again after a 401, so it goes out under
the same scope string as the POST that opened its upload just before, whose challenge
Session answered and cached. Session caches a token under our scope string but fetches
it for the challenge's scope, so each scope string here is used only for requests whose
challenge asks the same access (distribution: GET/HEAD pull; POST/PUT pull,push; DELETE
delete; a mount adds pull on its source): a pull-only token never lands under the key a
PUT relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass
from typing import Any

import httpx

from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.values import Location
from nodekeeper.registry.probe import ACCEPT
from nodekeeper.registry.session import Session
from nodekeeper.registry.sources import RegistrySource, Source, namespace, pull_scope
from nodekeeper.registry.wire import MAX_MANIFEST_BYTES, classify, valid_digest

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
IMAGE_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
# Layers that registries do not hold: whoever pulls fetches them from their `urls`.
FOREIGN_LAYER_TYPES = frozenset({
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
MAX_MANIFESTS = 256       # per copy: an index and its children
MAX_DEPTH = 4             # indexes inside indexes
# distribution 2.8 (filesystem storage) rewrites a blob's or manifest's link file on every
# upload or PUT, not atomically. While another node writes the same blob or manifest, a
# HEAD may read the link half-written and answer 500 ("invalid checksum digest format"),
# and an index PUT 400 (digest invalid, manifest blob unknown). Measured with four
# concurrent copies of one image; a short random pause and a retry clear it.
RACE_ATTEMPTS = 3
RACE_PAUSE = (0.05, 0.3)


@dataclass
class CopyReport:
    manifests: int = 0       # manifests and indexes PUT by digest (the tag not counted)
    blobs_copied: int = 0    # streamed from source
    blobs_skipped: int = 0   # dest had them
    blobs_mounted: int = 0   # cross-repository mounts
    bytes_copied: int = 0    # blob bytes streamed
    blobs_from_node: int = 0  # of blobs_copied, read from the node's content store
    bytes_from_node: int = 0  # of bytes_copied, the same


@dataclass(frozen=True)
class _Blob:
    """A descriptor: of a blob, or of an index's child manifest."""

    digest: str
    size: int
    media_type: str = ""


@dataclass(frozen=True)
class _Manifest:
    digest: str
    media_type: str
    body: bytes
    blobs: tuple[_Blob, ...]


class Copier:
    def __init__(self, session: Session, parallel_blobs: int = 4) -> None:
        # Each blob in flight holds a connection to source and one to dest: keep
        # parallel_blobs at most the Session's per_host.
        if parallel_blobs < 1:
            raise ValueError("parallel_blobs must be at least 1")
        self._session = session
        self._parallel = parallel_blobs

    async def has_manifest(self, where: Location, digest: str) -> bool:
        """Whether `where` holds the manifest or index `digest` (Failure on failure)."""
        try:
            return await self._has_manifest(where, digest)
        except Exception as exc:
            raise classify(exc, str(where)) from None

    async def _has_manifest(self, where: Location, digest: str) -> bool:
        _check_digest(digest)
        try:
            await _racing(lambda: self._session.request(
                "HEAD", where.endpoint, f"{where.base}/manifests/{digest}",
                creds=where.credentials, scope=pull_scope(where.repository),
                params=namespace(where.endpoint), headers={"Accept": ACCEPT}), Kind.SERVER_ERROR)
        except Failure as failure:
            if failure.kind is Kind.NOT_FOUND:
                return False
            raise
        return True

    async def copy(self, source: Location | Source, dest: Location, digest: str,
                   tag: str | None = None, mount_from: Sequence[str] = ()) -> CopyReport:
        """Copy the manifest or index `digest`, with everything it references, then tag it."""
        if isinstance(source, Location):
            source = RegistrySource(self._session, source)
        try:
            return await self._copy(source, dest, digest, tag, mount_from)
        except Exception as exc:
            raise classify(exc, f"copying {digest} from {source} to {dest}") from None

    async def _copy(self, source: Source, dest: Location, digest: str, tag: str | None,
                    mount_from: Sequence[str]) -> CopyReport:
        _check_digest(digest)
        job = _Copy(self._session, source, dest, asyncio.Semaphore(self._parallel),
                    [repo for repo in dict.fromkeys(mount_from) if repo != dest.repository])
        manifests: list[_Manifest] = []
        await job.fetch(digest, "", 0, manifests, set())
        blobs = {blob.digest: blob for m in manifests for blob in m.blobs}
        await _all([job.copy_blob(blob) for blob in blobs.values()])
        for manifest in manifests:  # children first: fetch() appends in post-order
            await job.put_manifest(manifest, manifest.digest)
            job.report.manifests += 1
        if tag:
            await job.put_manifest(manifests[-1], tag)
        return job.report

    async def check(self, where: Location, digest: str) -> list[str]:
        """The digests of manifests and blobs under `digest` whose bytes in `where` are not
        what their digest says ([] when all are right). Reads every byte, streamed."""
        try:
            return await self._check(where, digest)
        except Exception as exc:
            raise classify(exc, str(where)) from None

    async def _check(self, where: Location, digest: str) -> list[str]:
        _check_digest(digest)
        job = _Copy(self._session, RegistrySource(self._session, where), where,
                    asyncio.Semaphore(self._parallel), [])
        manifests: list[_Manifest] = []
        try:
            await job.fetch(digest, "", 0, manifests, set())
        except Failure as failure:
            if failure.kind is not Kind.INVALID:
                raise
            return [digest]  # a manifest with other bytes: its blobs cannot be known
        blobs = {blob.digest: blob for m in manifests for blob in m.blobs}
        wrong = await asyncio.gather(*(job.blob_is_wrong(blob) for blob in blobs.values()))
        return [blob for blob, bad in zip(blobs, wrong, strict=True) if bad]

    async def push_blob(self, where: Location, data: bytes) -> str:
        """Store `data` as a blob in `where` unless it is there; returns its digest."""
        try:
            return await self._push_blob(where, data)
        except Exception as exc:
            raise classify(exc, str(where)) from None

    async def _push_blob(self, where: Location, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        job = _Copy(self._session, RegistrySource(self._session, where), where,
                    asyncio.Semaphore(1), [])
        if not await job.blob_exists(digest):
            url, scope = await job.start_upload(_Blob(digest, len(data)))
            await job.finish_upload(url, scope, _Blob(digest, len(data)), data)
        return digest


class _Copy:
    """One copy() call: its source and destination, blob slots and report."""

    def __init__(self, session: Session, source: Source, dest: Location,
                 slots: asyncio.Semaphore, mount_from: list[str]) -> None:
        self.session = session
        self.source = source
        self.dest = dest
        self.slots = slots
        self.mount_from = mount_from
        self.report = CopyReport()
        self.manifest_bytes = 0
        self.push_scope = _push(dest.repository)

    # -- manifests -------------------------------------------------------------------------

    async def fetch(self, digest: str, parent: str, depth: int, out: list[_Manifest],
                    seen: set[str], media_type: str = "") -> None:
        """Append `digest` and, for an index, its children (first) to `out`. `media_type`:
        what the index naming it says."""
        if digest in seen:
            return
        if len(seen) >= MAX_MANIFESTS or depth > MAX_DEPTH:
            raise Failure(Kind.INVALID, f"{self.source}@{parent}: more than {MAX_MANIFESTS} "
                                           f"manifests or {MAX_DEPTH} nested indexes")
        seen.add(digest)
        manifest, children = await self._get_manifest(digest, parent, media_type)
        for child in children:
            await self.fetch(child.digest, digest, depth + 1, out, seen, child.media_type)
        out.append(manifest)

    async def _get_manifest(self, digest: str, parent: str,
                            media_type: str) -> tuple[_Manifest, list[_Blob]]:
        # Each manifest at most MAX_MANIFEST_BYTES, and an index with its children at most
        # four times that.
        budget = min(MAX_MANIFEST_BYTES, 4 * MAX_MANIFEST_BYTES - self.manifest_bytes)
        try:
            fetched = await self.source.manifest(digest, budget, media_type)
        except Failure as failure:
            if failure.kind is Kind.NOT_FOUND and parent:
                raise Failure(Kind.NOT_FOUND, f"{self.source} lacks manifest {digest}, "
                                                 f"listed in index {parent}") from None
            raise
        body = fetched.body
        self.manifest_bytes += len(body)
        if _hash(digest, body) != digest:
            raise Failure(Kind.INVALID, f"{self.source} served manifest {digest} with "
                                           "other content")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise Failure(Kind.INVALID, f"{self.source}@{digest} is not a JSON object")
        declared = document.get("mediaType")
        media_type = declared if isinstance(declared, str) and declared else fetched.media_type
        where = f"{self.source}@{digest}"
        if media_type in INDEX_TYPES:
            children = _descriptors(document, "manifests", where)
            return _Manifest(digest, media_type, body, ()), children
        if media_type not in IMAGE_TYPES:
            raise Failure(Kind.INVALID, f"{where} has unsupported media type {media_type!r}")
        config = _descriptors({"c": [document.get("config")]}, "c", where)
        layers = _descriptors(document, "layers", where, skip_foreign=True)
        return _Manifest(digest, media_type, body, (*config, *layers)), []

    async def put_manifest(self, manifest: _Manifest, reference: str) -> None:
        response = await _racing(lambda: self.session.request(
            "PUT", self.dest.endpoint, f"{self.dest.base}/manifests/{reference}",
            creds=self.dest.credentials, scope=self.push_scope,
            headers={"Content-Type": manifest.media_type}, content=manifest.body), Kind.INVALID)
        stored = response.headers.get("docker-content-digest", manifest.digest)
        if stored != manifest.digest:
            raise Failure(Kind.INVALID, f"{self.dest} stored {manifest.digest} as {stored}")

    # -- blobs -----------------------------------------------------------------------------

    async def copy_blob(self, blob: _Blob) -> None:
        async with self.slots:
            if await self.blob_exists(blob.digest):
                self.report.blobs_skipped += 1
                return
            mounted, upload = await self._mount(blob)
            if mounted:
                self.report.blobs_mounted += 1
                return
            local = await self._transfer(blob, upload)
            self.report.blobs_copied += 1
            self.report.bytes_copied += blob.size
            if local:
                self.report.blobs_from_node += 1
                self.report.bytes_from_node += blob.size

    async def blob_is_wrong(self, blob: _Blob) -> bool:
        """Whether the source serves other bytes than `blob`'s (missing counts as right:
        a copy fills it in)."""
        async with self.slots:
            try:
                async with self.source.blob(blob.digest, blob.size) as opened:
                    async for _ in _verified(opened.chunks, blob, opened.where):
                        pass
            except Failure as failure:
                if failure.kind is Kind.NOT_FOUND:
                    return False
                if failure.kind is not Kind.INVALID:
                    raise
                return True
            return False

    async def blob_exists(self, digest: str) -> bool:
        try:
            await _racing(lambda: self.session.request(
                "HEAD", self.dest.endpoint, f"{self.dest.base}/blobs/{digest}",
                creds=self.dest.credentials, scope=pull_scope(self.dest.repository)),
                Kind.SERVER_ERROR)
        except Failure as failure:
            if failure.kind is Kind.NOT_FOUND:
                return False
            raise
        return True

    async def _mount(self, blob: _Blob) -> tuple[bool, tuple[httpx.URL, str] | None]:
        """(True, None) when mounted; else the upload the last refused mount opened, if any
        (a mount that fails opens an ordinary upload: it is used, not left behind)."""
        for number, repository in enumerate(self.mount_from, 1):
            scope = f"{self.push_scope} {pull_scope(repository)}"
            try:
                response = await self.session.request(
                    "POST", self.dest.endpoint, f"{self.dest.base}/blobs/uploads/",
                    creds=self.dest.credentials, scope=scope,
                    params={"mount": blob.digest, "from": repository})
            except Failure as failure:
                # No access to that repository, or no mounting here: upload instead.
                if failure.kind in (Kind.UNAUTHORIZED, Kind.NOT_FOUND, Kind.INVALID):
                    continue
                raise
            if response.status_code == 201:
                return True, None
            upload = self._upload_url(response)
            if number == len(self.mount_from):
                return False, (upload, scope)
            await self._cancel(upload)  # the next candidate opens its own
        return False, None

    async def start_upload(self, blob: _Blob) -> tuple[httpx.URL, str]:
        response = await self.session.request(
            "POST", self.dest.endpoint, f"{self.dest.base}/blobs/uploads/",
            creds=self.dest.credentials, scope=self.push_scope)
        if response.status_code != 202:
            raise Failure(Kind.INVALID, f"{self.dest} answered {response.status_code} to "
                                           f"an upload of {blob.digest}")
        return self._upload_url(response), self.push_scope

    def _upload_url(self, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise Failure(Kind.INVALID, f"{self.dest} opened an upload without a Location")
        url = response.url.join(location)
        base = httpx.URL(self.dest.endpoint.base)
        # Our Authorization header goes with it: never to another origin.
        if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port):
            raise Failure(Kind.INVALID, f"{self.dest} sent its upload to another host "
                                           f"{url.host}")
        return url

    async def _transfer(self, blob: _Blob, upload: tuple[httpx.URL, str] | None) -> bool:
        """Stream the blob from source into `upload`, or into an upload opened here.
        Whether it came from the node's content store."""
        try:
            async with self.source.blob(blob.digest, blob.size) as opened:
                body = _verified(opened.chunks, blob, opened.where)
                try:
                    # Opened once the source answers, so the authorization its POST leaves
                    # cached is as fresh as can be for the PUT.
                    upload = upload or await self.start_upload(blob)
                    await self.finish_upload(*upload, blob, body)
                finally:
                    await body.aclose()
                return opened.local
        except Failure:
            if upload is not None:
                await self._cancel(upload[0])
            raise

    async def finish_upload(self, upload: httpx.URL, scope: str, blob: _Blob,
                            body: bytes | AsyncIterable[bytes]) -> None:
        """Complete an upload in one PUT (existing query parameters, e.g. _state, kept)."""
        response = await self.session.request(
            "PUT", self.dest.endpoint, str(upload.copy_merge_params({"digest": blob.digest})),
            creds=self.dest.credentials, scope=scope, content=body,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(blob.size)})
        if response.status_code != 201:
            raise Failure(Kind.INVALID, f"{self.dest} answered {response.status_code} to "
                                           f"the upload of {blob.digest}")

    async def _cancel(self, upload: httpx.URL) -> None:
        """Best effort: the registry purges abandoned uploads itself eventually."""
        with contextlib.suppress(Failure):
            await self.session.request("DELETE", self.dest.endpoint, str(upload),
                                       creds=self.dest.credentials,
                                       scope=f"repository:{self.dest.repository}:delete")


async def _verified(chunks: AsyncIterator[bytes], blob: _Blob,
                    where: str) -> AsyncGenerator[bytes, None]:
    """The blob's bytes as they arrive; fails before the last byte if they are not the blob."""
    algorithm, _, expected = blob.digest.partition(":")
    hasher = hashlib.new(algorithm)
    remaining = blob.size
    try:
        async for chunk in chunks:
            remaining -= len(chunk)
            if remaining < 0:
                raise Failure(Kind.INVALID, f"{where}: blob {blob.digest} is longer than "
                                               f"its {blob.size} bytes")
            hasher.update(chunk)
            if remaining == 0 and hasher.hexdigest() != expected:
                raise Failure(Kind.INVALID, f"{where}: blob {blob.digest} does not match "
                                               "its digest")
            yield chunk
    except Failure:
        raise
    except Exception as exc:
        raise classify(exc, f"{where}: reading blob {blob.digest}") from None
    if remaining:
        raise Failure(Kind.INVALID, f"{where}: blob {blob.digest} ended {remaining} bytes "
                                       "short")
    if blob.size == 0 and hasher.hexdigest() != expected:
        raise Failure(Kind.INVALID, f"{where}: blob {blob.digest} does not match its digest")


def _descriptors(document: dict[str, Any], key: str, where: str,
                 skip_foreign: bool = False) -> list[_Blob]:
    entries = document.get(key)
    if not isinstance(entries, list):
        raise Failure(Kind.INVALID, f"{where}: {key!r} is not a list")
    found = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise Failure(Kind.INVALID, f"{where}: a descriptor in {key!r} is not an object")
        digest, size = entry.get("digest"), entry.get("size")
        if (not isinstance(digest, str) or not valid_digest(digest)
                or not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise Failure(Kind.INVALID, f"{where}: bad descriptor {str(entry)[:200]}")
        if skip_foreign and entry.get("urls") and entry.get("mediaType") in FOREIGN_LAYER_TYPES:
            continue
        media_type = entry.get("mediaType")
        found.append(_Blob(digest, size, media_type if isinstance(media_type, str) else ""))
    return found


def _check_digest(digest: str) -> None:
    if not valid_digest(digest):
        raise Failure(Kind.INVALID, f"{digest!r} is not a sha256 or sha512 digest")


def _hash(digest: str, data: bytes) -> str:
    algorithm = digest.partition(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _push(repository: str) -> str:
    return f"repository:{repository}:pull,push"



async def _racing(call: Callable[[], Awaitable[httpx.Response]],
                  kind: Kind) -> httpx.Response:
    """call(), again after a pause when it fails with `kind` (see RACE_ATTEMPTS)."""
    for _ in range(RACE_ATTEMPTS - 1):
        try:
            return await call()
        except Failure as failure:
            if failure.kind != kind:
                raise
        await asyncio.sleep(random.uniform(*RACE_PAUSE))
    return await call()


async def _all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run them all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure
