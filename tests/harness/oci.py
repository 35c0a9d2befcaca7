"""Small OCI images built in memory, and a registry HTTP API client to push and delete them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import ssl
import tarfile
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

USER_AGENT = "nodekeeper-harness-oci"

Auth = tuple[str, str]
Verify = ssl.SSLContext | bool


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    """One single-platform image: its manifest, config and every blob it references."""

    manifest: bytes
    digest: str  # manifest digest (what repo_digests shows for a single-platform pull)
    config: bytes
    config_digest: str  # what containerd reports as the image ID
    blobs: dict[str, bytes] = field(repr=False)  # digest -> bytes: config and layers
    layer_digests: tuple[str, ...]
    platform: tuple[str, str]
    media_type: str = OCI_MANIFEST

    @property
    def id(self) -> str:
        return self.config_digest

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self) -> dict[str, object]:
        """The manifest's OCI descriptor (media type, digest, size)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Index:
    """A multi-platform image index over ``images``."""

    manifest: bytes
    digest: str
    images: tuple[Image, ...]
    media_type: str = OCI_INDEX

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def for_platform(self, os: str, arch: str) -> Image:
        for image in self.images:
            if image.platform == (os, arch):
                return image
        raise KeyError(f"no {os}/{arch} image in index {self.digest}")


def _layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed, reproducible tar of ``files`` (parents created as directories)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            clean = name.strip("/")
            parts = clean.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(clean)
            data = files[name]
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_image(
    files: dict[str, bytes] | None = None,
    *,
    seed: str = "",
    platform: tuple[str, str] = ("linux", "amd64"),
    layers: int = 1,
    cmd: list[str] | None = None,
) -> Image:
    """A small OCI image with ``layers`` gzip tar layers.

    ``files`` go into the first layer (default: a tiny ``/hello`` script, the default
    ``cmd``); each layer also carries a marker file naming the seed, the platform and the
    layer number, so a different ``seed`` (or platform) gives different layers, config and
    manifest digests.
    """
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    os_name, arch = platform
    base_files = dict(files) if files is not None else {"hello": b"#!/bin/sh\necho hello\n"}
    blobs: dict[str, bytes] = {}
    layer_descs: list[dict[str, object]] = []
    diff_ids: list[str] = []
    history: list[dict[str, object]] = []
    for n in range(layers):
        layer_files = dict(base_files) if n == 0 else {}
        marker = f"seed={seed}\nplatform={os_name}/{arch}\nlayer={n}\n".encode()
        layer_files[f"etc/nodekeeper-test/layer{n}"] = marker
        tar = _layer_tar(layer_files)
        gz = gzip.compress(tar, compresslevel=6, mtime=0)
        digest = sha256_digest(gz)
        blobs[digest] = gz
        diff_ids.append(sha256_digest(tar))
        layer_descs.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(gz)})
        history.append({"created": "1970-01-01T00:00:00Z", "created_by": f"harness layer {n}"})
    config_obj = {
        "architecture": arch,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Cmd": cmd if cmd is not None else ["/hello"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.nodekeeper.test.seed": seed},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config = _canonical_json(config_obj)
    config_digest = sha256_digest(config)
    blobs[config_digest] = config
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layer_descs,
    }
    manifest = _canonical_json(manifest_obj)
    return Image(
        manifest=manifest,
        digest=sha256_digest(manifest),
        config=config,
        config_digest=config_digest,
        blobs=blobs,
        layer_digests=tuple(str(d["digest"]) for d in layer_descs),
        platform=platform,
    )


def build_index(images: list[Image]) -> Index:
    """An OCI image index with one platform entry per image."""
    entries = []
    for image in images:
        os_name, arch = image.platform
        platform: dict[str, str] = {"architecture": arch, "os": os_name}
        if arch == "arm64":
            platform["variant"] = "v8"
        entries.append({**image.descriptor(), "platform": platform})
    manifest = _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    return Index(manifest=manifest, digest=sha256_digest(manifest), images=tuple(images))


def multi_platform(
    seed: str = "",
    platforms: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64")),
) -> Index:
    """An index of one fresh image per platform."""
    return build_index([build_image(seed=seed, platform=p) for p in platforms])


# -- registry HTTP API ---------------------------------------------------------------------


def _client(registry_url: str, auth: Auth | None, verify: Verify) -> httpx.Client:
    return httpx.Client(
        base_url=registry_url,
        auth=auth,
        verify=verify,
        timeout=30.0,
        headers={"User-Agent": USER_AGENT},
    )


