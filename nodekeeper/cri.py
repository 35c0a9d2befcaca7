"""The kubelet's side: runtime.v1.ImageService served over gRPC.

Requests arrive as raw bytes and, unless nodekeeper decides on them, leave for containerd
as the same bytes: fields nodekeeper does not know pass through untouched, and nothing is
re-serialized on the hot path. Each RPC is parsed only to validate it and to name the
image in its log line.

`_instrument` and `_instrument_stream` wrap every RPC (`_accounting` does the work for
both): one canonical log line, metrics, and the single mapping from nodekeeper's errors to
gRPC status codes (`_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from nodekeeper import logs, metrics
from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.errors import ContainerdError, NodekeeperError, PullFailed, RequestError
from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.edges import Pod
from nodekeeper.pull.puller import Puller, PullRequest

CRI_SERVICE = cri.DESCRIPTOR.services_by_name["ImageService"].full_name  # runtime.v1.ImageService

# No valid reference comes near this (a name is at most 255 characters, a tag 128, a
# digest about 135); anything longer is refused before it costs containerd a lookup.
MAX_REFERENCE_BYTES = 4096

# Calls the kubelet makes constantly are logged at debug; calls that change the node at info.
_QUIET_RPCS = frozenset({"ImageStatus", "ListImages", "StreamImages", "ImageFsInfo"})

Fields = dict[str, Any]
Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes], Fields], Awaitable[bytes]]
StreamHandler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes], Fields],
                         AsyncIterator[bytes]]

_log = logs.get("cri")


def _parse(message: type[Message], data: bytes) -> Any:
    try:
        return message.FromString(data)
    except DecodeError as exc:
        raise RequestError(f"malformed {message.DESCRIPTOR.name}: {exc}") from None


def _image_of(request: Any, fields: Fields) -> str:
    """The image reference a request names, checked for presence and size."""
    kind = type(request).DESCRIPTOR.name
    if not request.HasField("image"):
        raise RequestError(f"{kind} has no image (ImageSpec)")
    image: str = request.image.image
    if not image:
        raise RequestError(f"{kind}: image is empty")
    if len(image) > MAX_REFERENCE_BYTES:
        raise RequestError(
            f"{kind}: image reference is {len(image)} bytes long; "
            f"references are at most {MAX_REFERENCE_BYTES}"
        )
    fields["image"] = image
    return image


class Containerd(Protocol):  # containerd.Containerd
    async def cri(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Forward a CRI image service request's bytes; containerd's answer's bytes."""

    def cri_stream(self, method: str, request: bytes,
                   timeout: float | None = None) -> AsyncIterator[bytes]:
        """Forward a server-streaming CRI request's bytes; containerd's answers' bytes."""


