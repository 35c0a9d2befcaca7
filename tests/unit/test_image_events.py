"""Containerd.follow_images against a stand-in events service: names are kept only while
the stream stands, each event forgets its name, and a missing service is said once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from nodekeeper import logs
from nodekeeper._proto import containerd_events_pb2 as ctdevents
from nodekeeper.containerd import client as containerd_module
from nodekeeper.containerd.client import EVENTS_SUBSCRIBE, Containerd

ID = "sha256:" + "a" * 64


class Events(grpc.GenericRpcHandler):
    """Subscribe streams what is put in `queue` (None ends the stream); with `refuse`, it
    fails at once with that code."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ctdevents.Envelope | None] = asyncio.Queue()
        self.refuse: grpc.StatusCode | None = None
        self.subscriptions: list[ctdevents.SubscribeRequest] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != EVENTS_SUBSCRIBE:  # type: ignore[attr-defined]
            return None

        async def subscribe(request: ctdevents.SubscribeRequest,
                            context: grpc.aio.ServicerContext[object, object]
                            ) -> AsyncIterator[ctdevents.Envelope]:
            self.subscriptions.append(request)
            if self.refuse is not None:
                await context.abort(self.refuse, "no events here")
            while (envelope := await self.queue.get()) is not None:
                yield envelope

        return grpc.unary_stream_rpc_method_handler(
            subscribe, request_deserializer=ctdevents.SubscribeRequest.FromString,
            response_serializer=ctdevents.Envelope.SerializeToString)


def image_event(name: str, topic: str = "/images/delete") -> ctdevents.Envelope:
    envelope = ctdevents.Envelope(namespace="k8s.io", topic=topic)
    envelope.event.type_url = "containerd.services.images.v1.ImageDelete"
    envelope.event.value = ctdevents.ImageEvent(name=name).SerializeToString()
    return envelope


@contextlib.asynccontextmanager
async def following(containerd: Containerd, live: bool = True) -> AsyncIterator[None]:
    """follow_images running in a task (stream up, with `live`) for the body of the with."""
    follower = asyncio.create_task(containerd.follow_images())
    try:
        if live:
            await eventually(lambda: containerd.presence.live)
        yield
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    assert not containerd.presence.live


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


@pytest.fixture
async def events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[Events, Containerd, io.StringIO]]:
    monkeypatch.setattr(containerd_module, "SUBSCRIBE_SETTLE_SECONDS", 0.01)
    monkeypatch.setattr(containerd_module, "RESUBSCRIBE_SECONDS", 0.01)
    log = io.StringIO()
    logs.setup("info", "json", log)
    service = Events()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service,))
    server.add_insecure_port(f"unix://{tmp_path}/containerd.sock")
    await server.start()
    containerd = Containerd(f"{tmp_path}/containerd.sock")
    yield service, containerd, log
    await server.stop(0)
    await containerd.close()
    logs.setup()


async def test_events_forget_their_names_and_the_stream_end_forgets_all(
    events: tuple[Events, Containerd, io.StringIO],
) -> None:
    service, containerd, _ = events
    presence = containerd.presence
    async with following(containerd):
        # Settled is a guess that containerd has the subscription: here, it is known.
        await eventually(lambda: len(service.subscriptions) == 1)
        assert [list(s.filters) for s in service.subscriptions] == [
            ['namespace=="k8s.io",topic~="^/images/"']]
        for name in ("r/a:1", "r/b:1"):
            presence.learn(name, ID, presence.generation)
        await service.queue.put(image_event("r/a:1"))
        await eventually(lambda: presence.image_id("r/a:1") == "")
        assert presence.image_id("r/b:1") == ID

        await service.queue.put(None)  # containerd ends the stream (a restart)
        await eventually(lambda: not presence.live)
        assert presence.image_id("r/b:1") == ""
        await eventually(lambda: presence.live)  # subscribed again by itself
        await eventually(lambda: len(service.subscriptions) == 2)


async def test_an_undecodable_event_forgets_everything(
    events: tuple[Events, Containerd, io.StringIO],
) -> None:
    service, containerd, _ = events
    presence = containerd.presence
    async with following(containerd):
        presence.learn("r/a:1", ID, presence.generation)
        garbled = image_event("r/a:1")
        garbled.event.value = b"\xff\xff\xff"
        await service.queue.put(garbled)
        await eventually(lambda: len(presence) == 0)
        assert presence.live


async def test_no_events_service_keeps_nothing_and_says_so_once(
    events: tuple[Events, Containerd, io.StringIO],
) -> None:
    service, containerd, log = events
    service.refuse = grpc.StatusCode.UNIMPLEMENTED
    async with following(containerd, live=False):
        await eventually(lambda: len(service.subscriptions) >= 4)
        assert not containerd.presence.live
        containerd.presence.learn("r/a:1", ID, containerd.presence.generation)
        assert containerd.presence.image_id("r/a:1") == ""
    warnings = [json.loads(line) for line in log.getvalue().splitlines()
                if '"warning"' in line]
    assert [w["code"] for w in warnings] == ["UNIMPLEMENTED"]
    assert "not available" in warnings[0]["event"]
