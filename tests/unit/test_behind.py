"""Containers behind their tag: compared with what checks learned, never a registry."""

from __future__ import annotations

import asyncio
from typing import Any

from nodekeeper.behind import Known, Latest, Running, find
from nodekeeper.host.behindtag import tell
from nodekeeper.kube.events import Events
from nodekeeper.pull.edges import Decision

OLD, NEW = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def running(image: str, digests: tuple[str, ...] = (OLD,), **fields: str) -> Running:
    values = {"container_id": "c1", "container": "app", "pod": "web-0",
              "namespace": "shop", "pod_uid": "u-1", "image_id": "sha256:" + "c" * 64, **fields}
    return Running(image=image, digests=digests, started_at=100.0, **values)


LATEST = Known(latest={"registry.test/app:v1": Latest(digest=NEW, since=200.0)},
               pulled_as={})


def test_a_container_on_an_older_digest_than_its_tag_is_behind() -> None:
    [behind] = find([running("registry.test/app:v1")], LATEST)
    assert behind.reference == "registry.test/app:v1"
    assert behind.runs == OLD
    assert behind.latest.digest == NEW


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


class Sink:
    """Records what Events posts."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    async def prepare(self) -> None:
        pass

    async def create(self, namespace: str, event: dict[str, Any]) -> None:
        self.created.append(event)

    async def patch(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        raise AssertionError("one container and digest make one Event")

    async def close(self) -> None:
        pass


async def test_the_pod_is_told_once_when_behind_is_an_event_decision() -> None:
    sink = Sink()
    events = Events("node-a", (), sink, behind=True)
    await events.start()
    [behind] = find([running("registry.test/app:v1")], LATEST)
    tell(events, behind)
    for _ in range(500):
        if sink.created and events.pending == 0:
            break
        await asyncio.sleep(0.002)
    await events.close()
    [event] = sink.created
    assert (event["reason"], event["type"]) == ("ImageBehindTag", "Normal")
    assert event["involvedObject"]["name"] == "web-0"
    assert event["involvedObject"]["uid"] == "u-1"
    assert event["message"] == (f"runs {OLD}; the tag registry.test/app:v1 is {NEW} since "
                                "1970-01-01T00:03:20Z; restart the pod to run it")


async def test_no_event_unless_behind_is_an_event_decision() -> None:
    sink = Sink()
    events = Events("node-a", (Decision.FALLBACK,), sink)
    await events.start()
    [behind] = find([running("registry.test/app:v1")], LATEST)
    tell(events, behind)
    assert events.pending == 0
    await events.close()
    assert sink.created == []
