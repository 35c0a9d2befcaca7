"""Where a copy reads manifests and blobs: a registry, or the node's own content store.

    Source          a Protocol: a manifest by digest, a blob by digest (streamed)
    RegistrySource  GETs from one repository on a registry, as containerd pulls
    NodeSource      containerd's content store on this node; for what it lacks (the other
                    platforms of an index, content garbage-collected since), another
                    Source, digest by digest

A copy to backing made right after a pull reads from the node what the pull just stored,
so the upstream registry serves each digest to a node once, not once more for the copy.

No source checks what it hands out: the copier hashes every manifest and every blob, from
whichever source, and cuts a blob off before its last byte when it does not match.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import httpx

from nodekeeper.errors import ContainerdError, ContainerdUnavailable
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.values import Endpoint, Location
from nodekeeper.registry.probe import ACCEPT
from nodekeeper.registry.session import Session
from nodekeeper.registry.wire import read_body

NODE = "the node's content store"


@dataclass(frozen=True)
class Fetched:
    """A manifest's bytes, unchecked, and its media type as the source knows it ('' when
    it does not: the manifest's own mediaType field has to say)."""

    body: bytes
    media_type: str
    local: bool  # read from the node's content store


@dataclass(frozen=True)
class Opened:
    """A blob being read: its bytes as they come (unchecked), and where from."""

    chunks: AsyncIterator[bytes]
    where: str
    local: bool


class Source(Protocol):
    def __str__(self) -> str: ...

    async def manifest(self, digest: str, limit: int, media_type: str) -> Fetched:
        """Manifest or index `digest`, at most `limit` bytes (Failure(invalid) beyond);
        Failure(not_found) when the source lacks it. `media_type` is what the index
        naming it says ('' for the top of a copy)."""

    def blob(self, digest: str, size: int) -> AbstractAsyncContextManager[Opened]:
        """Blob `digest` of `size` bytes, open while the context lasts; Failure(not_found)
        on entering when the source lacks it."""


class NodeContent(Protocol):
    """containerd's content store in nodekeeper's namespace (containerd.Containerd)."""

    async def content_size(self, digest: str) -> int | None:
        """The size of `digest` in the content store; None when it is not there."""

    def read_content(self, digest: str) -> AsyncGenerator[bytes, None]:
        """Its bytes, streamed; errors.ContainerdError when the read fails."""


class RegistrySource:
    def __init__(self, session: Session, location: Location) -> None:
        self.session = session
        self.location = location

    def __str__(self) -> str:
        return str(self.location)

    async def _get(self, path: str, headers: dict[str, str]) -> httpx.Response:
        where = self.location
        return await self.session.request(
            "GET", where.endpoint, f"{where.base}/{path}", creds=where.credentials,
            scope=pull_scope(where.repository), params=namespace(where.endpoint),
            headers=headers, stream=True)

    async def manifest(self, digest: str, limit: int, media_type: str) -> Fetched:
        response = await self._get(f"manifests/{digest}", {"Accept": ACCEPT})
        body = await read_body(response, limit, f"{self}@{digest}")  # closes it
        served = response.headers.get("content-type", "").split(";", 1)[0].strip()
        return Fetched(body, served, local=False)

    @contextlib.asynccontextmanager
    async def blob(self, digest: str, size: int) -> AsyncIterator[Opened]:
        response = await self._get(f"blobs/{digest}", {"Accept-Encoding": "identity"})
        try:
            check_blob_response(response, digest, size, str(self))
            yield Opened(response.aiter_bytes(), str(self), local=False)  # identity: checked
        finally:
            await response.aclose()


class NodeSource:
    def __init__(self, content: NodeContent, fallback: Source) -> None:
        self.content = content
        self.fallback = fallback

    def __str__(self) -> str:
        return f"{NODE} (else {self.fallback})"

    async def manifest(self, digest: str, limit: int, media_type: str) -> Fetched:
        size = await self._size(digest)
        if size is None:
            return await self.fallback.manifest(digest, limit, media_type)
        if size > limit:
            raise Failure(Kind.INVALID, f"{NODE}: {digest}: larger than {limit} bytes")
        body = b"".join([chunk async for chunk in self._chunks(digest)])
        if not media_type and not _declared_type(body):
            # Only a registry's Content-Type can say what it is: ask the fallback (one
            # small GET), rather than guess a media type for backing to store.
            return await self.fallback.manifest(digest, limit, media_type)
        return Fetched(body, media_type, local=True)

    @contextlib.asynccontextmanager
    async def blob(self, digest: str, size: int) -> AsyncIterator[Opened]:
        if await self._size(digest) is None:
            async with self.fallback.blob(digest, size) as opened:
                yield opened
            return
        chunks = self._chunks(digest)
        try:
            yield Opened(chunks, NODE, local=True)
        finally:
            await chunks.aclose()

    async def _size(self, digest: str) -> int | None:
        try:
            return await self.content.content_size(digest)
        except ContainerdError as exc:
            raise _failure(exc, digest) from None

    async def _chunks(self, digest: str) -> AsyncGenerator[bytes, None]:
        stream = self.content.read_content(digest)
        try:
            async for chunk in stream:
                yield chunk
        except ContainerdError as exc:
            raise _failure(exc, digest) from None
        finally:
            await stream.aclose()


def _failure(exc: ContainerdError, digest: str) -> Failure:
    kind = Kind.UNREACHABLE if isinstance(exc, ContainerdUnavailable) else Kind.SERVER_ERROR
    return Failure(kind, f"{NODE}: reading {digest}: {exc.code} {exc.message[:200]}")


def _declared_type(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    declared = document.get("mediaType") if isinstance(document, dict) else None
    return declared if isinstance(declared, str) else ""


def check_blob_response(response: httpx.Response, digest: str, size: int, where: str) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise Failure(Kind.INVALID, f"{where} served blob {digest} with "
                                       f"Content-Encoding {encoding}")
    length = response.headers.get("content-length")
    if length is not None and length.strip() != str(size):
        raise Failure(Kind.INVALID, f"{where} served blob {digest} as {length} bytes, "
                                       f"its manifest says {size}")


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def namespace(endpoint: Endpoint) -> dict[str, str] | None:
    return {"ns": endpoint.namespace} if endpoint.namespace else None