@dataclass
class _Outcome:
    """How an RPC ended, as `_accounting` saw it: the status code the kubelet gets."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


class ImageService:
    """Serves the kubelet: PullImage goes to the puller, everything else to containerd."""

    def __init__(self, containerd: Containerd, puller: Puller) -> None:
        self._containerd = containerd
        self._puller = puller
        self.inflight = 0
        self.cancelled = 0

    def handler(self) -> grpc.GenericRpcHandler:
        rpcs: dict[str, Handler] = {
            "ListImages": self._list_images,
            "ImageStatus": self._image_status,
            "PullImage": self._pull_image,
            "RemoveImage": self._remove_image,
            "ImageFsInfo": self._image_fs_info,
        }
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(self._instrument(name, fn))
            for name, fn in rpcs.items()}
        handlers["StreamImages"] = grpc.unary_stream_rpc_method_handler(
            self._instrument_stream("StreamImages", self._stream_images))
        return grpc.method_handlers_generic_handler(CRI_SERVICE, handlers)

    async def _forward(self, rpc: str, request: bytes,
                       context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return await self._containerd.cri(rpc, request, timeout=context.time_remaining())

    async def _list_images(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes],
                           fields: Fields) -> bytes:
        parsed = _parse(cri.ListImagesRequest, request)
        if parsed.filter.image.image:
            fields["image"] = parsed.filter.image.image
        return await self._forward("ListImages", request, context)

    async def _stream_images(self, request: bytes,
                             context: grpc.aio.ServicerContext[bytes, bytes],
                             fields: Fields) -> AsyncIterator[bytes]:
        parsed = _parse(cri.StreamImagesRequest, request)
        if parsed.filter.image.image:
            fields["image"] = parsed.filter.image.image
        async for answer in self._containerd.cri_stream("StreamImages", request,
                                                        timeout=context.time_remaining()):
            yield answer

    async def _image_status(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes],
                            fields: Fields) -> bytes:
        _image_of(_parse(cri.ImageStatusRequest, request), fields)
        return await self._forward("ImageStatus", request, context)

    async def _pull_image(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes],
                          fields: Fields) -> bytes:
        parsed = _parse(cri.PullImageRequest, request)
        image = _image_of(parsed, fields)
        auth = parsed.auth
        credentials = Credentials.from_fields(
            auth.username, auth.password, auth.auth, auth.server_address, auth.identity_token,
            auth.registry_token) if parsed.HasField("auth") else None
        meta = parsed.sandbox_config.metadata
        pod = Pod.of(meta.name, meta.namespace, meta.uid)
        try:
            answer = await self._puller.pull(PullRequest(image, credentials, request, pod))
        except PullFailed as failure:
            fields.update(failure.answer.log_fields())
            raise
        fields.update(answer.log_fields())
        return bytes(cri.PullImageResponse(image_ref=answer.image_id).SerializeToString())

    async def _remove_image(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes],
                            fields: Fields) -> bytes:
        _image_of(_parse(cri.RemoveImageRequest, request), fields)
        return await self._forward("RemoveImage", request, context)

    async def _image_fs_info(self, request: bytes,
                             context: grpc.aio.ServicerContext[bytes, bytes],
                             fields: Fields) -> bytes:
        _parse(cri.ImageFsInfoRequest, request)
        return await self._forward("ImageFsInfo", request, context)

    @contextlib.contextmanager
    def _accounting(self, rpc: str, fields: Fields) -> Iterator[_Outcome]:
        """Around one RPC: counts it in flight, maps an error to the status the kubelet
        gets (the error is absorbed; the caller aborts with `outcome`), and writes the
        canonical log line and the metrics when it ends."""
        started = time.perf_counter()
        outcome = _Outcome()
        self.inflight += 1
        try:
            yield outcome
        except NodekeeperError as exc:
            outcome.code, outcome.message = _status(exc)
            fields["error"] = outcome.message
        except asyncio.CancelledError:
            outcome.code = grpc.StatusCode.CANCELLED
            self.cancelled += 1
            raise
        except Exception as exc:  # a bug: answer INTERNAL, keep serving
            _log.exception("unexpected error", rpc=rpc)
            outcome.code = grpc.StatusCode.INTERNAL
            outcome.message = f"nodekeeper internal error: {exc!r}"
            fields["error"] = outcome.message
        finally:
            self.inflight -= 1
            seconds = time.perf_counter() - started
            metrics.RPCS.labels(rpc, outcome.code.name).inc()
            metrics.RPC_SECONDS.labels(rpc).observe(seconds)
            _canonical_line(rpc, outcome.code, seconds, fields, rpc in _QUIET_RPCS)

    def _instrument(
        self, rpc: str, handler: Handler
    ) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]:
        async def instrumented(request: bytes,
                               context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            fields: Fields = {}
            with self._accounting(rpc, fields) as outcome:
                return await handler(request, context, fields)
            await context.abort(outcome.code, outcome.message)

        return instrumented

    def _instrument_stream(
        self, rpc: str, handler: StreamHandler
    ) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]]:
        async def instrumented(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                               ) -> AsyncIterator[bytes]:
            fields: Fields = {}
            with self._accounting(rpc, fields) as outcome:
                async for answer in handler(request, context, fields):
                    yield answer
            if outcome.code != grpc.StatusCode.OK:
                await context.abort(outcome.code, outcome.message)

        return instrumented


def _status(exc: NodekeeperError) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, PullFailed):
        return _pull_status(exc)
    if isinstance(exc, ContainerdError):
        return _code(exc.code), exc.message
    return grpc.StatusCode.INTERNAL, str(exc)


def _pull_status(failure: PullFailed) -> tuple[grpc.StatusCode, str]:
    """As containerd answers a failed pull (UNKNOWN, or NOT_FOUND for a missing tag), and
    as the kubelet reads it: it takes a reason such as RegistryUnavailable only from the
    start of the message of an UNKNOWN status."""
    if failure.kind is not None and failure.kind.unavailable:
        return grpc.StatusCode.UNKNOWN, f"RegistryUnavailable: {failure.message}"
    if failure.containerd is not None:
        return _code(failure.containerd.code), failure.containerd.message
    if failure.kind is Kind.NOT_FOUND:
        return grpc.StatusCode.NOT_FOUND, failure.message
    return grpc.StatusCode.UNKNOWN, failure.message


def _code(name: str) -> grpc.StatusCode:
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


def _canonical_line(rpc: str, code: grpc.StatusCode, seconds: float, fields: Fields,
                    quiet: bool) -> None:
    outcome = {grpc.StatusCode.OK: "ok", grpc.StatusCode.CANCELLED: "cancelled"}.get(code, "error")
    if outcome == "error":
        emit = _log.warning
    elif quiet:
        emit = _log.debug
    else:
        emit = _log.info
    emit("rpc", rpc=rpc, outcome=outcome, code=code.name,
         duration_ms=round(seconds * 1000, 3), **fields)
