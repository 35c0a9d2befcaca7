"""Copying images between registries, against an in-process fake registry
(httpx.MockTransport): skips, mounts, uploads, digest checks, ordering, Location handling
and authorization of streamed uploads; and copying from the node's content store (an
in-memory stand-in) with the registry for what the node lacks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from nodekeeper.errors import ContainerdError
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.registry import Copier, CopyReport, Endpoint, Location, Session
from nodekeeper.registry import copy as registry_copy
from nodekeeper.registry.sources import NodeSource, RegistrySource
from tests.harness.oci import DOCKER_MANIFEST, Image, Index, build_image, build_index

SOURCE = "source.test"
DEST = "dest.test"
USER, PASSWORD = "alice", "s3cret"
_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs/uploads|blobs)(?:/(?P<ref>.*))?$")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """A registry keeping manifests per repository and blobs per repository.

    location: "relative", "absolute" or "elsewhere" (another host) upload URLs, each with
    a _state parameter.
    auth: "" (open), "basic" (USER/PASSWORD) or "bearer": tokens from its realm carry the
    scopes asked for, and each request needs distribution's access for its method (GET and
    HEAD pull, POST and PUT pull+push, DELETE delete, a mount also pull on its source),
    which the challenge names.
    """

    host: str
    location: str = "relative"
    auth: str = ""
    tamper: dict[str, bytes] = field(default_factory=dict)  # blob digest -> served instead
    blob_delay: float = 0.0
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)  # upload id -> repository
    requests: list[httpx.Request] = field(default_factory=list)
    challenged: list[httpx.Request] = field(default_factory=list)
    # (method, path substring, status): answered once each instead of the real thing
    glitches: list[tuple[str, str, int]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def add_image(self, repo: str, image: Image | Index, tag: str | None = None) -> None:
        images = image.images if isinstance(image, Index) else (image,)
        for child in images:
            for digest, data in child.blobs.items():
                self.blobs[repo, digest] = data
            self.manifests[repo, child.digest] = (child.media_type, child.manifest)
        self.manifests[repo, image.digest] = (image.media_type, image.manifest)
        if tag:
            self.manifests[repo, tag] = (image.media_type, image.manifest)

    def seen(self, method: str, contains: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and contains in r.url.path]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        refused = self._refuse(request)
        if refused is not None:
            return refused
        for glitch in self.glitches:
            if request.method == glitch[0] and glitch[1] in request.url.path:
                self.glitches.remove(glitch)
                return httpx.Response(glitch[2])
        match = _PATH.match(request.url.path)
        if match is None:
            return httpx.Response(404)
        name, kind, ref = match["name"], match["kind"], match["ref"] or ""
        if kind == "manifests":
            return self._manifest(request, name, ref)
        if kind == "blobs":
            return await self._blob(request, name, ref)
        return self._upload(request, name, ref)

    def _refuse(self, request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "auth.test":
            scopes = " ".join(request.url.params.get_list("scope"))
            return httpx.Response(200, json={"token": f"granted {scopes}", "expires_in": 300})
        given = request.headers.get("authorization", "")
        if self.auth == "basic" and given != basic(USER, PASSWORD):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth != "bearer":
            return None
        match = _PATH.match(request.url.path)
        name = match["name"] if match else ""
        action = {"GET": "pull", "HEAD": "pull", "DELETE": "delete"}.get(request.method,
                                                                          "pull,push")
        needed = [f"repository:{name}:{action}"]
        if request.url.params.get("from"):
            needed.append(f"repository:{request.url.params['from']}:pull")
        granted = set(given.removeprefix("Bearer granted ").split(" "))
        if given.startswith("Bearer granted ") and not set(needed) - granted:
            return None
        self.challenged.append(request)
        challenge = (f'Bearer realm="https://auth.test/token",service="fake",'
                     f'scope="{" ".join(needed)}"')
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    def _manifest(self, request: httpx.Request, name: str, ref: str) -> httpx.Response:
        if request.method == "PUT":
            body = request.content
            self.manifests[name, ref] = (request.headers["content-type"], body)
            if ref.startswith("sha256:"):
                assert ref == sha(body)
            return httpx.Response(201, headers={"Docker-Content-Digest": sha(body)})
        found = self.manifests.get((name, ref))
        if found is None:
            return httpx.Response(404)
        media_type, body = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha(body)}
        return httpx.Response(200, headers=headers,
                              content=body if request.method == "GET" else b"")

    async def _blob(self, request: httpx.Request, name: str, digest: str) -> httpx.Response:
        data = self.blobs.get((name, digest))
        if data is None:
            return httpx.Response(404)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data))})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.blob_delay)
        finally:
            self.in_flight -= 1
        served = self.tamper.get(digest, data)
        return httpx.Response(200, content=served, headers={"Content-Length": str(len(data))})

    def _upload(self, request: httpx.Request, name: str, upload: str) -> httpx.Response:
        if request.method == "POST":
            mount, source = request.url.params.get("mount"), request.url.params.get("from")
            if mount and source and (source, mount) in self.blobs:
                self.blobs[name, mount] = self.blobs[source, mount]
                return httpx.Response(201, headers={"Location": f"/v2/{name}/blobs/{mount}"})
            upload = f"u{len(self.uploads)}"
            self.uploads[upload] = name
            path = f"/v2/{name}/blobs/uploads/{upload}?_state=s{upload}"
            if self.location != "relative":
                host = self.host if self.location == "absolute" else "elsewhere.test"
                path = f"https://{host}{path}"
            return httpx.Response(202, headers={"Location": path})
        if self.uploads.get(upload) != name or request.url.params.get("_state") != f"s{upload}":
            return httpx.Response(404)
        del self.uploads[upload]
        if request.method == "DELETE":
            return httpx.Response(204)
        digest = request.url.params["digest"]
        data = request.content
        assert request.headers["content-length"] == str(len(data))
        if sha(data) != digest:
            return httpx.Response(400)
        self.blobs[name, digest] = data
        return httpx.Response(201, headers={"Docker-Content-Digest": digest})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class World:
    source: FakeRegistry
    dest: FakeRegistry
    copier: Copier

    def src(self, repo: str = "library/app") -> Location:
        return Location(Endpoint(f"https://{SOURCE}/v2", SOURCE), repo, None)

    def dst(self, repo: str = "cache/app", creds: Credentials | None = None) -> Location:
        return Location(Endpoint(f"https://{DEST}/v2", DEST), repo, creds)


MakeWorld = Callable[..., World]


@pytest.fixture(autouse=True)
def short_race_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause before retrying a write race is a setting of distribution's timing, not
    of what is tested here."""
    monkeypatch.setattr(registry_copy, "RACE_PAUSE", (0.001, 0.002))


