"""The harness against the real things: containerd 1.6, 1.7 and 2.3 (CRI) and distribution 2.8."""

from __future__ import annotations

import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from nodekeeper._proto import containerd_images_pb2 as ctdimg
from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeContainerd, MakeRegistry
from tests.harness import (
    Containerd,
    ContainerdError,
    CriClient,
    NativeImages,
    Registry,
    RegistryError,
    build_image,
    build_index,
    delete_tag,
    image_ref,
    push,
    push_new,
    resolve,
    sha256_digest,
    tls_hosts_toml,
)
from tests.harness.link import Link

pytestmark = pytest.mark.integration

def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- CRI pulls through the real containerd --------------------------------------------------


def test_pull_reports_config_digest_and_repo_digest(
    registry: Registry, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "team/app", "v1", seed="first")
    ref = image_ref(registry.host, "team/app", "v1")

    assert cri_client.pull(ref) == image.config_digest

    st = cri_client.status(ref).image
    assert st.id == image.config_digest
    assert f"{registry.host}/team/app:v1" in st.repo_tags
    assert f"{registry.host}/team/app@{image.digest}" in st.repo_digests
    assert st.size > 0
    listed = {i.id for i in cri_client.list().images}
    assert image.config_digest in listed


def test_repush_with_new_content_changes_id(registry: Registry, cri_client: CriClient) -> None:
    ref = image_ref(registry.host, "app", "latest")
    first = push_new(registry.url, "app", "latest", seed="one")
    assert cri_client.pull(ref) == first.config_digest

    second = push_new(registry.url, "app", "latest", seed="two")
    assert second.config_digest != first.config_digest
    assert cri_client.pull(ref) == second.config_digest
    st = cri_client.status(ref).image
    assert st.id == second.config_digest
    assert f"{registry.host}/app@{second.digest}" in st.repo_digests
    # The old image lost its tag but is still known by its ID.
    old = cri_client.status(first.config_digest).image
    assert old.id == first.config_digest
    assert ref not in old.repo_tags


def test_multi_platform_index_repo_digest_is_the_index(
    registry: Registry, cri_client: CriClient
) -> None:
    amd64 = build_image(seed="multi", platform=("linux", "amd64"))
    arm64 = build_image(seed="multi", platform=("linux", "arm64"))
    index = build_index([amd64, arm64])
    assert push(registry.url, "multi", "v1", index) == index.digest

    ref = image_ref(registry.host, "multi", "v1")
    assert cri_client.pull(ref) == amd64.config_digest
    st = cri_client.status(ref).image
    assert st.id == amd64.config_digest
    assert list(st.repo_digests) == [f"{registry.host}/multi@{index.digest}"]
    # Only the matching platform's manifest was fetched.
    assert registry.requests("GET", f"/manifests/{amd64.digest}")
    assert not registry.requests("GET", f"/manifests/{arm64.digest}")


def test_pull_by_digest(registry: Registry, cri_client: CriClient) -> None:
    image = build_image(seed="by-digest")
    push(registry.url, "pinned", None, image)
    assert cri_client.pull(image_ref(registry.host, "pinned", digest=image.digest)) == image.id


def test_htpasswd_registry_needs_credentials(
    make_registry: MakeRegistry, cri_client: CriClient
) -> None:
    reg = make_registry(htpasswd={"alice": "s3cret"})
    assert reg.auth == ("alice", "s3cret")
    image = push_new(reg.url, "private/app", "v1", seed="auth", auth=reg.auth)
    ref = image_ref(reg.host, "private/app", "v1")

    with pytest.raises(grpc.RpcError) as no_auth:
        cri_client.pull(ref)
    # 1.6 quotes the registry's status; 1.7 and later say why they gave up.
    assert re.search("401 Unauthorized|no basic auth credentials", no_auth.value.details() or "")
    with pytest.raises(grpc.RpcError):
        cri_client.pull(ref, auth=cri.AuthConfig(username="alice", password="wrong"))
    assert not cri_client.status(ref).HasField("image")

    good = cri.AuthConfig(username="alice", password="s3cret")
    assert cri_client.pull(ref, auth=good) == image.config_digest