def _check(resp: httpx.Response, *expected: int) -> None:
    if resp.status_code not in expected:
        raise RuntimeError(
            f"{resp.request.method} {resp.request.url} answered {resp.status_code}"
            f" (expected {expected}): {resp.text[:500]}"
        )


def _push_blob(client: httpx.Client, repo: str, digest: str, data: bytes) -> None:
    head = client.head(f"/v2/{repo}/blobs/{digest}")
    if head.status_code == 200:
        return
    start = client.post(f"/v2/{repo}/blobs/uploads/")
    _check(start, 202)
    location = httpx.URL(urljoin(str(start.url), start.headers["Location"]))
    # The upload URL carries its own query (_state=...): add to it, don't replace it.
    put = client.put(
        location.copy_merge_params({"digest": digest}),
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    _check(put, 201)


def _push_manifest(
    client: httpx.Client, repo: str, reference: str, media_type: str, body: bytes
) -> str:
    resp = client.put(
        f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    _check(resp, 201)
    digest: str = resp.headers.get("Docker-Content-Digest", sha256_digest(body))
    return digest


def _push_image(client: httpx.Client, repo: str, reference: str, image: Image) -> str:
    for digest, data in image.blobs.items():
        _push_blob(client, repo, digest, data)
    return _push_manifest(client, repo, reference, image.media_type, image.manifest)


def push(
    registry_url: str,
    repo: str,
    tag: str | None,
    image: Image | Index,
    auth: Auth | None = None,
    *,
    verify: Verify = True,
) -> str:
    """Push ``image`` (blobs first, skipping those the registry has) and return its digest.

    With ``tag`` None the manifest is pushed by digest only. An index's children are pushed
    by digest before the index itself.
    """
    with _client(registry_url, auth, verify) as client:
        if isinstance(image, Index):
            for child in image.images:
                _push_image(client, repo, child.digest, child)
            reference = tag if tag is not None else image.digest
            digest = _push_manifest(client, repo, reference, image.media_type, image.manifest)
        else:
            digest = _push_image(client, repo, tag if tag is not None else image.digest, image)
    if digest != image.digest:
        raise RuntimeError(f"registry stored {digest}, built {image.digest}")
    return digest


def push_new(
    registry_url: str,
    repo: str,
    tag: str,
    *,
    seed: str,
    auth: Auth | None = None,
    verify: Verify = True,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> Image:
    """Build a fresh single-platform image from ``seed`` and push it as ``repo:tag``."""
    image = build_image(seed=seed, platform=platform)
    push(registry_url, repo, tag, image, auth, verify=verify)
    return image


def resolve(
    registry_url: str,
    repo: str,
    reference: str,
    auth: Auth | None = None,
    *,
    verify: Verify = True,
) -> str | None:
    """The digest a tag (or digest) resolves to now, or None if the registry says 404."""
    with _client(registry_url, auth, verify) as client:
        resp = client.head(f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
    if resp.status_code == 404:
        return None
    _check(resp, 200)
    digest: str = resp.headers["Docker-Content-Digest"]
    return digest


def delete_manifest(
    registry_url: str,
    repo: str,
    digest: str,
    auth: Auth | None = None,
    *,
    verify: Verify = True,
) -> None:
    """DELETE a manifest by digest; every tag pointing at it then answers 404."""
    with _client(registry_url, auth, verify) as client:
        _check(client.delete(f"/v2/{repo}/manifests/{digest}"), 202)


def delete_tag(
    registry_url: str,
    repo: str,
    tag: str,
    auth: Auth | None = None,
    *,
    verify: Verify = True,
) -> str:
    """Make ``repo:tag`` answer 404 through the API: resolve it and delete its manifest
    (which also removes other tags on the same manifest; see ``Registry.remove_tag`` for
    removing just one tag). Returns the deleted digest."""
    digest = resolve(registry_url, repo, tag, auth, verify=verify)
    if digest is None:
        raise RuntimeError(f"{repo}:{tag} does not exist at {registry_url}")
    delete_manifest(registry_url, repo, digest, auth, verify=verify)
    return digest


def image_ref(
    registry_host: str, repo: str, tag: str | None = None, digest: str | None = None
) -> str:
    """``host/repo:tag``, ``host/repo@digest`` or ``host/repo:tag@digest``."""
    ref = f"{registry_host}/{repo}"
    if tag is not None:
        ref += f":{tag}"
    if digest is not None:
        ref += f"@{digest}"
    return ref
