"""A node-wide registry outage: every pod of a node comes back within one probe_timeout,
not one per pull (issue 17).

N static pods, each with its own image (its own repository behind one fault proxy), run
with imagePullPolicy Always under ``update: always``. The registry then fails, and every
application container is removed at once while the kubelet is frozen (SIGSTOP): on
SIGCONT it finds them all gone in one relist and pulls N images, one at a time
(``serializeImagePulls``). Each scenario measures from SIGCONT until every pod's
container has started again, and lists the times at the end of the run.

Times are bounded loosely (probe_timeout plus the tier's allowance for a busy machine);
the exact figures are in the summary, and each test waits longer than its bound before it
fails, so a slow run still says how slow.
"""

from __future__ import annotations

import datetime
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness.cri_runtime import RuntimeClient
from tests.harness.pods import AppPod
from tests.kubelet.conftest import (
    KUBELET_DELAY,
    POD_START_TIMEOUT,
    PROBE_TIMEOUT,
    RESTART_BOUND,
    MakeNode,
    Node,
    Record,
    Tally,
    Upstream,
)

pytestmark = pytest.mark.kubelet

PODS = 10
# The registry answering late, yet within probe_timeout: no outage, every answer fresh.
SLOW_SECONDS = 1.5
# Flapping: it answers a few pulls, hangs for two probe timeouts, then answers again,
# the requests it held included.
FLAP_ANSWERS = 3
FLAP_HANGS_FOR = 2 * PROBE_TIMEOUT
# A pull this much later than the registry answering again must ask it anew.
FLAP_MARGIN = 0.1
# Every pod running again within one probe_timeout, plus the tier's allowance.
OUTAGE_BOUND = PROBE_TIMEOUT + KUBELET_DELAY
# How long a test keeps measuring before it fails: one probe_timeout per pull, and more.
MEASURE_FOR = PODS * (PROBE_TIMEOUT + SLOW_SECONDS * 2) + KUBELET_DELAY
FAULTS = ("black-holed", "refused", "slow", "flapping")


@dataclass(frozen=True)
class Pull:
    """One PullImage as nodekeeper logged it: when it started (wall clock), how long it
    took, and how it was answered."""

    image: str
    started: float
    seconds: float
    decision: str


def pulls(node: Node, after: int) -> list[Pull]:
    """The PullImage lines of nodekeeper's log after the first ``after`` log lines."""
    assert node.nodekeeper is not None
    found = []
    for event in node.nodekeeper.events()[after:]:
        if event.get("rpc") != "PullImage" or "duration_ms" not in event:
            continue
        ended = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        seconds = float(event["duration_ms"]) / 1000
        found.append(Pull(event.get("image", ""), ended.timestamp() - seconds, seconds,
                          event.get("decision", event.get("outcome", ""))))
    return found


def start_pods(node: Node, upstream: Upstream) -> list[AppPod]:
    pods = []
    for number in range(PODS):
        upstream.push(f"app{number}", "v1", seed=f"{number}-1")
        pods.append(node.run(f"app{number}", upstream.ref(f"app{number}", "v1")))
    times = wait_started(pods, 1, time.monotonic(), POD_START_TIMEOUT)
    assert None not in times, node.kubelet.log_text()[-4000:]
    return pods


def wait_started(pods: list[AppPod], count: int, since: float,
                 timeout: float) -> list[float | None]:
    """Seconds from ``since`` until each pod's container had started ``count`` times
    (None: not within ``timeout``), in the order of ``pods``."""
    times: list[float | None] = [None] * len(pods)
    while time.monotonic() - since <= timeout:
        for index, pod in enumerate(pods):
            if times[index] is None and len(pod.builds()) >= count:
                times[index] = time.monotonic() - since
        if None not in times:
            break
        time.sleep(0.05)
    return times


def remove_all_at_once(node: Node, pods: list[AppPod]) -> float:
    """Remove every application container while the kubelet is frozen; returns the
    moment it was thawed, when it can see all of them gone in one relist."""
    containers = [c for pod in pods for c in node.containers(pod) if c.state == "running"]
    assert len(containers) == len(pods)
    with node.kubelet.suspended(), RuntimeClient(node.containerd.address) as runtime:
        for container in containers:
            runtime.remove_container(container.id)
    return time.monotonic()


@dataclass
class Flapper:
    """Drives the proxy, from a thread, from answering (the first FLAP_ANSWERS manifest
    requests) to hanging (holding manifest requests for FLAP_HANGS_FOR) to answering again
    (the held ones too, if their client still waits); ``answering`` is the wall-clock time
    it answered again."""

    upstream: Upstream
    answering: float = 0.0

    def run(self) -> None:
        proxy = self.upstream.proxy
        proxy.wait_for_requests(FLAP_ANSWERS, path_contains="/manifests/",
                                timeout=POD_START_TIMEOUT)
        proxy.delay(MEASURE_FOR, path_contains="/manifests/")  # held until the switch
        time.sleep(FLAP_HANGS_FOR)
        proxy.passthrough()
        self.answering = time.time()