@pytest.fixture
async def make_world() -> AsyncIterator[MakeWorld]:
    sessions: list[Session] = []

    def make(parallel_blobs: int = 4, **dest_options: Any) -> World:
        source, dest = FakeRegistry(SOURCE), FakeRegistry(DEST, **dest_options)

        async def route(request: httpx.Request) -> httpx.Response:
            if request.url.host == SOURCE:
                return await source(request)
            return await dest(request)

        session = Session(transport=httpx.MockTransport(route))
        sessions.append(session)
        return World(source, dest, Copier(session, parallel_blobs=parallel_blobs))

    yield make
    for session in sessions:
        await session.close()


def three_platforms() -> Index:
    return build_index([build_image(seed="u", platform=("linux", arch), layers=2)
                        for arch in ("amd64", "arm64", "s390x")])


# -- single manifests ----------------------------------------------------------------------


async def test_copies_blobs_then_manifest_by_digest(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a", layers=2)
    world.source.add_image("library/app", image)

    report = await world.copier.copy(world.src(), world.dst(), image.digest)

    assert report == CopyReport(manifests=1, blobs_copied=3,
                                bytes_copied=sum(len(b) for b in image.blobs.values()))
    for digest, data in image.blobs.items():
        assert world.dest.blobs["cache/app", digest] == data
    assert world.dest.manifests["cache/app", image.digest] == (image.media_type, image.manifest)
    last = world.dest.requests[-1]
    assert (last.method, last.url.path) == ("PUT", f"/v2/cache/app/manifests/{image.digest}")


async def test_present_blobs_are_skipped(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    world.dest.blobs["cache/app", image.config_digest] = image.config

    report = await world.copier.copy(world.src(), world.dst(), image.digest)

    assert (report.blobs_skipped, report.blobs_copied) == (1, 1)
    assert report.bytes_copied == len(image.blobs[image.layer_digests[0]])
    assert not world.source.seen("GET", f"/blobs/{image.config_digest}")


async def test_copying_again_skips_everything(make_world: MakeWorld) -> None:
    world = make_world()
    index = three_platforms()
    world.source.add_image("library/app", index)
    await world.copier.copy(world.src(), world.dst(), index.digest, "v1")
    world.source.requests.clear()

    report = await world.copier.copy(world.src(), world.dst(), index.digest, "v1")

    assert report == CopyReport(manifests=4, blobs_skipped=9)
    assert not world.source.seen("GET", "/blobs/")


@pytest.mark.parametrize("served_type", ["", DOCKER_MANIFEST])
async def test_media_type_is_preserved(make_world: MakeWorld, served_type: str) -> None:
    """From the manifest's mediaType field, or (when it has none) the served Content-Type."""
    world = make_world()
    image = build_image(seed="a")
    document = json.loads(image.manifest)
    if served_type:
        document["mediaType"] = served_type
    else:
        del document["mediaType"]
    body = json.dumps(document, indent=3).encode()  # not canonical: must stay byte for byte
    world.source.add_image("library/app", image)
    world.source.manifests["library/app", sha(body)] = (
        served_type or "application/vnd.oci.image.manifest.v1+json", body)

    await world.copier.copy(world.src(), world.dst(), sha(body), "v1")

    put = world.dest.seen("PUT", f"/manifests/{sha(body)}")[0]
    assert put.content == body
    assert put.headers["content-type"] == (served_type
                                           or "application/vnd.oci.image.manifest.v1+json")


# -- indexes -------------------------------------------------------------------------------


async def test_index_children_before_index_and_tag_last(make_world: MakeWorld) -> None:
    world = make_world()
    index = three_platforms()
    world.source.add_image("library/app", index)

    report = await world.copier.copy(world.src(), world.dst(), index.digest, "v1")

    assert (report.manifests, report.blobs_copied) == (4, 9)
    puts = [r.url.path.rsplit("/", 1)[1] for r in world.dest.seen("PUT", "/manifests/")]
    assert sorted(puts[:3]) == sorted(image.digest for image in index.images)
    assert puts[3:] == [index.digest, "v1"]
    blob_puts = world.dest.seen("PUT", "/blobs/uploads/")
    first_manifest = world.dest.requests.index(world.dest.seen("PUT", "/manifests/")[0])
    assert all(world.dest.requests.index(r) < first_manifest for r in blob_puts)
    assert world.dest.manifests["cache/app", "v1"] == (index.media_type, index.manifest)


async def test_missing_child_fails_naming_it(make_world: MakeWorld) -> None:
    world = make_world()
    index = three_platforms()
    world.source.add_image("library/app", index)
    gone = index.images[1].digest
    del world.source.manifests["library/app", gone]

    with pytest.raises(Failure) as failure:
        await world.copier.copy(world.src(), world.dst(), index.digest, "v1")

    assert failure.value.kind is Kind.NOT_FOUND
    assert gone in failure.value.detail
    assert index.digest in failure.value.detail
    assert not world.dest.seen("PUT")


async def test_manifest_with_other_content_is_invalid(make_world: MakeWorld) -> None:
    world = make_world()
    image, other = build_image(seed="a"), build_image(seed="b")
    world.source.manifests["library/app", image.digest] = (other.media_type, other.manifest)

    with pytest.raises(Failure) as failure:
        await world.copier.copy(world.src(), world.dst(), image.digest)
    assert failure.value.kind is Kind.INVALID


async def test_concurrent_writer_glitches_are_retried(make_world: MakeWorld) -> None:
    """distribution's answers while another node writes the same image: a HEAD 500, an
    index PUT 400 (see copy.RACE_ATTEMPTS)."""
    world = make_world()
    index = three_platforms()
    world.source.add_image("library/app", index)
    config = index.images[0].config_digest
    world.dest.glitches += [("HEAD", f"/blobs/{config}", 500),
                            ("PUT", f"/manifests/{index.digest}", 400),
                            ("PUT", "/manifests/v1", 400), ("PUT", "/manifests/v1", 400)]

    report = await world.copier.copy(world.src(), world.dst(), index.digest, "v1")

    assert report.blobs_copied == 9
    assert world.dest.manifests["cache/app", "v1"] == (index.media_type, index.manifest)
    assert not world.dest.glitches


async def test_persistent_manifest_refusal_fails(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    world.dest.glitches += [("PUT", "/manifests/", 400)] * 3

    with pytest.raises(Failure, match="invalid"):
        await world.copier.copy(world.src(), world.dst(), image.digest)
    assert not world.dest.glitches


# -- blob transfers ------------------------------------------------------------------------


async def test_blob_not_matching_its_digest_aborts(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    layer = image.layer_digests[0]
    good = image.blobs[layer]
    world.source.tamper[layer] = bytes([good[0] ^ 1]) + good[1:]

    with pytest.raises(Failure) as failure:
        await world.copier.copy(world.src(), world.dst(), image.digest, "v1")

    assert failure.value.kind is Kind.INVALID
    assert layer in failure.value.detail
    assert ("cache/app", layer) not in world.dest.blobs
    assert not world.dest.seen("PUT", "/manifests/")
    assert world.dest.seen("DELETE", "/blobs/uploads/")  # the upload is given up
    assert not world.dest.uploads


async def test_blob_longer_than_its_size_aborts(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    world.source.tamper[image.config_digest] = image.config + b" "

    with pytest.raises(Failure, match="longer than"):
        await world.copier.copy(world.src(), world.dst(), image.digest)


@pytest.mark.parametrize("location", ["relative", "absolute"])
async def test_upload_location_keeps_its_query(make_world: MakeWorld, location: str) -> None:
    world = make_world(location=location)
    image = build_image(seed="a")
    world.source.add_image("library/app", image)

    await world.copier.copy(world.src(), world.dst(), image.digest)

    for put in world.dest.seen("PUT", "/blobs/uploads/"):
        assert put.url.host == DEST
        assert put.url.params["_state"].startswith("s")
        assert put.url.params["digest"] in image.blobs


async def test_upload_to_another_host_is_refused(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)

    world.dest.location = "elsewhere"
    with pytest.raises(Failure, match="another host"):
        await world.copier.copy(world.src(), world.dst(), image.digest)


async def test_parallel_blobs_is_a_bound(make_world: MakeWorld) -> None:
    world = make_world(parallel_blobs=2)
    world.source.blob_delay = 0.02
    index = three_platforms()
    world.source.add_image("library/app", index)

    report = await world.copier.copy(world.src(), world.dst(), index.digest)

    assert report.blobs_copied == 9
    assert world.source.most_in_flight == 2


# -- cross-repository mounts ---------------------------------------------------------------


async def test_mount_201_copies_nothing(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    world.dest.add_image("cache/first", image)

    report = await world.copier.copy(world.src(), world.dst(), image.digest,
                                     mount_from=["cache/first"])

    assert (report.blobs_mounted, report.blobs_copied, report.bytes_copied) == (2, 0, 0)
    assert not world.source.seen("GET", "/blobs/")
    post = world.dest.seen("POST")[0]
    assert post.url.params["from"] == "cache/first"


async def test_mount_202_uploads_into_the_session_it_opened(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)

    report = await world.copier.copy(world.src(), world.dst(), image.digest,
                                     mount_from=["cache/empty"])

    assert (report.blobs_mounted, report.blobs_copied) == (0, 2)
    posts = world.dest.seen("POST")
    assert len(posts) == 2
    assert all(p.url.params.get("mount") for p in posts)
    assert not world.dest.seen("DELETE")
    assert not world.dest.uploads


async def test_mount_tries_each_candidate(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.source.add_image("library/app", image)
    world.dest.add_image("cache/second", image)

    report = await world.copier.copy(world.src(), world.dst(), image.digest,
                                     mount_from=["cache/empty", "cache/second"])

    assert report.blobs_mounted == 2
    assert len(world.dest.seen("DELETE")) == 2  # the first candidate's uploads, given up
    assert not world.dest.uploads


# -- authorization -------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_streamed_upload_is_authorized_up_front(make_world: MakeWorld, auth: str) -> None:
    world = make_world(auth=auth)
    image = build_image(seed="a", layers=2)
    world.source.add_image("library/app", image)

    report = await world.copier.copy(world.src(), world.dst(creds=Credentials(USER, PASSWORD)),
                                     image.digest, "v1")

    assert report.blobs_copied == 3
    blob_puts = world.dest.seen("PUT", "/blobs/uploads/")
    assert len(blob_puts) == 3  # never challenged: each went once
    assert not [r for r in world.dest.challenged if r.method == "PUT" and "/blobs/" in r.url.path]
    assert all(world.dest.blobs["cache/app", d] == b for d, b in image.blobs.items())


@pytest.mark.parametrize("mount_from", [(), ("cache/empty",), ("cache/first",)])
async def test_bearer_tokens_cover_every_streamed_upload(make_world: MakeWorld,
                                                         mount_from: tuple[str, ...]) -> None:
    """Blobs copied in parallel, with HEADs (pull tokens) and uploads (push tokens)
    interleaved: no upload ever goes out with a token lacking push."""
    world = make_world(auth="bearer")
    index = three_platforms()
    world.source.add_image("library/app", index)
    world.dest.add_image("cache/first", index.images[0])
    creds = Credentials(USER, PASSWORD)

    report = await world.copier.copy(world.src(), world.dst(creds=creds), index.digest, "v1",
                                     mount_from=mount_from)

    assert report.blobs_copied + report.blobs_mounted == 9
    assert report.blobs_mounted == (3 if mount_from == ("cache/first",) else 0)
    assert not [r for r in world.dest.challenged
                if r.method == "PUT" and "/blobs/" in r.url.path]


async def test_challenged_streamed_upload_is_unauthorized(make_world: MakeWorld) -> None:
    world = make_world(auth="basic")
    endpoint = Endpoint(f"https://{DEST}/v2", DEST)
    session = Session(transport=httpx.MockTransport(world.dest))

    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    try:
        with pytest.raises(Failure) as failure:
            await session.request("PUT", endpoint, f"https://{DEST}/v2/a/blobs/uploads/u0",
                                  creds=Credentials(USER, PASSWORD), scope="s", content=body())
        assert failure.value.kind is Kind.UNAUTHORIZED
        # The answer is kept: a request of the same scope now goes out authorized.
        with pytest.raises(Failure, match="not_found"):
            await session.request("GET", endpoint, f"https://{DEST}/v2/a/blobs/sha256:00",
                                  creds=Credentials(USER, PASSWORD), scope="s")
        assert world.dest.requests[-1].headers["authorization"] == basic(USER, PASSWORD)
    finally:
        await session.close()


# -- has_manifest and push_blob ------------------------------------------------------------


async def test_has_manifest(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="a")
    world.dest.add_image("cache/app", image)

    assert await world.copier.has_manifest(world.dst(), image.digest)
    assert not await world.copier.has_manifest(world.dst(), build_image(seed="b").digest)
    assert not await world.copier.has_manifest(world.dst("cache/other"), image.digest)
    with pytest.raises(Failure, match="invalid"):
        await world.copier.has_manifest(world.dst(), "latest")


async def test_has_manifest_raises_other_failures() -> None:
    async def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    session = Session(transport=httpx.MockTransport(broken))
    where = Location(Endpoint(f"https://{DEST}/v2", DEST), "cache/app")
    try:
        with pytest.raises(Failure) as failure:
            await Copier(session).has_manifest(where, sha(b""))
        assert failure.value.kind is Kind.SERVER_ERROR
    finally:
        await session.close()


async def test_push_blob(make_world: MakeWorld) -> None:
    world = make_world()
    assert await world.copier.push_blob(world.dst(), b"{}") == sha(b"{}")
    assert world.dest.blobs["cache/app", sha(b"{}")] == b"{}"
    await world.copier.push_blob(world.dst(), b"{}")
    assert len(world.dest.seen("PUT")) == 1


# -- checking what a registry holds --------------------------------------------------------

async def test_check_finds_the_blobs_whose_bytes_are_wrong(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="checked", layers=2)
    world.source.add_image("library/app", image)
    assert await world.copier.check(world.src(), image.digest) == []
    layer = image.layer_digests[1]
    good = image.blobs[layer]
    world.source.tamper[layer] = bytes([good[0] ^ 1]) + good[1:]
    assert await world.copier.check(world.src(), image.digest) == [layer]


async def test_check_reports_a_manifest_with_other_bytes(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="checked-manifest")
    world.source.add_image("library/app", image)
    media_type, body = world.source.manifests["library/app", image.digest]
    world.source.manifests["library/app", image.digest] = (media_type, body + b" ")
    assert await world.copier.check(world.src(), image.digest) == [image.digest]


async def test_check_counts_a_missing_blob_as_right(make_world: MakeWorld) -> None:
    # Missing content is what a copy fills in; only content that is there and wrong needs
    # the registry's operator.
    world = make_world()
    image = build_image(seed="checked-missing")
    world.source.add_image("library/app", image)
    del world.source.blobs["library/app", image.layer_digests[0]]
    assert await world.copier.check(world.src(), image.digest) == []


# -- from the node's content store ---------------------------------------------------------


@dataclass
class FakeContent:
    """containerd's content store: blobs and manifests by digest, read in small pieces."""

    items: dict[str, bytes] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # reads fail half-way
    reads: list[str] = field(default_factory=list)

    def hold(self, image: Image | Index, *, platforms: int | None = None) -> None:
        """What containerd keeps after a pull: the index, and `platforms` of its images."""
        images = image.images if isinstance(image, Index) else (image,)
        for child in images[:platforms]:
            self.items.update(child.blobs)
            self.items[child.digest] = child.manifest
        self.items[image.digest] = image.manifest

    async def content_size(self, digest: str) -> int | None:
        data = self.items.get(digest)
        return None if data is None else len(data)

    async def read_content(self, digest: str) -> AsyncGenerator[bytes, None]:
        self.reads.append(digest)
        data = self.items[digest]
        for start in range(0, max(len(data), 1), 7):
            if digest in self.broken and start > 0:
                raise ContainerdError("UNKNOWN", "read failed")
            yield data[start:start + 7]


def from_node(world: World, content: FakeContent) -> NodeSource:
    return NodeSource(content, RegistrySource(world.copier._session, world.src()))


async def test_what_the_node_holds_is_read_from_it_not_from_upstream(
        make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="n", layers=2)
    world.source.add_image("library/app", image)
    content = FakeContent()
    content.hold(image)

    report = await world.copier.copy(from_node(world, content), world.dst(), image.digest, "v1")

    assert world.source.requests == []
    size = sum(len(b) for b in image.blobs.values())
    assert (report.blobs_copied, report.bytes_copied) == (3, size)
    assert (report.blobs_from_node, report.bytes_from_node) == (3, size)
    assert world.dest.manifests["cache/app", "v1"] == (image.media_type, image.manifest)
    for digest, data in image.blobs.items():
        assert world.dest.blobs["cache/app", digest] == data


async def test_other_platforms_of_an_index_come_from_upstream(make_world: MakeWorld) -> None:
    world = make_world()
    index = three_platforms()
    world.source.add_image("library/app", index)
    content = FakeContent()
    content.hold(index, platforms=1)  # containerd fetches its own platform only
    mine, *others = index.images

    report = await world.copier.copy(from_node(world, content), world.dst(), index.digest, "v1")

    fetched = {r.url.path.rsplit("/", 1)[1] for r in world.source.seen("GET")}
    assert fetched == {d for image in others for d in (image.digest, *image.blobs)}
    assert (report.manifests, report.blobs_copied, report.blobs_from_node) == (4, 9, 3)
    assert report.bytes_from_node == sum(len(b) for b in mine.blobs.values())
    assert world.dest.manifests["cache/app", "v1"] == (index.media_type, index.manifest)


async def test_a_manifest_without_a_media_type_is_asked_of_upstream(
        make_world: MakeWorld) -> None:
    """Only a registry's Content-Type can say what it is: no guessing from the node."""
    world = make_world()
    image = build_image(seed="t")
    document = json.loads(image.manifest)
    del document["mediaType"]
    body = json.dumps(document).encode()
    world.source.add_image("library/app", image)
    world.source.manifests["library/app", sha(body)] = (image.media_type, body)
    content = FakeContent()
    content.hold(image)
    content.items[sha(body)] = body

    await world.copier.copy(from_node(world, content), world.dst(), sha(body))

    assert [r.url.path for r in world.source.seen("GET")] == [
        f"/v2/library/app/manifests/{sha(body)}"]
    put = world.dest.seen("PUT", f"/manifests/{sha(body)}")[0]
    assert put.headers["content-type"] == image.media_type


async def test_node_content_that_does_not_match_its_digest_is_never_stored(
        make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="c")
    world.source.add_image("library/app", image)
    content = FakeContent()
    content.hold(image)
    layer = image.layer_digests[0]
    content.items[layer] = bytes(len(content.items[layer]))  # same size, other bytes

    with pytest.raises(Failure) as failure:
        await world.copier.copy(from_node(world, content), world.dst(), image.digest)

    assert failure.value.kind is Kind.INVALID
    assert layer in failure.value.detail
    assert ("cache/app", layer) not in world.dest.blobs
    assert not world.dest.seen("PUT", "/manifests/")


async def test_a_failed_read_from_the_node_fails_the_copy_as_a_server_error(
        make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="r")
    world.source.add_image("library/app", image)
    content = FakeContent()
    content.hold(image)
    content.broken.add(image.layer_digests[0])

    with pytest.raises(Failure) as failure:
        await world.copier.copy(from_node(world, content), world.dst(), image.digest)

    assert failure.value.kind is Kind.SERVER_ERROR
    assert "content store" in failure.value.detail
    assert ("cache/app", image.layer_digests[0]) not in world.dest.blobs


async def test_blobs_backing_has_are_not_read_from_the_node(make_world: MakeWorld) -> None:
    world = make_world()
    image = build_image(seed="s")
    world.source.add_image("library/app", image)
    world.dest.blobs["cache/app", image.config_digest] = image.config
    content = FakeContent()
    content.hold(image)

    report = await world.copier.copy(from_node(world, content), world.dst(), image.digest)

    assert image.config_digest not in content.reads
    assert (report.blobs_skipped, report.blobs_from_node) == (1, 1)
