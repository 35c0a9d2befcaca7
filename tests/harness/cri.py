"""Typed synchronous gRPC clients for a unix socket: the CRI ImageService and containerd's
Images service. There are no generated stubs; methods are called by their full path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from nodekeeper._proto import containerd_images_pb2 as ctdimg
from nodekeeper._proto import cri_image_pb2 as cri

CRI_IMAGE_SERVICE = "runtime.v1.ImageService"
CONTAINERD_IMAGES_SERVICE = "containerd.services.images.v1.Images"
K8S_NAMESPACE = "k8s.io"

_Resp = TypeVar("_Resp", bound=Message)


def unix_target(socket_path: str) -> str:
    """A grpc target for a unix socket path (absolute or relative)."""
    if socket_path.startswith("unix:"):
        return socket_path
    return f"unix://{socket_path}" if socket_path.startswith("/") else f"unix:{socket_path}"


class _UnixClient:
    def __init__(self, socket_path: str, *, timeout: float | None = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(unix_target(socket_path))

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> _UnixClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        path: str,
        request: Message,
        response_type: type[_Resp],
        timeout: float | None,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> _Resp:
        deserialize: Callable[[bytes], _Resp] = response_type.FromString
        method: grpc.UnaryUnaryMultiCallable[Message, _Resp] = self._channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=deserialize,
        )
        result: _Resp = method(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=tuple(metadata) if metadata is not None else None,
        )
        return result


class CriClient(_UnixClient):
    """runtime.v1.ImageService over ``unix://<socket_path>``.

    RPC failures surface as ``grpc.RpcError`` (``.code()``, ``.details()``).
    """

    def __enter__(self) -> CriClient:
        return self

    def _rpc(self, name: str, request: Message, rtype: type[_Resp], timeout: float | None) -> _Resp:
        return self._call(f"/{CRI_IMAGE_SERVICE}/{name}", request, rtype, timeout)

    def pull(
        self,
        image: str,
        auth: cri.AuthConfig | None = None,
        timeout: float | None = None,
        pod: cri.PodSandboxMetadata | None = None,
    ) -> str:
        """PullImage; returns ``image_ref`` (containerd answers with the image ID). With
        ``pod``, the request names the pod as the kubelet's does (sandbox_config)."""
        req = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        if auth is not None:
            req.auth.CopyFrom(auth)
        if pod is not None:
            req.sandbox_config.metadata.CopyFrom(pod)
        return self._rpc("PullImage", req, cri.PullImageResponse, timeout).image_ref


    def pull_or_error(self, image: str, auth: cri.AuthConfig | None = None
                      ) -> str | tuple[grpc.StatusCode, str]:
        """``pull``, or the status code and message it failed with."""
        try:
            return self.pull(image, auth=auth)
        except grpc.RpcError as exc:
            return exc.code(), str(exc.details())
    def status(
        self, image: str, *, verbose: bool = False, timeout: float | None = None
    ) -> cri.ImageStatusResponse:
        """ImageStatus. An unknown image is not an error: ``resp.HasField("image")`` is False."""
        req = cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose)
        return self._rpc("ImageStatus", req, cri.ImageStatusResponse, timeout)

    def list(
        self, filter_image: str | None = None, *, timeout: float | None = None
    ) -> cri.ListImagesResponse:
        req = cri.ListImagesRequest()
        if filter_image is not None:
            req.filter.image.image = filter_image
        return self._rpc("ListImages", req, cri.ListImagesResponse, timeout)

    def stream_images(
        self, filter_image: str | None = None, *, timeout: float | None = None
    ) -> list[cri.StreamImagesResponse]:
        """StreamImages (CRI 1.36, server-streaming): every answer until the stream ends."""
        req = cri.StreamImagesRequest()
        if filter_image is not None:
            req.filter.image.image = filter_image
        method: grpc.UnaryStreamMultiCallable[cri.StreamImagesRequest, cri.StreamImagesResponse]
        method = self._channel.unary_stream(
            f"/{CRI_IMAGE_SERVICE}/StreamImages",
            request_serializer=cri.StreamImagesRequest.SerializeToString,
            response_deserializer=cri.StreamImagesResponse.FromString)
        return list(method(req, timeout=self.timeout if timeout is None else timeout))

    def remove(self, image: str, *, timeout: float | None = None) -> None:
        req = cri.RemoveImageRequest(image=cri.ImageSpec(image=image))
        self._rpc("RemoveImage", req, cri.RemoveImageResponse, timeout)

    def fsinfo(self, *, timeout: float | None = None) -> cri.ImageFsInfoResponse:
        return self._rpc("ImageFsInfo", cri.ImageFsInfoRequest(), cri.ImageFsInfoResponse, timeout)

    def raw(self, method_name: str, request_bytes: bytes, timeout: float | None = None) -> bytes:
        """Send arbitrary bytes to a method and return the raw response bytes.

        ``method_name`` is either a bare name of the ImageService ("PullImage") or a full
        path ("/runtime.v1.ImageService/PullImage", or any other service's method).
        """
        path = method_name if method_name.startswith("/") else f"/{CRI_IMAGE_SERVICE}/{method_name}"
        method: grpc.UnaryUnaryMultiCallable[bytes, bytes]
        method = self._channel.unary_unary(path)  # no (de)serializers: bytes in, bytes out
        result: bytes = method(request_bytes, timeout=self.timeout if timeout is None else timeout)
        return result