@pytest.fixture
def outage(upstream: Upstream) -> Iterator[Upstream]:
    try:
        yield upstream
    finally:
        upstream.restore()


def fail(upstream: Upstream, fault: str) -> None:
    if fault == "black-holed":
        upstream.black_hole()
    elif fault == "refused":
        upstream.stop()
    elif fault == "slow":
        upstream.proxy.delay(SLOW_SECONDS, path_contains="/manifests/")


def summary(times: list[float | None]) -> dict[str, Any]:
    done = [t for t in times if t is not None]
    return {"first": min(done, default=None), "median": statistics.median(done) if done else None,
            "last": max(done) if len(done) == len(times) else None}


@pytest.mark.parametrize("fault", FAULTS)
def test_every_pod_of_the_node_comes_back_within_one_probe_timeout(
    make_node: MakeNode, outage: Upstream, record: Record, tally: Tally, fault: str
) -> None:
    upstream = outage
    node = make_node("nodekeeper")
    assert node.nodekeeper is not None
    pods = start_pods(node, upstream)
    before = len(node.nodekeeper.events())
    upstream.proxy.clear()

    fail(upstream, fault)  # flapping: it answers at first
    flapper = Flapper(upstream)
    flapping = threading.Thread(target=flapper.run, daemon=True)
    if fault == "flapping":
        flapping.start()
    thawed = remove_all_at_once(node, pods)
    times = wait_started(pods, 2, thawed, MEASURE_FOR)
    if flapping.is_alive():
        flapping.join(timeout=FLAP_HANGS_FOR + 5)
    for label, seconds in summary(times).items():
        record(f"registry {fault}: {label} of {PODS} pods running again", seconds)
    after_outage = pulls(node, before)
    record(f"registry {fault}: longest PullImage",
           max((p.seconds for p in after_outage), default=None))
    # A timed-out probe's connection may close a moment after the next pull sent its own.
    peak = upstream.proxy.peak_concurrent(path_contains="/manifests/", handover=0.25)
    tally(f"registry {fault}: manifest requests",
          len(upstream.proxy.requests(path_contains="/manifests/")))
    tally(f"registry {fault}: manifest requests in flight at once, at most", peak)
    tally(f"registry {fault}: pulls answered with the node's copy",
          sum(p.decision == "fallback" for p in after_outage))

    # The harness did its part: every pod came back, with one pull each.
    assert None not in times, f"not every pod running again within {MEASURE_FOR:g}s: {times}"
    assert [pod.builds()[-1] for pod in pods] == [f"{n}-1" for n in range(PODS)]
    assert len(after_outage) == PODS, after_outage

    # The whole node back within one probe_timeout (the allowance is for a busy machine),
    # and every single pull bounded.
    bound = OUTAGE_BOUND
    if fault == "slow":
        bound = PODS * (2 * SLOW_SECONDS + 1) + KUBELET_DELAY  # every pull asks, slowly
    elif fault == "flapping":
        bound = FLAP_HANGS_FOR + OUTAGE_BOUND
    assert max(t for t in times if t is not None) <= bound, times
    assert all(p.seconds <= RESTART_BOUND for p in after_outage), after_outage

    decisions = [p.decision for p in after_outage]
    if fault in ("black-holed", "refused"):
        assert decisions == ["fallback"] * PODS
    elif fault == "slow":
        assert "fallback" not in decisions  # it answered, within probe_timeout
    else:
        # No stale answer: pulls that start once the registry answers again ask it. Those
        # of the outage may all be over by then, so nine pods crash now (their first exit:
        # restarted at once), pulling again; app0 is kept for the new build below.
        assert flapper.answering, "the registry never hung"
        crashed = time.monotonic()
        for pod in pods[1:]:
            pod.crash()
        again = wait_started(pods[1:], 3, crashed, MEASURE_FOR)
        record(f"registry {fault}: last of {PODS - 1} crashed pods running again",
               None if None in again else max(t for t in again if t is not None))
        late = [p for p in pulls(node, before) if p.started > flapper.answering + FLAP_MARGIN]
        assert len(late) >= PODS - 1, late
        assert [p for p in late if p.decision == "fallback"] == [], late
    if fault != "refused":  # refused, nothing is ever in flight
        assert peak <= 1  # at most one probe in flight to the endpoint at any time

    # The registry answers again, with a new build of one image: that pod's next restart
    # runs it.
    upstream.restore()
    upstream.push("app0", "v1", seed="0-2")
    pods[0].crash()
    assert pods[0].wait_starts(3, POD_START_TIMEOUT) is not None
    assert pods[0].builds()[-1] == "0-2"
