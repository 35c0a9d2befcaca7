"""Containers behind their tag: compared with what checks learned, never a registry."""

from __future__ import annotations

from nodekeeper.behind import Known, Latest, Running, find

OLD, NEW = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def running(image: str, digests: tuple[str, ...] = (OLD,), **fields: str) -> Running:
    values = {"container_id": "c1", "container": "app", "pod": "web-0",
              "namespace": "shop", "image_id": "sha256:" + "c" * 64, **fields}
    return Running(image=image, digests=digests, started_at=100.0, **values)


LATEST = Known(latest={"registry.test/app:v1": Latest(digest=NEW, since=200.0)},
               pulled_as={})


def test_a_container_on_an_older_digest_than_its_tag_is_behind() -> None:
    [behind] = find([running("registry.test/app:v1")], LATEST)
    assert behind.reference == "registry.test/app:v1"
    assert behind.runs == OLD
    assert behind.latest.digest == NEW
    assert "runs " + OLD in behind.message()
    assert "restart the pod" in behind.message()


def test_the_image_is_normalized_as_the_pod_names_it() -> None:
    latest = Known(latest={"docker.io/library/postgres:latest": Latest(digest=NEW, since=1.0)},
                   pulled_as={})
    assert len(find([running("postgres")], latest)) == 1


def test_a_container_on_the_tags_digest_is_not_behind() -> None:
    assert find([running("registry.test/app:v1", digests=(OLD, NEW))], LATEST) == []


def test_tags_never_checked_digest_references_and_unnamed_images_are_not_compared() -> None:
    assert find([running("registry.test/other:v1")], LATEST) == []
    assert find([running(f"registry.test/app@{NEW[:7]}{'3' * 64}")], LATEST) == []
    assert find([running("")], LATEST) == []
    assert find([running("Not A Reference!")], LATEST) == []


def test_an_image_the_node_no_longer_knows_a_digest_for_shows_its_id() -> None:
    [behind] = find([running("registry.test/app:v1", digests=())], LATEST)
    assert behind.runs == "sha256:" + "c" * 64


def test_without_the_image_from_the_runtime_the_pull_answered_with_its_digest_names_it() -> None:
    known = Known(latest=LATEST.latest, pulled_as={OLD: "registry.test/app:v1"})
    [behind] = find([running("")], known)
    assert behind.reference == "registry.test/app:v1"
    assert find([running("", digests=("sha256:" + "9" * 64,))], known) == []
