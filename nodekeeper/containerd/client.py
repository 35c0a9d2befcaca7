"""The only code that talks to containerd: its CRI image service, native images API,
content store (reads, and dropping failed downloads) and image events, and what
containerd's refusals of a pull mean (`classify_pull_error`).

One gRPC channel to containerd's socket, shared by every call. The channel reconnects by
itself with a short back-off, so containerd may start after nodekeeper, or restart under
it, and the next call after it is back succeeds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from nodekeeper import logs, metrics
from nodekeeper._proto import containerd_content_pb2 as ctdcontent
from nodekeeper._proto import containerd_events_pb2 as ctdevents
from nodekeeper._proto import containerd_images_pb2 as ctdimg
from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.containerd.presence import Presence
from nodekeeper.errors import ContainerdError, ContainerdRefusedPull, ContainerdUnavailable
from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.values import NodeCopy

# The kubelet's own limit; a ListImages answer for a very full node can be large.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CRI_SERVICE = cri.DESCRIPTOR.services_by_name["ImageService"].full_name
IMAGES_SERVICE = "containerd.services.images.v1.Images"
CONTENT_SERVICE = "containerd.services.content.v1.Content"
CONTENT_READ = f"/{CONTENT_SERVICE}/Read"
EVENTS_SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"
# containerd registers a subscription as soon as the request arrives, but says nothing back
# until the first event; names are kept only once the stream has stood this long.
SUBSCRIBE_SETTLE_SECONDS = 0.5
RESUBSCRIBE_SECONDS = 1.0

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # containerd restarting should cost the kubelet about a second, not gRPC's default
    # back-off of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# How containerd words the failures of a pull (it answers them all as UNKNOWN, but for
# NOT_FOUND), to classify them like a probe's. First match wins.
_PULL_ERRORS = (
    (Kind.RATE_LIMITED, re.compile(r"\b429\b|too many requests", re.I)),
    (Kind.UNAUTHORIZED, re.compile(r"\b40[13]\b|unauthorized|forbidden|pull access denied|"
                                   r"authorization failed|insufficient_scope", re.I)),
    (Kind.NOT_FOUND, re.compile(r"\bnot found\b|\b404\b", re.I)),
    (Kind.SERVER_ERROR, re.compile(r"\b5\d\d\b", re.I)),
    (Kind.TIMEOUT, re.compile(r"i/o timeout|deadline exceeded|timeout awaiting", re.I)),
    (Kind.UNREACHABLE, re.compile(r"connection refused|no such host|dial tcp|EOF|"
                                  r"connection reset|network is unreachable|"
                                  r"no route to host|tls:|x509:", re.I)),
    (Kind.INVALID, re.compile(r"unexpected media type|invalid|digest|mismatch|"
                              r"unexpected commit|failed precondition", re.I)),
)
_DIGESTS = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")

_log = logs.get("containerd")


def classify_pull_error(error: ContainerdError) -> Kind:
    """The failure kind of containerd's answer to a pull."""
    if error.code == "NOT_FOUND":
        return Kind.NOT_FOUND
    if error.code == "FAILED_PRECONDITION":  # content that does not match its digest
        return Kind.INVALID
    for kind, pattern in _PULL_ERRORS:
        if pattern.search(error.message):
            return kind
    return Kind.SERVER_ERROR