def test_tls_registry_with_private_ca(
    make_registry: MakeRegistry, containerd: Containerd, cri_client: CriClient
) -> None:
    reg = make_registry(tls=True)
    assert reg.url.startswith("https://")
    assert reg.ca_file is not None
    image = push_new(reg.url, "secure", "v1", seed="tls", verify=reg.verify())
    ref = image_ref(reg.host, "secure", "v1")

    if containerd.release.name == "1.6":
        # Untrusted certificate: 1.6 falls back to plain HTTP, which the TLS port refuses.
        with pytest.raises(grpc.RpcError):
            cri_client.pull(ref)
    else:
        # 1.7 and later try HTTPS first on a loopback host, without verifying it.
        assert cri_client.pull(ref) == image.config_digest
        cri_client.remove(ref)
    containerd.write_hosts_toml(reg.host, tls_hosts_toml(reg.host, reg.ca_file))
    assert cri_client.pull(ref) == image.config_digest
    assert cri_client.status(ref).image.id == image.config_digest


# -- containerd lifecycle and native metadata -----------------------------------------------


def test_containerd_restart_keeps_images(registry: Registry, containerd: Containerd) -> None:
    image = push_new(registry.url, "keep", "v1", seed="restart")
    ref = image_ref(registry.host, "keep", "v1")
    with containerd.cri() as client:
        client.pull(ref)
    seen = len(registry.requests())
    old_pid = containerd.pid
    assert old_pid is not None

    containerd.restart()

    assert containerd.pid != old_pid
    assert _pid_gone(old_pid)
    with containerd.cri() as client:
        assert client.status(ref).image.id == image.config_digest
    # The image came from containerd's own store: the registry saw nothing new.
    assert len(registry.requests()) == seen


def test_native_create_makes_a_new_name_visible_to_cri(
    registry: Registry, containerd: Containerd, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "src", "v1", seed="alias")
    ref = image_ref(registry.host, "src", "v1")
    cri_client.pull(ref)

    alias = "registry.example.invalid/alias:latest"
    with NativeImages(containerd.address) as native:
        source = native.get(ref)
        assert source.target.digest == image.digest
        created = native.create(ctdimg.Image(name=alias, target=source.target))
        assert created.name == alias
        assert {i.name for i in native.list([f"name=={alias}"])} == {alias}

        # The CRI plugin learns of it through containerd's event stream (asynchronously).
        deadline = time.monotonic() + 5
        while not cri_client.status(alias).HasField("image") and time.monotonic() < deadline:
            time.sleep(0.02)
        st = cri_client.status(alias).image
        assert st.id == image.config_digest
        assert alias in st.repo_tags

        native.delete(alias, sync=True)
        with pytest.raises(grpc.RpcError) as missing:
            native.get(alias)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_raw_call_and_cri_remove(registry: Registry, cri_client: CriClient) -> None:
    image = push_new(registry.url, "raw", "v1", seed="raw")
    ref = image_ref(registry.host, "raw", "v1")
    request = cri.PullImageRequest(image=cri.ImageSpec(image=ref)).SerializeToString()
    answer = cri.PullImageResponse.FromString(cri_client.raw("PullImage", request))
    assert answer.image_ref == image.config_digest
    assert cri_client.fsinfo().image_filesystems

    cri_client.remove(ref)
    assert not cri_client.status(ref).HasField("image")
    with pytest.raises(grpc.RpcError) as bad:
        cri_client.raw("/runtime.v1.ImageService/NoSuchMethod", b"")
    assert bad.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_containerd_start_failure_raises_with_log(make_containerd: MakeContainerd) -> None:
    ctd = make_containerd("broken", start=False, extra_config="this is not toml",
                          start_timeout=5)
    with pytest.raises(ContainerdError, match="log tail"):
        ctd.start()
    assert not ctd.running


def test_long_temp_dirs_get_a_short_socket(make_containerd: MakeContainerd) -> None:
    ctd = make_containerd("/".join(["d" * 30] * 4))
    assert len(ctd.address) < 100
    with ctd.cri() as client:
        assert client.fsinfo().image_filesystems
    ctd.close()
    assert not Path(ctd.address).parent.exists()


# -- registry lifecycle, observation and tampering ------------------------------------------