class NativeImages(_UnixClient):
    """containerd.services.images.v1.Images in one containerd namespace."""

    def __init__(
        self, socket_path: str, namespace: str = K8S_NAMESPACE, *, timeout: float | None = 30.0
    ) -> None:
        super().__init__(socket_path, timeout=timeout)
        self.namespace = namespace

    def __enter__(self) -> NativeImages:
        return self

    def _rpc(self, name: str, request: Message, rtype: type[_Resp], timeout: float | None) -> _Resp:
        metadata: list[tuple[str, str | bytes]] = [("containerd-namespace", self.namespace)]
        return self._call(f"/{CONTAINERD_IMAGES_SERVICE}/{name}", request, rtype, timeout, metadata)

    def get(self, name: str, *, timeout: float | None = None) -> ctdimg.Image:
        """Get; a missing name raises ``grpc.RpcError`` with ``StatusCode.NOT_FOUND``."""
        resp = self._rpc("Get", ctdimg.GetImageRequest(name=name), ctdimg.GetImageResponse, timeout)
        return resp.image

    def list(
        self, filters: Iterable[str] = (), *, timeout: float | None = None
    ) -> list[ctdimg.Image]:
        req = ctdimg.ListImagesRequest(filters=list(filters))
        return list(self._rpc("List", req, ctdimg.ListImagesResponse, timeout).images)

    def create(self, image: ctdimg.Image, *, timeout: float | None = None) -> ctdimg.Image:
        req = ctdimg.CreateImageRequest(image=image)
        return self._rpc("Create", req, ctdimg.CreateImageResponse, timeout).image

    def update(
        self,
        image: ctdimg.Image,
        fields: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> ctdimg.Image:
        """Update; ``fields`` is the update mask (e.g. ["target"]), None updates everything."""
        req = ctdimg.UpdateImageRequest(image=image)
        if fields is not None:
            req.update_mask.paths.extend(fields)
        return self._rpc("Update", req, ctdimg.UpdateImageResponse, timeout).image

    def delete(self, name: str, *, sync: bool = False, timeout: float | None = None) -> None:
        self._rpc("Delete", ctdimg.DeleteImageRequest(name=name, sync=sync), Empty, timeout)


def descriptor(media_type: str, digest: str, size: int) -> ctdimg.Descriptor:
    return ctdimg.Descriptor(media_type=media_type, digest=digest, size=size)
