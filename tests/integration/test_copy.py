"""Copying images between two real distribution 2.8 registries: a multi-platform index
byte for byte, copying again, cross-repository mounts, interrupted copies, a large blob
with flat memory, and authenticated backing registries (htpasswd and token)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.registry import Copier, Endpoint, Location, Session
from tests.conftest import MakeRegistry
from tests.harness import (
    FaultProxy,
    Index,
    Registry,
    TokenServer,
    build_image,
    multi_platform,
    push,
    resolve,
)
from tests.harness.oci import MANIFEST_ACCEPT

pytestmark = pytest.mark.integration

PLATFORMS = (("linux", "amd64"), ("linux", "arm64"), ("linux", "s390x"))
USER, PASSWORD = "nodekeeper", "backing-secret"


def at(url: str, host: str, repository: str, creds: Credentials | None = None) -> Location:
    return Location(Endpoint(f"{url}/v2", host), repository, creds)


def backing_repo(upstream: Registry, path: str) -> str:
    # ':' is not allowed in a repository name (distribution answers 404 "page not found"):
    # the port is joined with '_' instead.
    return f"cache/127.0.0.1_{upstream.port}/{path}"


def blobs_of(index: Index) -> set[str]:
    return {digest for image in index.images for digest in image.blobs}


def present(registry: Registry, repo: str, digests: set[str],
            auth: tuple[str, str] | None = None) -> set[str]:
    with httpx.Client(base_url=registry.url, auth=auth) as client:
        return {d for d in digests
                if client.head(f"/v2/{repo}/blobs/{d}").status_code == 200}


def manifest_bytes(registry: Registry, repo: str, reference: str,
                   auth: tuple[str, str] | None = None) -> bytes:
    response = httpx.get(f"{registry.url}/v2/{repo}/manifests/{reference}",
                         headers={"Accept": MANIFEST_ACCEPT}, auth=auth)
    assert response.status_code == 200, response.text
    return response.content


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    session = Session()
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
def copier(session: Session) -> Copier:
    return Copier(session)


@pytest.fixture
def upstream(make_registry: MakeRegistry) -> Registry:
    return make_registry()


@pytest.fixture
def backing(make_registry: MakeRegistry) -> Registry:
    return make_registry()


@pytest.fixture
def app(upstream: Registry) -> Index:
    index = multi_platform(seed="copy", platforms=PLATFORMS)
    push(upstream.url, "library/app", "v1", index)
    return index


@pytest.fixture
def proxy(backing: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(backing.url) as proxy:
        yield proxy


def source_of(upstream: Registry) -> Location:
    return at(upstream.url, upstream.host, "library/app")


# -- the whole image, byte for byte ---------------------------------------------------------


async def test_index_copied_byte_for_byte(upstream: Registry, backing: Registry,
                                          copier: Copier, app: Index) -> None:
    repo = backing_repo(upstream, "library/app")
    dest = at(backing.url, backing.host, repo)
    assert not await copier.has_manifest(dest, app.digest)

    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert report.manifests == 4
    assert report.blobs_copied == len(blobs_of(app)) == 6
    assert report.blobs_skipped == report.blobs_mounted == 0
    assert report.bytes_copied == sum(len(b) for i in app.images for b in i.blobs.values())
    assert await copier.has_manifest(dest, app.digest)
    assert resolve(backing.url, repo, app.digest) == app.digest
    assert manifest_bytes(backing, repo, app.digest) == manifest_bytes(
        upstream, "library/app", app.digest)
    for image in app.images:
        assert resolve(backing.url, repo, image.digest) == image.digest
        assert manifest_bytes(backing, repo, image.digest) == image.manifest
    assert present(backing, repo, blobs_of(app)) == blobs_of(app)
    assert resolve(backing.url, repo, "v1") == app.digest


async def test_copying_again_moves_no_blob(upstream: Registry, backing: Registry,
                                           copier: Copier, app: Index) -> None:
    dest = at(backing.url, backing.host, "cache/app")
    await copier.copy(source_of(upstream), dest, app.digest, "v1")
    upstream.clear_requests()

    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert report.blobs_skipped == 6
    assert (report.blobs_copied, report.blobs_mounted, report.bytes_copied) == (0, 0, 0)
    assert upstream.requests("GET", "/blobs/") == []


async def test_port_colon_is_not_a_repository_name(upstream: Registry, backing: Registry,
                                                   copier: Copier, app: Index) -> None:
    dest = at(backing.url, backing.host, f"cache/{upstream.host}/library/app")
    with pytest.raises(Failure) as failure:
        await copier.copy(source_of(upstream), dest, app.digest)
    assert failure.value.kind is Kind.NOT_FOUND  # the route does not match: "404 page not found"


# -- cross-repository mounts ----------------------------------------------------------------


async def test_mount_from_another_backing_repository(upstream: Registry, backing: Registry,
                                                     copier: Copier, app: Index) -> None:
    first = at(backing.url, backing.host, "cache/first/app")
    await copier.copy(source_of(upstream), first, app.digest, "v1")
    upstream.clear_requests()

    second = at(backing.url, backing.host, "cache/second/app")
    report = await copier.copy(source_of(upstream), second, app.digest, "v1",
                               mount_from=["cache/first/app"])

    assert report.blobs_mounted == 6
    assert (report.blobs_copied, report.bytes_copied) == (0, 0)
    assert upstream.requests("GET", "/blobs/") == []
    assert resolve(backing.url, "cache/second/app", "v1") == app.digest
    assert present(backing, "cache/second/app", blobs_of(app)) == blobs_of(app)


async def test_mount_from_a_repository_without_the_blobs(upstream: Registry, backing: Registry,
                                                         copier: Copier, app: Index) -> None:
    dest = at(backing.url, backing.host, "cache/app")
    report = await copier.copy(source_of(upstream), dest, app.digest, "v1",
                               mount_from=["cache/nothing-here"])

    assert (report.blobs_mounted, report.blobs_copied) == (0, 6)
    # Each refused mount opened the upload that was then used: one POST per blob.
    assert len(backing.requests("POST", "/blobs/uploads/", status=202)) == 6
    assert resolve(backing.url, "cache/app", "v1") == app.digest


# -- interrupted copies ---------------------------------------------------------------------


async def test_failed_blob_upload_then_copy_again(upstream: Registry, backing: Registry,
                                                  proxy: FaultProxy, copier: Copier,
                                                  app: Index) -> None:
    dest = at(proxy.url, proxy.host, "cache/app")
    proxy.respond(500, path_contains="/blobs/uploads/", method="PUT", times=1)
    with pytest.raises(Failure) as failure:
        await copier.copy(source_of(upstream), dest, app.digest, "v1")
    assert failure.value.kind is Kind.SERVER_ERROR
    assert resolve(backing.url, "cache/app", "v1") is None
    done = present(backing, "cache/app", blobs_of(app))

    proxy.passthrough()
    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert report.blobs_skipped == len(done)
    assert report.blobs_copied == 6 - len(done)
    assert resolve(backing.url, "cache/app", "v1") == app.digest


async def test_dropped_upload_then_copy_again(upstream: Registry, backing: Registry,
                                              proxy: FaultProxy, copier: Copier,
                                              app: Index) -> None:
    """One upload hangs while the others finish, then its connection drops."""
    dest = at(proxy.url, proxy.host, "cache/app")
    proxy.hang(path_contains="/blobs/uploads/", method="PUT", times=1)
    copying = asyncio.create_task(copier.copy(source_of(upstream), dest, app.digest, "v1"))
    for _ in range(200):
        if len(backing.requests("PUT", "/blobs/uploads/", status=201)) == 5:
            break
        await asyncio.sleep(0.05)
    assert not copying.done()
    proxy.passthrough()  # drops the hung request's connection
    with pytest.raises(Failure) as failure:
        await asyncio.wait_for(copying, 10)
    assert failure.value.kind is Kind.UNREACHABLE
    assert len(present(backing, "cache/app", blobs_of(app))) == 5

    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert (report.blobs_skipped, report.blobs_copied) == (5, 1)
    assert resolve(backing.url, "cache/app", "v1") == app.digest


async def test_failed_index_put_then_copy_again(upstream: Registry, backing: Registry,
                                                proxy: FaultProxy, copier: Copier,
                                                app: Index) -> None:
    dest = at(proxy.url, proxy.host, "cache/app")
    proxy.respond(500, path_contains=f"/manifests/{app.digest}", method="PUT", times=1)
    with pytest.raises(Failure):
        await copier.copy(source_of(upstream), dest, app.digest, "v1")
    assert resolve(backing.url, "cache/app", "v1") is None

    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert (report.blobs_skipped, report.blobs_copied, report.bytes_copied) == (6, 0, 0)
    assert resolve(backing.url, "cache/app", "v1") == app.digest


async def test_concurrent_copies_of_one_image(upstream: Registry, backing: Registry) -> None:
    """Four nodes (four sessions) copying the same image at once, five times over: all
    succeed, although distribution answers some of them 400 or 500 while another writes
    the same links (see copy.RACE_ATTEMPTS)."""
    sessions = [Session() for _ in range(4)]
    try:
        for round_ in range(5):
            index = multi_platform(seed=f"race{round_}", platforms=PLATFORMS)
            push(upstream.url, "library/app", "v1", index)
            repo = f"cache/race{round_}/app"
            dest = at(backing.url, backing.host, repo)
            reports = await asyncio.gather(*(
                Copier(s).copy(source_of(upstream), dest, index.digest, "v1")
                for s in sessions))
            for report in reports:
                assert report.blobs_copied + report.blobs_skipped == 6
            assert resolve(backing.url, repo, "v1") == index.digest
            assert present(backing, repo, blobs_of(index)) == blobs_of(index)
    finally:
        for s in sessions:
            await s.close()


# -- a large blob ---------------------------------------------------------------------------


async def test_large_layer_streams_with_flat_memory(upstream: Registry, backing: Registry,
                                                    copier: Copier) -> None:
    image = build_image({"data": os.urandom(20 * 1024 * 1024)}, seed="big")
    push(upstream.url, "library/big", "v1", image)
    layer = image.layer_digests[0]
    size = len(image.blobs[layer])
    assert size > 20 * 1024 * 1024  # random bytes do not compress

    tracemalloc.start()
    try:
        report = await copier.copy(at(upstream.url, upstream.host, "library/big"),
                                   at(backing.url, backing.host, "cache/big"), image.digest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert report.bytes_copied == size + len(image.config)
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while copying a {size}-byte blob"
    hasher = hashlib.sha256()
    with httpx.stream("GET", f"{backing.url}/v2/cache/big/blobs/{layer}") as response:
        for chunk in response.iter_bytes():
            hasher.update(chunk)
    assert f"sha256:{hasher.hexdigest()}" == layer


# -- authenticated backing ------------------------------------------------------------------


async def test_backing_with_htpasswd(upstream: Registry, make_registry: MakeRegistry,
                                     copier: Copier, app: Index) -> None:
    backing = make_registry(htpasswd={USER: PASSWORD})
    creds = Credentials(username=USER, password=PASSWORD)
    dest = at(backing.url, backing.host, "cache/app", creds)

    report = await copier.copy(source_of(upstream), dest, app.digest, "v1")

    assert report.blobs_copied == 6
    assert resolve(backing.url, "cache/app", "v1", auth=(USER, PASSWORD)) == app.digest
    mounted = await copier.copy(source_of(upstream), at(backing.url, backing.host,
                                                        "cache/other", creds),
                                app.digest, "v1", mount_from=["cache/app"])
    assert mounted.blobs_mounted == 6
    wrong = at(backing.url, backing.host, "cache/app", Credentials(USER, "wrong"))
    with pytest.raises(Failure) as failure:
        await copier.has_manifest(wrong, app.digest)
    assert failure.value.kind is Kind.UNAUTHORIZED


async def test_backing_with_token_auth(upstream: Registry, make_registry: MakeRegistry,
                                       copier: Copier, app: Index, tmp_path: Path) -> None:
    tokens = TokenServer({USER: PASSWORD}, base_dir=tmp_path / "token")
    tokens.start()
    try:
        backing = make_registry(token_auth=tokens)
        creds = Credentials(username=USER, password=PASSWORD)
        first = at(backing.url, backing.host, "cache/app", creds)
        report = await copier.copy(source_of(upstream), first, app.digest, "v1")
        assert report.blobs_copied == 6

        second = at(backing.url, backing.host, "cache/other", creds)
        mounted = await copier.copy(source_of(upstream), second, app.digest, "v1",
                                    mount_from=["cache/app"])
        assert (mounted.blobs_mounted, mounted.blobs_copied) == (6, 0)
        assert await copier.has_manifest(second, app.digest)
        # The mount's token named both repositories.
        assert any("repository:cache/app:pull" in r.scopes for r in tokens.requests())
    finally:
        tokens.close()
