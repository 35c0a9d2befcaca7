"""A small client of the CRI RuntimeService (``runtime.v1``): what the kubelet tests need to
watch containers and to remove a stopped kubelet's pods.

nodekeeper itself never speaks the runtime service, so its messages are not generated with
the project's protos: the few used here are declared at import, with the field numbers of
the CRI API's api.proto, in a descriptor pool of their own (fields not declared are skipped
on decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from tests.harness.cri import _UnixClient

RUNTIME_SERVICE = "runtime.v1.RuntimeService"

CONTAINER_STATES = {0: "created", 1: "running", 2: "exited", 3: "unknown"}

_T = descriptor_pb2.FieldDescriptorProto
_STR, _INT64, _INT32, _UINT32, _MSG = (_T.TYPE_STRING, _T.TYPE_INT64, _T.TYPE_INT32,
                                       _T.TYPE_UINT32, _T.TYPE_MESSAGE)
_REPEATED = _T.LABEL_REPEATED

# message name -> [(field, number, type, message type or "", repeated)]
_MESSAGES: dict[str, list[tuple[str, int, int, str, bool]]] = {
    "ImageSpec": [("image", 1, _STR, "", False)],
    "PodSandboxMetadata": [("name", 1, _STR, "", False), ("uid", 2, _STR, "", False),
                           ("namespace", 3, _STR, "", False), ("attempt", 4, _UINT32, "", False)],
    # state is the PodSandboxState enum (0 ready, 1 not ready), read as its varint.
    "PodSandbox": [("id", 1, _STR, "", False), ("metadata", 2, _MSG, "PodSandboxMetadata", False),
                   ("state", 3, _INT32, "", False)],
    "ListPodSandboxRequest": [],
    "ListPodSandboxResponse": [("items", 1, _MSG, "PodSandbox", True)],
    "StopPodSandboxRequest": [("pod_sandbox_id", 1, _STR, "", False)],
    "StopPodSandboxResponse": [],
    "RemovePodSandboxRequest": [("pod_sandbox_id", 1, _STR, "", False)],
    "RemovePodSandboxResponse": [],
    "ContainerMetadata": [("name", 1, _STR, "", False), ("attempt", 2, _UINT32, "", False)],
    "Container": [("id", 1, _STR, "", False), ("pod_sandbox_id", 2, _STR, "", False),
                  ("metadata", 3, _MSG, "ContainerMetadata", False),
                  ("image", 4, _MSG, "ImageSpec", False), ("image_ref", 5, _STR, "", False),
                  ("state", 6, _INT32, "", False), ("created_at", 7, _INT64, "", False)],
    "ListContainersRequest": [],
    "ListContainersResponse": [("containers", 1, _MSG, "Container", True)],
    "StopContainerRequest": [("container_id", 1, _STR, "", False),
                             ("timeout", 2, _INT64, "", False)],
    "StopContainerResponse": [],
    "RemoveContainerRequest": [("container_id", 1, _STR, "", False)],
    "RemoveContainerResponse": [],
}


def _classes() -> dict[str, type[Message]]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="nodekeeper_tests/cri_runtime.proto", package="runtime.v1", syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field, number, kind, type_name, repeated in fields:
            message.field.add(
                name=field, number=number, type=kind,
                label=_REPEATED if repeated else _T.LABEL_OPTIONAL,
                type_name=f".runtime.v1.{type_name}" if type_name else None)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"runtime.v1.{name}"))
            for name in _MESSAGES}


_M = _classes()


@dataclass(frozen=True)
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str
    ready: bool


@dataclass(frozen=True)
class Container:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str
    image_ref: str
    state: str  # created, running, exited, unknown
    created_at_ns: int


class RuntimeClient(_UnixClient):
    """runtime.v1.RuntimeService on containerd's socket."""

    def __enter__(self) -> RuntimeClient:
        return self

    def _rpc(self, name: str, timeout: float | None = None, **fields: Any) -> Any:
        request = _M[f"{name}Request"](**fields)
        return self._call(f"/{RUNTIME_SERVICE}/{name}", request, _M[f"{name}Response"], timeout)

    def sandboxes(self) -> list[Sandbox]:
        return [Sandbox(s.id, s.metadata.name, s.metadata.namespace, s.metadata.uid, s.state == 0)
                for s in self._rpc("ListPodSandbox").items]

    def containers(self) -> list[Container]:
        return [Container(c.id, c.pod_sandbox_id, c.metadata.name, c.metadata.attempt,
                          c.image.image, c.image_ref, CONTAINER_STATES.get(c.state, "unknown"),
                          c.created_at)
                for c in self._rpc("ListContainers").containers]

    def remove_container(self, container_id: str) -> None:
        """Kill (no grace period), then remove one container; its pod sandbox stays."""
        # The request's own field "timeout" (the grace period) is not _rpc's deadline.
        request = _M["StopContainerRequest"](container_id=container_id, timeout=0)
        self._call(f"/{RUNTIME_SERVICE}/StopContainer", request, _M["StopContainerResponse"],
                   None)
        self._rpc("RemoveContainer", container_id=container_id)

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Stop, then remove a pod sandbox with its containers (both idempotent in CRI)."""
        self._rpc("StopPodSandbox", pod_sandbox_id=sandbox_id)
        self._rpc("RemovePodSandbox", pod_sandbox_id=sandbox_id)