def test_registry_counts_requests(registry: Registry, cri_client: CriClient) -> None:
    push_new(registry.url, "counted", "v1", seed="count")
    # Pushes and readiness probes are the harness's own traffic: not counted by default.
    assert registry.requests() == []
    assert registry.requests("PUT", "/manifests/v1", include_harness=True)

    cri_client.pull(image_ref(registry.host, "counted", "v1"))
    heads = registry.wait_for_requests(1, "HEAD", "/counted/manifests/v1")
    assert len(heads) == 1
    assert heads[0].status == 200
    assert heads[0].user_agent.startswith("containerd/")

    registry.clear_requests()
    cri_client.pull(image_ref(registry.host, "counted", "v1"))
    assert len(registry.wait_for_requests(1, "HEAD", "/manifests/")) == 1
    # Content already present: containerd fetched no blob the second time.
    assert registry.requests("GET", "/blobs/") == []


def test_registry_restart_keeps_port_and_content(registry: Registry, cri_client: CriClient) -> None:
    image = push_new(registry.url, "durable", "v1", seed="durable")
    ref = image_ref(registry.host, "durable", "v1")
    old_pid = registry.pid
    assert old_pid is not None

    registry.stop()
    assert _pid_gone(old_pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/", timeout=2)
    with pytest.raises(grpc.RpcError):
        cri_client.pull(ref, timeout=10)

    registry.start()
    assert resolve(registry.url, "durable", "v1") == image.digest
    assert cri_client.pull(ref) == image.config_digest


def test_frozen_registry_accepts_but_never_answers(registry: Registry) -> None:
    registry.freeze()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{registry.url}/v2/", timeout=0.3)
    finally:
        registry.thaw()
    assert httpx.get(f"{registry.url}/v2/", timeout=2).status_code == 200


def test_a_link_delays_every_answer_and_shares_its_bandwidth(registry: Registry) -> None:
    image = build_image({"data": os.urandom(1 << 20)}, seed="link")
    push(registry.url, "team/link", "v1", image)
    layer = image.layer_digests[0]
    # Lower bounds only: a busy machine can make these times longer, never shorter.
    with Link(registry.host, rtt=0.2, mbit=16) as link:
        started = time.monotonic()
        assert httpx.get(f"{link.url}/v2/", timeout=10).status_code == 200
        assert time.monotonic() - started >= 0.2 * 2  # connect, then the request: 2 RTTs

        def fetch() -> bytes:
            return httpx.get(f"{link.url}/v2/team/link/blobs/{layer}", timeout=30).content

        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            bodies = list(pool.map(lambda _: fetch(), range(2)))
        # Two copies of a 1 MiB layer through one 2 MB/s downlink: 1 s at the least.
        assert time.monotonic() - started >= 2 * len(image.blobs[layer]) / 2e6
    assert bodies == [image.blobs[layer]] * 2


def test_deleting_tags_upstream(registry: Registry) -> None:
    image = push_new(registry.url, "gone", "a", seed="gone")
    push(registry.url, "gone", "b", image)

    registry.remove_tag("gone", "a")  # only that tag
    assert resolve(registry.url, "gone", "a") is None
    assert resolve(registry.url, "gone", "b") == image.digest

    assert delete_tag(registry.url, "gone", "b") == image.digest  # the manifest itself
    assert resolve(registry.url, "gone", "b") is None
    assert resolve(registry.url, "gone", image.digest) is None


def test_registry_start_failure_raises_with_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        reg = Registry(tmp_path / "busy", port=taken.getsockname()[1], start_timeout=5)
        try:
            with pytest.raises(RegistryError, match="address already in use"):
                reg.start()
            assert not reg.running
        finally:
            reg.close()


# -- image building -------------------------------------------------------------------------


def test_built_images_are_reproducible_and_seeded() -> None:
    a1, a2, b = build_image(seed="a"), build_image(seed="a"), build_image(seed="b")
    assert a1.digest == a2.digest
    assert a1.config_digest == a2.config_digest
    assert b.digest != a1.digest
    assert b.config_digest != a1.config_digest
    assert a1.digest == sha256_digest(a1.manifest)
    assert a1.config_digest == sha256_digest(a1.config)

    three = build_image({"bin/tool": b"x" * 100}, seed="a", layers=3)
    assert len(three.layer_digests) == 3
    assert set(three.blobs) == {*three.layer_digests, three.config_digest}
    assert all(len(blob) < 4096 for blob in three.blobs.values())
    arm = build_image(seed="a", platform=("linux", "arm64"))
    assert arm.config_digest != a1.config_digest
