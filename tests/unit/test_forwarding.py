"""Forwarding, checked byte for byte against a recording stand-in for containerd.

The integration tier compares nodekeeper with a real containerd; here a fake upstream
lets us see exactly what arrives on containerd's side: the bytes, the deadline, a
cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from structlog.testing import capture_logs

from nodekeeper import metrics
from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.containerd.client import CHANNEL_OPTIONS, Containerd
from nodekeeper.cri import ImageService
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.policy import parse as parse_policy
from nodekeeper.pull.puller import Puller
from nodekeeper.registry import Hosts, Prober, Session
from nodekeeper.settings import Document
from nodekeeper.state.memory import State

DIGEST_REF = "docker.io/library/nginx@sha256:" + "b" * 64


@dataclass
class Upstream:
    """Records each call; answers with `answer`, or fails with `fail`, after `delay`.
    StreamImages, a server-streaming call, answers each of `stream` in turn, then `fail`."""

    received: list[tuple[str, bytes, float | None]] = field(default_factory=list)
    answer: bytes = b""
    stream: list[bytes] = field(default_factory=list)
    fail: tuple[grpc.StatusCode, str] | None = None
    delay: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def calls(self, rpc: str) -> list[tuple[str, bytes, float | None]]:
        return [call for call in self.received if call[0].endswith(f"/{rpc}")]

    def handler(self) -> grpc.GenericRpcHandler:
        upstream = self

        class Generic(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method = details.method  # type: ignore[attr-defined]

                async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                                 ) -> bytes:
                    upstream.received.append((method, request, context.time_remaining()))
                    upstream.arrived.set()
                    try:
                        await asyncio.sleep(upstream.delay)
                    except asyncio.CancelledError:
                        upstream.cancelled.set()
                        raise
                    if upstream.fail:
                        await context.abort(*upstream.fail)
                    return upstream.answer

                async def handle_stream(request: bytes,
                                        context: grpc.aio.ServicerContext[bytes, bytes]
                                        ) -> AsyncIterator[bytes]:
                    upstream.received.append((method, request, context.time_remaining()))
                    for answer in upstream.stream:
                        yield answer
                    if upstream.fail:
                        await context.abort(*upstream.fail)

                if method.endswith("/StreamImages"):
                    return grpc.unary_stream_rpc_method_handler(handle_stream)
                return grpc.unary_unary_rpc_method_handler(handle)

        return Generic()


@dataclass
class Pair:
    upstream: Upstream
    channel: grpc.aio.Channel
    service: ImageService
    upstream_address: str

    def method(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(f"/runtime.v1.ImageService/{name}")


@pytest.fixture
def tmp_path(ram_path: Path) -> Path:
    """In memory: nothing here is about the disk (see tests/unit/conftest.py)."""
    return ram_path


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    upstream = Upstream()
    fake = grpc.aio.server()
    fake.add_generic_rpc_handlers((upstream.handler(),))
    fake.add_insecure_port(f"unix://{tmp_path}/containerd.sock")
    await fake.start()
    containerd = Containerd(f"{tmp_path}/containerd.sock")
    service = ImageService(containerd, make_puller(containerd, tmp_path))
    ours = grpc.aio.server(options=CHANNEL_OPTIONS)
    ours.add_generic_rpc_handlers((service.handler(),))
    ours.add_insecure_port(f"unix://{tmp_path}/cri.sock")
    await ours.start()
    channel = grpc.aio.insecure_channel(f"unix://{tmp_path}/cri.sock", options=CHANNEL_OPTIONS)
    yield Pair(upstream, channel, service, f"{tmp_path}/containerd.sock")
    await channel.close()
    await ours.stop(0)
    await containerd.close()
    await fake.stop(0)


def make_puller(containerd: Containerd, tmp_path: Path) -> Puller:
    policy = parse_policy(Document("policy.yaml", "defaults: {update: always}"))
    prober = Prober(Hosts([tmp_path / "certs.d"]), Session())
    return Puller(containerd, prober, State(tmp_path / "state"),
                  lambda: policy)


def with_unknown_field(message: bytes) -> bytes:
    # Field 99, length-delimited: a field from a newer CRI that nodekeeper does not know.
    return message + b"\x9a\x06\x05hello"


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("ImageStatus", cri.ImageStatusRequest(image=cri.ImageSpec(
            image="nginx", annotations={"a": "b"}, runtime_handler="kata"), verbose=True)),
        # A digest reference the node lacks goes straight to containerd.
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec(image=DIGEST_REF))),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image="sha256:" + "a" * 64))),
        ("ListImages", cri.ListImagesRequest()),
        ("ImageFsInfo", cri.ImageFsInfoRequest()),
    ],
)
async def test_request_bytes_reach_containerd_unchanged(pair: Pair, rpc: str,
                                                        request_message: object) -> None:
    raw = with_unknown_field(request_message.SerializeToString())  # type: ignore[attr-defined]
    pair.upstream.answer = with_unknown_field(b"")
    answer = await pair.method(rpc)(raw)
    [(_, received, _)] = pair.upstream.calls(rpc)
    assert received == raw
    if rpc != "PullImage":  # nodekeeper answers PullImage itself, with containerd's image_ref
        assert answer == pair.upstream.answer


async def test_pull_image_auth_reaches_containerd_unchanged(pair: Pair) -> None:
    request = cri.PullImageRequest(
        image=cri.ImageSpec(image=DIGEST_REF),
        auth=cri.AuthConfig(username="u", password="p", server_address="r.example"),
    ).SerializeToString() + b"\x1a\x04\x0a\x02\x08\x01"  # an opaque sandbox_config
    await pair.method("PullImage")(request)
    assert pair.upstream.calls("PullImage")[0][1] == request


async def test_deadline_passes_through(pair: Pair) -> None:
    await pair.method("ImageStatus")(
        cri.ImageStatusRequest(image=cri.ImageSpec(image="x")).SerializeToString(), timeout=7.0)
    remaining = pair.upstream.received[0][2]
    assert remaining is not None
    assert 5.0 < remaining <= 7.05  # gRPC encodes timeouts with a little rounding


async def test_no_deadline_stays_no_deadline(pair: Pair) -> None:
    await pair.method("ListImages")(b"")
    assert pair.upstream.received[0][2] is None


async def test_containerd_status_comes_back_unchanged(pair: Pair) -> None:
    pair.upstream.fail = (grpc.StatusCode.NOT_FOUND, "failed to resolve reference: not found")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pair.method("RemoveImage")(
            cri.RemoveImageRequest(image=cri.ImageSpec(image="x")).SerializeToString())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "failed to resolve reference: not found"


async def test_cancellation_reaches_containerd(pair: Pair) -> None:
    pair.upstream.delay = 30
    call = pair.method("ImageStatus")(
        cri.ImageStatusRequest(image=cri.ImageSpec(image="slow")).SerializeToString())
    await asyncio.wait_for(pair.upstream.arrived.wait(), 5)
    call.cancel()
    await asyncio.wait_for(pair.upstream.cancelled.wait(), 5)
    assert pair.service.inflight == 0


@pytest.mark.parametrize(
    ("rpc", "request_bytes", "message"),
    [
        ("ImageStatus", b"", "ImageStatusRequest has no image"),
        ("PullImage", cri.PullImageRequest(image=cri.ImageSpec()).SerializeToString(),
         "image is empty"),
        ("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(
            image="a" * (1 << 20))).SerializeToString(), "references are at most 4096"),
        ("ImageStatus", b"\xff\xff\xff", "malformed ImageStatusRequest"),
        ("ListImages", b"\x0a\x05\xff", "malformed ListImagesRequest"),
    ],
)
async def test_bad_requests_are_invalid_argument(pair: Pair, rpc: str, request_bytes: bytes,
                                                 message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pair.method(rpc)(request_bytes)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert pair.upstream.received == []


async def test_containerd_missing_is_unavailable_naming_its_socket(tmp_path: Path) -> None:
    containerd = Containerd(f"{tmp_path}/absent.sock")
    service = ImageService(containerd, make_puller(containerd, tmp_path))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    server.add_insecure_port(f"unix://{tmp_path}/cri.sock")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix://{tmp_path}/cri.sock") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/runtime.v1.ImageService/ListImages")(b"", timeout=5)
    await server.stop(0)
    await containerd.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"containerd is unavailable at {tmp_path}/absent.sock" in (caught.value.details() or "")


class RpcCounter:
    """Stands in for the RPC counter (labels rpc and code): what was counted."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], float] = {}
        self._labels = ("", "")

    def labels(self, rpc: str, code: str) -> RpcCounter:
        self._labels = (rpc, code)
        return self

    def inc(self, amount: float = 1) -> None:
        self.counts[self._labels] = self.counts.get(self._labels, 0) + amount


