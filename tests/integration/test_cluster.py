"""A rollout on a cluster of four real nodes (containerd + nodekeeper each), one real
upstream and one real backing registry: what upstream serves for a new build.

A node's copy to backing reads what its pull stored from its own containerd, so upstream
serves each digest once per node that pulled it there, never again for the copy; and a
node that pulls after another's copy reached backing pulls from backing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nodekeeper.containerd.client import Containerd as Client
from nodekeeper.errors import ContainerdError
from tests.conftest import RELEASES
from tests.harness import multi_platform, push, resolve, sha256_digest
from tests.harness.cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"containerd-{r.name}")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four nodes for the module's tests; each test pulls images of its own repository."""
    with Cluster(tmp_path_factory.mktemp("cluster"), release=request.param, nodes=4) as made:
        yield made


def backing_repo(cluster: Cluster, repo: str) -> str:
    return f"cache/{cluster.upstream.host.replace(':', '_')}/{repo}"


def test_a_staggered_rollout_costs_upstream_one_download_of_each_digest(
        cluster: Cluster) -> None:
    image = cluster.push_new("staggered", "v1", seed="staggered-2")
    cluster.upstream.clear_requests()

    pulls = cluster.pull_staggered(cluster.ref("staggered", "v1"), settle=image.digest)

    assert pulls.answers == (image.config_digest,) * 4
    first, *others = cluster.nodes
    assert first.decisions(image.digest) == ["pulled"]
    assert [node.decisions(image.digest) for node in others] == [["backing"]] * 3
    cluster.upstream.wait_for_requests(2, "GET", "/blobs/")
    traffic = cluster.traffic()
    assert traffic.manifest_gets_by_digest() == {image.digest: 1}
    assert traffic.blob_gets_by_digest() == dict.fromkeys(image.blobs, 1)
    assert traffic.blob_bytes == sum(len(data) for data in image.blobs.values())
    copied = first.copy_events(image.digest)
    assert [(e["bytes_from_node"], e["bytes_from_upstream"]) for e in copied] == [
        (traffic.blob_bytes, 0)]


def test_a_rollout_at_once_costs_upstream_no_more_than_containerd_alone(
        cluster: Cluster) -> None:
    alone = cluster.push_new("at-once", "v1", seed="at-once-alone")
    cluster.upstream.clear_requests()
    pulls = cluster.pull_at_once(cluster.ref("at-once", "v1"), direct=True)
    assert pulls.answers == (alone.config_digest,) * 4
    cluster.upstream.wait_for_requests(8, "GET", "/blobs/")
    by_containerd = cluster.traffic()

    image = cluster.push_new("at-once", "v1", seed="at-once-2")
    cluster.upstream.clear_requests()
    pulls = cluster.pull_at_once(cluster.ref("at-once", "v1"))
    cluster.settle(image.digest)

    assert pulls.answers == (image.config_digest,) * 4
    decisions = [node.decisions(image.digest) for node in cluster.nodes]
    assert all(d in (["updated"], ["backing"]) for d in decisions)  # the tag moved
    upstream_pulls = decisions.count(["updated"])
    assert upstream_pulls >= 1
    cluster.upstream.wait_for_requests(2 * upstream_pulls, "GET", "/blobs/")
    traffic = cluster.traffic()
    # nodekeeper itself asks upstream for digests only (HEAD), never for a byte of them
    assert (traffic.of("nodekeeper").manifest_gets, traffic.of("nodekeeper").blob_gets) == (0, 0)
    assert traffic.manifest_gets == upstream_pulls
    assert traffic.blob_gets_by_digest() == dict.fromkeys(image.blobs, upstream_pulls)
    assert traffic.manifest_gets <= by_containerd.manifest_gets
    assert traffic.blob_gets <= by_containerd.blob_gets
    assert traffic.blob_bytes <= by_containerd.blob_bytes


def test_the_copy_asks_upstream_only_for_what_the_node_lacks(cluster: Cluster) -> None:
    """containerd fetches its own platform of an index; backing gets every platform, the
    other one's manifest and blobs from upstream."""
    index = multi_platform("lacks", (("linux", "amd64"), ("linux", "arm64")))
    push(cluster.upstream.url, "multi", "v1", index)
    cluster.upstream.clear_requests()
    node = cluster.nodes[0]

    node.pull(cluster.ref("multi", "v1"))
    node.settle(index.digest)

    traffic = cluster.traffic()
    pulled = set(traffic.of("containerd").manifest_gets_by_digest()) | set(
        traffic.of("containerd").blob_gets_by_digest())
    copied = set(traffic.of("nodekeeper").manifest_gets_by_digest()) | set(
        traffic.of("nodekeeper").blob_gets_by_digest())
    everything = {index.digest} | {d for image in index.images
                                   for d in (image.digest, *image.blobs)}
    assert pulled & copied == set()
    assert pulled | copied == everything
    lacking = [image for image in index.images if image.digest in copied]
    assert len(lacking) == 1
    assert copied == {lacking[0].digest, *lacking[0].blobs}
    repo = backing_repo(cluster, "multi")
    assert resolve(cluster.backing.url, repo, "v1") == index.digest
    for image in index.images:
        assert resolve(cluster.backing.url, repo, image.digest) == image.digest


async def test_the_content_store_reads_back_what_a_pull_stored(cluster: Cluster) -> None:
    image = cluster.push_new("content", "v1", seed="content", layer_bytes=3 * 1024 * 1024)
    node = cluster.nodes[0]
    node.pull(cluster.ref("content", "v1"), direct=True)
    client = Client(node.containerd.address)
    try:
        for digest, data in {**image.blobs, image.digest: image.manifest}.items():
            assert await client.content_size(digest) == len(data)
            pieces = [piece async for piece in client.read_content(digest)]
            assert b"".join(pieces) == data
            assert max(map(len, pieces)) <= 1024 * 1024  # streamed, not in one message
        absent = sha256_digest(b"never pulled")
        assert await client.content_size(absent) is None
        with pytest.raises(ContainerdError) as refused:
            [piece async for piece in client.read_content(absent)]
        assert refused.value.code == "NOT_FOUND"
    finally:
        await client.close()
