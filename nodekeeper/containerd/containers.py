"""The containers running on the node, through the CRI runtime service on containerd's
socket (ListContainers), with the digests the node knows their images by.

The pod's name and namespace come from the labels the kubelet sets on every container;
the image as the pod names it from ImageSpec.user_specified_image, which the kubelet sends
and containerd 2.x keeps (1.6 and 1.7 drop it: behind.py then goes by the pulls nodekeeper
answered with the container's digest). Read-only: nothing here changes a container.
"""

from __future__ import annotations

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper._proto import cri_runtime_pb2 as runtime
from nodekeeper.behind import Running
from nodekeeper.containerd.client import Containerd

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"


async def running(containerd: Containerd, timeout: float = 10.0) -> list[Running]:
    """Every running container, oldest first."""
    request = runtime.ListContainersRequest(filter=runtime.ContainerFilter(
        state=runtime.ContainerStateValue(state=runtime.CONTAINER_RUNNING)))
    answer = runtime.ListContainersResponse.FromString(await containerd.call(
        f"/{RUNTIME_SERVICE}/ListContainers", request.SerializeToString(), timeout))
    digests: dict[str, tuple[str, ...]] = {}
    found = []
    for container in sorted(answer.containers, key=lambda c: c.created_at):
        image_id = container.image_ref or container.image.image
        if image_id not in digests:
            digests[image_id] = await _digests(containerd, image_id, timeout)
        found.append(Running(
            container_id=container.id, container=container.metadata.name,
            pod=container.labels.get(POD_NAME, ""),
            namespace=container.labels.get(POD_NAMESPACE, ""),
            pod_uid=container.labels.get(POD_UID, ""),
            image=container.image.user_specified_image, image_id=image_id,
            digests=digests[image_id], started_at=container.created_at / 1e9))
    return found


async def _digests(containerd: Containerd, image_id: str, timeout: float) -> tuple[str, ...]:
    """The manifest or index digests containerd records for an image (its repo digests,
    `name@sha256:...`); none when the image is gone from the node."""
    request = cri.ImageStatusRequest(image=cri.ImageSpec(image=image_id))
    answer = cri.ImageStatusResponse.FromString(
        await containerd.cri("ImageStatus", request.SerializeToString(), timeout))
    return tuple(dict.fromkeys(repo.rpartition("@")[2] for repo in answer.image.repo_digests))