def images_answer(*ids: str) -> bytes:
    answer = cri.StreamImagesResponse(images=[cri.Image(id=i, size=1) for i in ids])
    return with_unknown_field(answer.SerializeToString())


async def test_stream_images_streams_containerds_answers_unchanged(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = RpcCounter()
    monkeypatch.setattr(metrics, "RPCS", counter)
    request = with_unknown_field(cri.StreamImagesRequest(filter=cri.ImageFilter(
        image=cri.ImageSpec(image="registry.example/app:1"))).SerializeToString())
    pair.upstream.stream = [images_answer("sha256:a", "sha256:b"), images_answer("sha256:c"),
                            images_answer("sha256:d", "sha256:e", "sha256:f")]
    with capture_logs() as logged:
        call = pair.channel.unary_stream("/runtime.v1.ImageService/StreamImages")(
            request, timeout=7.0)
        answers = [answer async for answer in call]
    assert answers == pair.upstream.stream  # each answer, in order, byte for byte
    [(_, received, remaining)] = pair.upstream.calls("StreamImages")
    assert received == request
    assert remaining is not None
    assert 5.0 < remaining <= 7.05  # the kubelet's deadline for the whole stream
    [line] = [e for e in logged if e.get("rpc") == "StreamImages"]
    assert (line["event"], line["outcome"], line["code"]) == ("rpc", "ok", "OK")
    assert line["image"] == "registry.example/app:1"
    assert counter.counts == {("StreamImages", "OK"): 1}
    assert pair.service.inflight == 0


@pytest.mark.parametrize("before", [0, 2])
async def test_stream_images_status_comes_back_unchanged(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, before: int
) -> None:
    # containerd before 2.4 answers UNIMPLEMENTED, and the kubelet then uses ListImages:
    # the code must reach it as containerd gave it, after any answers sent before it.
    counter = RpcCounter()
    monkeypatch.setattr(metrics, "RPCS", counter)
    pair.upstream.stream = [images_answer(f"sha256:{n}") for n in range(before)]
    pair.upstream.fail = (grpc.StatusCode.UNIMPLEMENTED,
                          "unknown method StreamImages for service runtime.v1.ImageService")
    call = pair.channel.unary_stream("/runtime.v1.ImageService/StreamImages")(b"")
    answers: list[bytes] = []

    async def drain() -> None:
        async for answer in call:
            answers.append(answer)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain()
    assert answers == pair.upstream.stream
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == pair.upstream.fail[1]
    assert counter.counts == {("StreamImages", "UNIMPLEMENTED"): 1}


async def test_stream_images_bad_request_is_invalid_argument(pair: Pair) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pair.channel.unary_stream("/runtime.v1.ImageService/StreamImages")(
            b"\x0a\x05\xff").read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed StreamImagesRequest" in (caught.value.details() or "")
    assert pair.upstream.received == []


async def test_a_pull_under_another_name_keeps_every_other_field(pair: Pair) -> None:
    # Backing's copy is pulled with the pod's own request: annotations, runtime handler and
    # sandbox config (containerd picks the snapshotter from it) must all arrive.
    sandbox = b"\x0a\x05\x0a\x03web"  # PodSandboxConfig{metadata{name: "web"}}
    original = with_unknown_field(cri.PullImageRequest(
        image=cri.ImageSpec(image="registry.example/team/app:1", annotations={"a": "b"},
                            runtime_handler="kata"),
        auth=cri.AuthConfig(username="pod-user", password="pod-secret"),
    ).SerializeToString() + b"\x1a" + bytes([len(sandbox)]) + sandbox)
    pair.upstream.answer = cri.PullImageResponse(image_ref="sha256:" + "c" * 64
                                                 ).SerializeToString()
    containerd = Containerd(pair.upstream_address)
    try:
        image_id = await containerd.pull(original, "backing.example/cache/app@sha256:" + "d" * 64,
                                         Credentials("node", "backing-secret"))
    finally:
        await containerd.close()
    assert image_id == "sha256:" + "c" * 64
    [(_, received, _)] = pair.upstream.calls("PullImage")
    sent = cri.PullImageRequest.FromString(received)
    assert sent.image.image == "backing.example/cache/app@sha256:" + "d" * 64
    assert (sent.image.annotations["a"], sent.image.runtime_handler) == ("b", "kata")
    assert (sent.auth.username, sent.auth.password) == ("node", "backing-secret")
    assert sent.sandbox_config.SerializeToString() == sandbox
    assert received.endswith(b"\x9a\x06\x05hello")  # the field nodekeeper does not know
