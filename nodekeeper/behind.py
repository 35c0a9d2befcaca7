"""Which running containers are behind their tag: pure, no I/O.

A container is behind when the tag it was started from (the image as the pod names it)
has a newer digest than the one it runs, as far as nodekeeper's own checks upstream know:
nothing here asks a registry. The kubelet pulls only when a container starts, so a pod
keeps its build until it restarts, whatever the tag has become since.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodekeeper.pull.reference import InvalidReference, parse


@dataclass(frozen=True, kw_only=True)
class Running:
    """A running container as the runtime describes it."""

    container_id: str
    container: str  # its name in the pod
    pod: str
    namespace: str
    pod_uid: str
    image: str  # as the pod names it ('' when the runtime does not say)
    image_id: str  # the image it runs (config digest)
    digests: tuple[str, ...]  # manifest or index digests the node knows that image by
    started_at: float  # Unix seconds


@dataclass(frozen=True, kw_only=True)
class Latest:
    """The latest digest nodekeeper's checks learned for a tag, and since when."""

    digest: str
    since: float


@dataclass(frozen=True, kw_only=True)
class Known:
    """What nodekeeper's state knows of tags: by normalized reference, the latest digest;
    by digest, the image a pull it answered with that digest named (for runtimes that do
    not say which image a container was started from: containerd before 2.0)."""

    latest: Mapping[str, Latest]
    pulled_as: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class Behind:
    running: Running
    reference: str  # the tag, normalized
    runs: str  # the digest it runs (its image ID when the node no longer knows a digest)
    latest: Latest


def find(running: Iterable[Running], known: Known) -> list[Behind]:
    """The containers whose image is not the latest digest known for their tag, in the
    order given. Containers started by digest, or from a tag never checked, are not."""
    found = []
    for container in running:
        image = container.image or next(
            (known.pulled_as[d] for d in container.digests if d in known.pulled_as), "")
        if not image:
            continue
        try:
            ref = parse(image)
        except InvalidReference:
            continue
        if ref.digest:
            continue
        latest = known.latest.get(str(ref))
        if latest is None or not latest.digest or latest.digest in container.digests:
            continue
        runs = container.digests[0] if container.digests else container.image_id
        found.append(Behind(running=container, reference=str(ref), runs=runs, latest=latest))
    return found