class Containerd:
    """A connection to one containerd. Create it inside the running event loop."""

    def __init__(self, address: str, namespace: str = "k8s.io") -> None:
        self.address = address
        self.namespace = namespace
        self._channel = grpc.aio.insecure_channel(f"unix://{address}", options=CHANNEL_OPTIONS)
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self.presence = Presence()

    def _method(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        method = self._methods.get(path)
        if method is None:
            # No serializers: requests and answers travel as the bytes they arrived as,
            # so fields nodekeeper does not know still reach containerd unchanged.
            method = self._channel.unary_unary(path)
            self._methods[path] = method
        return method

    async def call(
        self,
        path: str,
        request: bytes,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> bytes:
        """Send raw request bytes to `path`; return the raw answer or raise ContainerdError."""
        try:
            return await self._method(path)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.aio.AioRpcError) -> ContainerdError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return ContainerdUnavailable(self.address, details)
        return ContainerdError(code.name, details)

    async def cri(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        return await self.call(f"/{CRI_SERVICE}/{method}", request, timeout)

    async def cri_stream(self, method: str, request: bytes,
                         timeout: float | None = None) -> AsyncIterator[bytes]:
        """A server-streaming CRI call: each answer as the raw bytes containerd sent it;
        ContainerdError when the stream fails, after the answers that came before."""
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self._channel.unary_stream(
            f"/{CRI_SERVICE}/{method}")
        call = stream(request, timeout=timeout)
        try:
            async for answer in call:
                yield answer
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()  # the kubelet gone mid-stream: containerd stops sending too

    async def images(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Call the native images API in our namespace (where the CRI plugin keeps images)."""
        metadata = (("containerd-namespace", self.namespace),)
        return await self.call(f"/{IMAGES_SERVICE}/{method}", request, timeout, metadata)

    async def content(self, method: str, request: bytes) -> bytes:
        metadata = (("containerd-namespace", self.namespace),)
        return await self.call(f"/{CONTENT_SERVICE}/{method}", request, None, metadata)

    async def content_size(self, digest: str) -> int | None:
        """The size of `digest` in the content store (None when it is not there)."""
        try:
            answer = await self.content("Info", ctdcontent.InfoRequest(digest=digest)
                                        .SerializeToString())
        except ContainerdError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise
        return int(ctdcontent.InfoResponse.FromString(answer).info.size)

    async def read_content(self, digest: str) -> AsyncGenerator[bytes, None]:
        """The bytes of `digest` from the content store, streamed as containerd sends them
        (pieces of up to 1 MiB; gRPC's flow control holds containerd back while the
        reader is slower). ContainerdError when the read fails."""
        read = self._channel.unary_stream(
            CONTENT_READ, request_serializer=ctdcontent.ReadContentRequest.SerializeToString,
            response_deserializer=ctdcontent.ReadContentResponse.FromString)
        call = read(ctdcontent.ReadContentRequest(digest=digest),
                    metadata=(("containerd-namespace", self.namespace),))
        offset = 0
        try:
            async for piece in call:
                if piece.offset != offset:
                    raise ContainerdError("DATA_LOSS", f"{digest}: a piece at offset "
                                                       f"{piece.offset}, {offset} expected")
                offset += len(piece.data)
                yield piece.data
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def discard(self, digests: Sequence[str]) -> int:
        """Abort the downloads in progress (ingests) of `digests`: after a pull fails on
        content that does not match its digest, containerd 1.7 and 2.x keep the bad bytes
        and commit them again on the next pull of the same digest, from any registry.
        Returns how many were aborted."""
        wanted = set(digests)
        answer = await self.content("ListStatuses", ctdcontent.ListStatusesRequest()
                                    .SerializeToString())
        aborted = 0
        for status in ctdcontent.ListStatusesResponse.FromString(answer).statuses:
            named = {status.expected} | {part for part in status.ref.split("-", 1)[1:]}
            if wanted & named:
                try:
                    await self.content("Abort", ctdcontent.AbortRequest(ref=status.ref)
                                       .SerializeToString())
                except ContainerdError as exc:
                    if exc.code != "NOT_FOUND":  # finished or aborted meanwhile
                        raise
                else:
                    aborted += 1
        return aborted

    async def image_id(self, name: str) -> str:
        """The ID of the image containerd holds under `name` ('' when none)."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=name)).SerializeToString()
        answer = await self.cri("ImageStatus", request)
        return str(cri.ImageStatusResponse.FromString(answer).image.id)

    def known_image_id(self, name: str) -> str:
        """The image ID image events vouch for under `name` ('' when containerd must be
        asked): see presence.py beside this module."""
        return self.presence.image_id(name)

    async def held_image_id(self, name: str) -> str:
        """image_id(), answered from what image events have kept true where possible."""
        known = self.known_image_id(name)
        if known:
            return known
        generation = self.presence.generation
        image_id = await self.image_id(name)
        self.presence.learn(name, image_id, generation)
        return image_id

    async def node_copy(self, name: str) -> NodeCopy | None:
        """What containerd holds under `name` (a normalized reference), if anything."""
        image_id, digest = await asyncio.gather(self.image_id(name), self.target_digest(name))
        return NodeCopy(image_id, digest) if image_id else None

    async def target_digest(self, name: str) -> str:
        """The digest an image record points at ('' when there is no such record)."""
        request = ctdimg.GetImageRequest(name=name).SerializeToString()
        try:
            answer = await self.images("Get", request)
        except ContainerdError as exc:
            if exc.code == "NOT_FOUND":
                return ""
            raise
        return str(ctdimg.GetImageResponse.FromString(answer).image.target.digest)

    async def pull(self, original: object, name: str | None = None,
                   credentials: Credentials | None = None) -> str:
        """Forward the PullImageRequest bytes `original` as they came; or, with `name`,
        pull that name (another registry's for the same content) with `credentials`
        instead, keeping every other field of the request (annotations, runtime handler,
        sandbox config). Returns the image ID containerd answers; ContainerdRefusedPull on
        refusal."""
        assert isinstance(original, bytes)
        request = original
        if name is not None:
            rewritten = cri.PullImageRequest.FromString(original)
            rewritten.image.image = name
            rewritten.ClearField("auth")
            if credentials is not None and credentials.username:
                rewritten.auth.username = credentials.username
                rewritten.auth.password = credentials.password
            request = rewritten.SerializeToString()
        try:
            answer = await self.cri("PullImage", request)
        except ContainerdUnavailable:
            raise
        except ContainerdError as exc:
            named = tuple(dict.fromkeys(_DIGESTS.findall(exc.message)))
            raise ContainerdRefusedPull(classify_pull_error(exc), exc, named) from None
        return str(cri.PullImageResponse.FromString(answer).image_ref)

    async def alias(self, source: str, names: Sequence[str]) -> None:
        """Record `names` for the content the image record `source` points at, as if they
        had been pulled under those names; then drop `source` itself."""
        answer = await self.images("Get", ctdimg.GetImageRequest(name=source).SerializeToString())
        found = ctdimg.GetImageResponse.FromString(answer).image
        for name in names:
            image = ctdimg.Image(name=name, labels=found.labels, target=found.target)
            try:
                await self.images("Create", ctdimg.CreateImageRequest(image=image)
                                  .SerializeToString())
            except ContainerdError as exc:
                if exc.code != "ALREADY_EXISTS":
                    raise
                await self.images("Update", ctdimg.UpdateImageRequest(image=image)
                                  .SerializeToString())
        if source not in names:
            await self.images("Delete", ctdimg.DeleteImageRequest(name=source)
                              .SerializeToString())

    async def wait_visible(self, name: str, timeout: float = 2.0) -> bool:
        """The CRI plugin learns of native records through events, a few ms later; the
        kubelet asks ImageStatus right after PullImage, so wait until it answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.image_id(name):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)

    async def watch(self, on_change: Callable[[bool], None]) -> None:
        """Log, once per episode, when containerd becomes reachable or stops being so.

        Runs until cancelled. The channel only tries to connect when asked, so this asks
        once per state change, never in a loop of its own.
        """
        reachable: bool | None = None
        state = self._channel.get_state(try_to_connect=True)
        while True:
            now = {grpc.ChannelConnectivity.READY: True,
                   grpc.ChannelConnectivity.TRANSIENT_FAILURE: False}.get(state, reachable)
            if now is not None and now != reachable:
                if now:
                    _log.info("containerd reachable", address=self.address)
                else:
                    _log.warning("containerd unreachable; calls fail with UNAVAILABLE until "
                                 "it is back", address=self.address)
                reachable = now
                on_change(now)
            await self._channel.wait_for_state_change(state)
            state = self._channel.get_state(try_to_connect=True)

    async def follow_images(self) -> None:
        """Keep `presence` true by following the image events of our namespace.

        Runs until cancelled. While the stream is down, presence keeps nothing, so every
        answer asks containerd. containerd itself down is logged by watch(); any other
        failure of the stream is logged once, until it is back.
        """
        loop = asyncio.get_running_loop()
        subscribe = self._channel.unary_stream(
            EVENTS_SUBSCRIBE, request_serializer=ctdevents.SubscribeRequest.SerializeToString,
            response_deserializer=ctdevents.Envelope.FromString)
        request = ctdevents.SubscribeRequest(
            filters=[f'namespace=="{self.namespace}",topic~="^/images/"'])
        complained = False

        def following() -> None:
            nonlocal complained
            complained = False
            self.presence.follow(True)
            metrics.IMAGE_EVENTS.set(1)
            _log.info("following containerd's image events", namespace=self.namespace)

        while True:
            stream = subscribe(request)
            settled = loop.call_later(SUBSCRIBE_SETTLE_SECONDS, following)
            try:
                async for envelope in stream:
                    try:
                        name = ctdevents.ImageEvent.FromString(envelope.event.value).name
                    except DecodeError:
                        self.presence.follow(True)  # some name changed: forget them all
                    else:
                        self.presence.changed(name)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE and not complained:
                    complained = True
                    _log.warning("containerd's image events are not available; every pull "
                                 "asks containerd until they are", code=exc.code().name,
                                 error=exc.details())
            finally:
                settled.cancel()
                self.presence.follow(False)
                metrics.IMAGE_EVENTS.set(0)
                stream.cancel()
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    async def close(self) -> None:
        await self._channel.close()

