"""Kubernetes Events: wording, aggregation, the queue bound, back-off, against a fake sink.

The real API server is in tests/integration/test_kube_events.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from nodekeeper import metrics
from nodekeeper.config import KubernetesConfig
from nodekeeper.errors import PostFailed
from nodekeeper.failures import Kind
from nodekeeper.kube import events as events_module
from nodekeeper.kube.events import Events, event_name, message
from nodekeeper.kube.kubeconfig import KubeconfigError
from nodekeeper.pull.edges import Answer, Decision, Pod
from tests.fakes import FakeSink, RecordingMetric

NOW = 1_800_000_000.0
DIGEST = "sha256:" + "a" * 64
OLD = "sha256:" + "b" * 64
POD = Pod("web-0", "shop", "1f0c6b2e-7d1a-4c59-9a43-0e6d2b8c5a11")


def served(**changes: Any) -> Answer:
    base = Answer(pod=POD, image="postgres:15", reference="docker.io/library/postgres:15",
                  decision=Decision.FALLBACK, kind=Kind.UNREACHABLE,
                  detail="timeout after 2s", upstream="registry-1.docker.io",
                  digest=DIGEST, node_digest="", last_confirmed=NOW - 3 * 86400)
    return dataclasses.replace(base, **changes)


# -- wording ---------------------------------------------------------------------------


def test_fallback_message() -> None:
    assert message(served(), NOW) == (
        "upstream registry-1.docker.io unreachable (timeout after 2s): started with the "
        f"node's copy of docker.io/library/postgres:15, {DIGEST}, last confirmed 3 days ago")


def test_backing_fallback_and_other_kinds() -> None:
    text = message(served(decision=Decision.BACKING_FALLBACK, kind=Kind.RATE_LIMITED,
                          detail="429 Too Many Requests", last_confirmed=None), NOW)
    assert text == (
        "upstream registry-1.docker.io rate-limiting (429 Too Many Requests): started with the "
        f"backing registry's copy of docker.io/library/postgres:15, {DIGEST}, never confirmed "
        "upstream from this node")
    assert message(served(kind=Kind.TIMEOUT, detail="", upstream=""), NOW)\
        .startswith("upstream not answering: started with the node's copy")


def test_updated_message() -> None:
    text = message(served(decision=Decision.UPDATED, kind=None, detail="",
                          node_digest=OLD), NOW)
    assert text == (f"docker.io/library/postgres:15 updated upstream at registry-1.docker.io: "
                    f"{OLD} -> {DIGEST}")


@pytest.mark.parametrize(("ago", "words"), [
    (-5, "less than a minute ago"), (59, "less than a minute ago"), (60, "1 minute ago"),
    (119, "1 minute ago"), (120, "2 minutes ago"), (3600, "1 hour ago"),
    (86399, "23 hours ago"), (86400, "1 day ago"), (10 * 86400 + 5, "10 days ago"),
])
def test_age_wording(ago: float, words: str) -> None:
    assert message(served(last_confirmed=NOW - ago), NOW).endswith(f"last confirmed {words}")


def test_message_is_bounded() -> None:
    text = message(served(detail="x" * 5000, reference="r" * 2000), NOW)
    assert len(text) <= events_module.MAX_MESSAGE
    assert "x" * (events_module.MAX_DETAIL + 1) not in text


def test_event_name_fits_a_dns_subdomain() -> None:
    assert event_name("web-0", 0x1234) == "web-0.1234"
    long = event_name("a" * 240 + "-b" * 6, time.time_ns())
    assert len(long) <= 253
    assert not long.split(".")[0].endswith("-")


@pytest.mark.parametrize(("name", "namespace", "uid"), [
    ("", "shop", POD.uid), ("web", "", POD.uid), ("web", "shop", ""),
    ("web", "../kube-system", POD.uid), ("web", "shop/x", POD.uid), ("Web", "shop", POD.uid),
    ("web", "shop", "x" * 200), ("web", "shop", "a/b"),
])
def test_pod_of_refuses_what_the_api_server_would(name: str, namespace: str, uid: str) -> None:
    assert Pod.of(name, namespace, uid) is None


# -- the queue -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.wall = NOW
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def dropped_metric(monkeypatch: pytest.MonkeyPatch) -> RecordingMetric:
    recorder = RecordingMetric()
    monkeypatch.setattr(metrics, "KUBE_EVENTS_DROPPED", recorder)
    return recorder


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


MakeEvents = Callable[..., Events]


@pytest.fixture
def make_events(sink: FakeSink, clock: Clock) -> MakeEvents:
    def make(**kwargs: Any) -> Events:
        kwargs.setdefault("sleep", Sleeps())
        decisions = kwargs.pop("decisions", (Decision.FALLBACK, Decision.BACKING_FALLBACK))
        return Events("node-a", decisions, sink, clock=clock.time, monotonic=clock.monotonic,
                      **kwargs)

    return make


async def settle(events: Events, sink: FakeSink, calls: int) -> None:
    """Wait until the worker made `calls` sink calls and has nothing left to post."""
    for _ in range(500):
        if len(sink.calls) >= calls and events.pending == 0:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"calls {sink.calls}, pending {events.pending}")


async def test_the_event_as_posted(make_events: MakeEvents, sink: FakeSink) -> None:
    events = make_events()
    await events.start()
    events.observe(served())
    await settle(events, sink, 1)
    await events.close()
    kind, namespace, body = sink.calls[0]
    assert (kind, namespace) == ("create", "shop")
    assert body["metadata"]["namespace"] == "shop"
    assert body["metadata"]["name"].startswith("web-0.")
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "shop",
                                      "name": "web-0", "uid": POD.uid}
    assert (body["type"], body["reason"], body["count"]) == ("Warning", "ImageFallback", 1)
    assert body["source"] == {"component": "nodekeeper", "host": "node-a"}
    assert (body["reportingComponent"], body["reportingInstance"]) == ("nodekeeper", "node-a")
    assert body["message"] == message(served(), NOW)
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2027-01-15T08:00:00Z"
    assert sink.closed
    assert events.posted["created"] == 1


async def test_decisions_are_a_setting(make_events: MakeEvents, sink: FakeSink) -> None:
    quiet = make_events()
    await quiet.start()
    quiet.observe(served(decision=Decision.UPDATED, kind=None, node_digest=OLD))
    assert quiet.pending == 0
    await quiet.close()
    loud = make_events(decisions=(Decision.UPDATED,))
    await loud.start()
    loud.observe(served(decision=Decision.UPDATED, kind=None, node_digest=OLD))
    loud.observe(served())
    await settle(loud, sink, 1)
    await loud.close()
    assert [(c[2]["reason"], c[2]["type"]) for c in sink.calls] == [("ImageUpdated", "Normal")]


async def test_repeats_are_one_event_with_a_count(make_events: MakeEvents, sink: FakeSink,
                                                  clock: Clock) -> None:
    events = make_events()
    for _ in range(3):  # before the worker runs: counted in place
        events.observe(served())
    assert events.pending == 3
    await events.start()
    await settle(events, sink, 1)
    clock.wall += 7200  # the age in the message moves; the key does not
    events.observe(served())
    events.observe(served())
    await settle(events, sink, 2)
    assert [c[0] for c in sink.calls] == ["create", "patch"]
    assert sink.calls[0][2]["count"] == 3
    name = sink.calls[0][2]["metadata"]["name"]
    stored = sink.stored[name]
    assert stored["count"] == 5
    assert stored["message"].endswith("last confirmed 3 days ago")
    assert stored["lastTimestamp"] == "2027-01-15T10:00:00Z"
    assert stored["firstTimestamp"] == "2027-01-15T08:00:00Z"
    # Another pod, another failure, another outage: each its own Event.
    events.observe(served(pod=Pod("web-1", "shop", "0" * 8)))
    events.observe(served(detail="connection refused"))
    events.observe(served(last_confirmed=NOW - 60))
    await settle(events, sink, 5)
    await events.close()
    assert [c[0] for c in sink.calls] == ["create", "patch", "create", "create", "create"]
    assert len(sink.stored) == 4


async def test_a_repeat_while_posting_is_counted_once(make_events: MakeEvents,
                                                      sink: FakeSink) -> None:
    events = make_events()
    await events.start()
    gate = asyncio.Event()
    original = sink.create

    async def slow_create(namespace: str, event: dict[str, Any]) -> None:
        await gate.wait()
        await original(namespace, event)

    sink.create = slow_create  # type: ignore[method-assign]
    events.observe(served())
    await asyncio.sleep(0.01)
    events.observe(served())  # arrives while the create is in flight
    gate.set()
    await settle(events, sink, 1)
    await events.close()
    (stored,) = sink.stored.values()
    assert stored["count"] == 2
    assert [c[0] for c in sink.calls] == ["create", "patch"]


async def test_an_expired_event_is_posted_anew_with_its_count(make_events: MakeEvents,
                                                             sink: FakeSink) -> None:
    events = make_events()
    await events.start()
    events.observe(served())
    await settle(events, sink, 1)
    sink.stored.clear()  # the API server's event TTL went by
    events.observe(served())
    await settle(events, sink, 3)
    await events.close()
    assert [c[0] for c in sink.calls] == ["create", "patch", "create"]
    (stored,) = sink.stored.values()
    assert stored["count"] == 2


async def test_the_memory_of_posted_events_is_bounded(make_events: MakeEvents, sink: FakeSink,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "REMEMBERED", 2)
    events = make_events()
    await events.start()
    for i in range(3):
        events.observe(served(pod=Pod(f"web-{i}", "shop", f"uid-{i}")))
        await settle(events, sink, i + 1)
    events.observe(served(pod=Pod("web-2", "shop", "uid-2")))  # still remembered
    events.observe(served(pod=Pod("web-0", "shop", "uid-0")))  # forgotten: a new Event
    await settle(events, sink, 5)
    await events.close()
    assert [c[0] for c in sink.calls] == ["create"] * 3 + ["patch", "create"]
    assert len(events._posted) == 2


async def test_observe_is_instant_and_bounded(make_events: MakeEvents, sink: FakeSink,
                                              dropped_metric: RecordingMetric,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "CLOSE_GRACE", 0.05)
    sink.hang = True
    events = make_events(queue=8, timeout=60)
    await events.start()
    with capture_logs() as logged:
        started = time.perf_counter()
        for i in range(5000):
            events.observe(served(pod=Pod(f"web-{i}", "shop", f"uid-{i}")))
        elapsed = time.perf_counter() - started
    # About 5 µs each; a hang guard only: one wait for the hanging sink would be 60 s.
    assert elapsed < 10, elapsed
    assert len(events._pending) == 8
    assert events.dropped["queue_full"] == 5000 - 8
    assert dropped_metric.counts == {"queue_full": 5000 - 8}
    assert [e["event"] for e in logged].count(
        "kubernetes Events dropped; counted in nodekeeper_kubernetes_events_dropped, logged "
        "again after the next Event posted") == 1
    # Repeats of a waiting Event need no room.
    events.observe(served(pod=Pod("web-0", "shop", "uid-0")))
    assert events.dropped["queue_full"] == 5000 - 8
    await events.close()


async def test_observe_never_raises(make_events: MakeEvents,
                                    dropped_metric: RecordingMetric) -> None:
    events = make_events()
    broken = served()
    object.__setattr__(broken, "detail", None)  # slicing None fails inside
    events.observe(broken)
    assert dropped_metric.counts == {"internal": 1}


async def test_failures_back_off_then_recover(make_events: MakeEvents, sink: FakeSink) -> None:
    sleeps = Sleeps()
    sink.failures = [PostFailed("connection refused", retry=True) for _ in range(5)]
    events = make_events(sleep=sleeps)
    with capture_logs() as logged:
        await events.start()
        events.observe(served())
        await settle(events, sink, 6)
    assert [c[0] for c in sink.calls] == ["create"] * 6
    expected = [0.5, 1, 2, 4, 8]
    assert len(sleeps.delays) == 5
    for delay, nominal in zip(sleeps.delays, expected, strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2
    names = [e["event"] for e in logged]
    assert names.count("kubernetes API server failing; Events wait and are retried") == 1
    assert names.count("kubernetes Events posted again") == 1
    # A success resets the back-off.
    sink.failures = [PostFailed("503", retry=True)]
    events.observe(served(detail="other"))
    await settle(events, sink, 8)
    assert 0.4 <= sleeps.delays[-1] <= 0.6
    await events.close()


async def test_back_off_is_capped(make_events: MakeEvents, sink: FakeSink) -> None:
    sleeps = Sleeps()
    sink.failures = [PostFailed("503", retry=True) for _ in range(12)]
    events = make_events(sleep=sleeps)
    await events.start()
    events.observe(served())
    await settle(events, sink, 13)
    await events.close()
    assert max(sleeps.delays) <= events_module.BACKOFF_MAX * 1.2
    assert min(sleeps.delays[-4:]) >= events_module.BACKOFF_MAX * 0.8


async def test_a_refusal_is_dropped_not_retried(make_events: MakeEvents, sink: FakeSink,
                                                dropped_metric: RecordingMetric) -> None:
    sink.failures = [PostFailed("403 events is forbidden", retry=False)]
    events = make_events()
    await events.start()
    events.observe(served())
    events.observe(served())
    await settle(events, sink, 1)
    await asyncio.sleep(0.02)
    await events.close()
    assert len(sink.calls) == 1
    assert dropped_metric.counts == {"refused": 2}


async def test_events_given_up_after_retry_for(
        make_events: MakeEvents, sink: FakeSink, clock: Clock,
        dropped_metric: RecordingMetric) -> None:
    sink.failures = [PostFailed("unreachable", retry=True) for _ in range(1000)]
    sleeps = Sleeps()

    async def advancing(seconds: float) -> None:
        clock.mono += seconds
        await sleeps(seconds)

    events = make_events(sleep=advancing, retry_for=60)
    await events.start()
    events.observe(served())
    for _ in range(500):
        if events.dropped:
            break
        await asyncio.sleep(0.002)
    await events.close()
    assert dropped_metric.counts == {"expired": 1}
    assert 60 <= sum(sleeps.delays) <= 60 + 2 * events_module.BACKOFF_MAX


async def test_each_request_has_a_timeout(make_events: MakeEvents, sink: FakeSink) -> None:
    sink.hang = True
    sleeps = Sleeps()
    events = make_events(timeout=0.05, sleep=sleeps)
    await events.start()
    events.observe(served())
    await asyncio.sleep(0.2)
    assert len(sink.calls) >= 2  # timed out, backed off, tried again
    sink.hang = False
    await settle(events, sink, 3)
    await events.close()
    assert len(sink.stored) == 1


async def test_close_is_bounded_and_counts_what_is_left(make_events: MakeEvents, sink: FakeSink,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        dropped_metric: RecordingMetric) -> None:
    monkeypatch.setattr(events_module, "CLOSE_GRACE", 0.1)
    sink.hang = True
    events = make_events(timeout=30)
    await events.start()
    events.observe(served())
    events.observe(served(pod=Pod("web-1", "shop", "uid-1")))
    started = time.monotonic()
    await events.close()
    assert time.monotonic() - started < 15  # CLOSE_GRACE, not the sink's 30 s
    assert dropped_metric.counts == {"closing": 2}
    events.observe(served())
    assert dropped_metric.counts == {"closing": 3}
    assert sink.closed


async def test_close_flushes_within_the_grace(make_events: MakeEvents, sink: FakeSink) -> None:
    events = make_events()
    await events.start()
    events.observe(served())
    await events.close()
    assert len(sink.stored) == 1


# -- from config -----------------------------------------------------------------------


def test_off_by_setting() -> None:
    events = Events.from_config(KubernetesConfig(events=False, kubeconfig="/nonexistent"))
    assert not events.enabled
    events.observe(served())
    assert events.pending == 0


def test_an_unreadable_default_kubeconfig_turns_events_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module.kubeconfig, "DEFAULT_PATH", str(tmp_path / "kubelet.conf"))
    with capture_logs() as logged:
        events = Events.from_config(KubernetesConfig())
    assert not events.enabled
    (said,) = logged
    assert said["log_level"] == "warning"
    assert "kubelet.conf: cannot read" in said["error"]


def test_an_unreadable_explicit_kubeconfig_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="cannot read"):
        Events.from_config(KubernetesConfig(kubeconfig=str(tmp_path / "absent")))


def test_node_name_defaults_to_the_host_name(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module.socket, "gethostname", lambda: "Worker-7")
    assert Events.from_config(KubernetesConfig(events=False)).node == "worker-7"
    assert Events.from_config(KubernetesConfig(events=False, node_name="n1")).node == "n1"

