"""Events on the pod, against a real kube-apiserver (Node,RBAC, NodeRestriction) and etcd.

Each test posts as the node identity, as a node's kubelet.conf would, about a Pod bound to
the node, and reads the Events back as an admin. The fault tests put a FaultProxy between
nodekeeper and the API server (refusing connections, never answering) or use an identity
the API server refuses (403): observe() stays instant, drops are counted.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from nodekeeper import metrics
from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.config import KubernetesConfig
from nodekeeper.failures import Kind
from nodekeeper.kube import client as kube_client
from nodekeeper.kube.events import Events, message
from nodekeeper.kube.sink import ApiSink
from nodekeeper.pull.edges import Answer, Decision, Pod
from tests import conformance
from tests.conftest import MakeNodekeeper
from tests.fakes import RecordingMetric
from tests.harness import (
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    image_ref,
    plain_http_hosts_toml,
    push_new,
)
from tests.harness.apiserver import NODE_NAME as NODE
from tests.harness.apiserver import ApiServer, dump
from tests.harness.nodekeeper import Nodekeeper

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "c" * 64
OLD = "sha256:" + "d" * 64
# A bound for one observe() call: far above what it costs (microseconds: it only
# queues), so that a busy machine does not reach it, and half the 0.5 s request timeout
# that an observe() waiting for a silent API server would take.
INSTANT_S = 0.25
CONFIRMED = time.time() - 3 * 86400 - 60


@pytest.fixture
def dropped(monkeypatch: pytest.MonkeyPatch) -> RecordingMetric:
    recorder = RecordingMetric()
    monkeypatch.setattr(metrics, "KUBE_EVENTS_DROPPED", recorder)
    return recorder


_pods = iter(range(1000))


def bound_pod(apiserver: ApiServer, namespace: str = "shop") -> Pod:
    created = apiserver.create_pod(namespace, f"web-{next(_pods)}")
    meta = created["metadata"]
    return Pod(meta["name"], meta["namespace"], meta["uid"])


def served(pod: Pod, **changes: Any) -> Answer:
    values: dict[str, Any] = dict(
        pod=pod, image="postgres:15", reference="docker.io/library/postgres:15",
        decision=Decision.FALLBACK, kind=Kind.UNREACHABLE, detail="connection refused",
        upstream="registry-1.docker.io", digest=DIGEST, node_digest="",
        last_confirmed=CONFIRMED)
    values.update(changes)
    return Answer(**values)


def observe_timed(events: Events, item: Answer, times: int = 1) -> float:
    """The slowest of `times` observe() calls, in seconds."""
    slowest = 0.0
    for _ in range(times):
        started = time.perf_counter()
        events.observe(item)
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


async def events_of(apiserver: ApiServer, pod: Pod, count: int = 1, *, total: int = 0,
                    timeout: float = 20.0) -> list[dict[str, Any]]:
    """The Events about `pod` once there are `count` of them (and, with `total`, once
    their counts add up to it), polling without blocking the posting worker for long."""
    deadline = time.monotonic() + timeout
    while True:
        found = apiserver.events(pod.namespace, involvedObject__uid=pod.uid)
        summed = sum(item.get("count", 0) for item in found)
        if len(found) >= count and summed >= total:
            return found
        if time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def node_events(kubeconfig: Path, **kwargs: Any) -> Events:
    return Events.from_config(KubernetesConfig(kubeconfig=str(kubeconfig), node_name=NODE,
                                               **kwargs))


async def test_a_fallback_is_one_event_on_the_pod_with_a_count(
        apiserver: ApiServer, tmp_path: Path) -> None:
    # The node's client certificate, as kubeadm's kubelet.conf carries it.
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    pod = bound_pod(apiserver)
    events = node_events(kubeconfig)
    await events.start()
    try:
        slowest = observe_timed(events, served(pod), 3)
        (event,) = await events_of(apiserver, pod, total=3)
        assert event["count"] == 3
        observe_timed(events, served(pod), 2)
        (event,) = await events_of(apiserver, pod, total=5)
    finally:
        await events.close()
    assert slowest < INSTANT_S
    assert event["count"] == 5
    assert event["involvedObject"] == {"kind": "Pod", "namespace": "shop", "name": pod.name,
                                       "uid": pod.uid, "apiVersion": "v1"}
    assert (event["type"], event["reason"]) == ("Warning", "ImageFallback")
    assert event["message"] == message(served(pod), time.time())
    assert event["message"].endswith("last confirmed 3 days ago")
    assert event["source"] == {"component": "nodekeeper", "host": NODE}
    assert (event["reportingComponent"], event["reportingInstance"]) == ("nodekeeper", NODE)
    assert event["firstTimestamp"] <= event["lastTimestamp"]
    assert events.posted == {"created": 1, "updated": 1}
    everything = dump(apiserver.events("shop"))
    key = apiserver.node_cert.key.read_text().splitlines()[1]
    for secret in (apiserver.node_token, apiserver.admin_token, key):
        assert secret not in everything


async def test_updated_is_a_normal_event_when_enabled(apiserver: ApiServer,
                                                      tmp_path: Path) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    pod = bound_pod(apiserver)
    events = node_events(kubeconfig, event_decisions=(Decision.FALLBACK, Decision.UPDATED))
    await events.start()
    try:
        events.observe(served(pod, decision=Decision.UPDATED, kind=None, detail="",
                              node_digest=OLD))
        (event,) = await events_of(apiserver, pod)
    finally:
        await events.close()
    assert (event["type"], event["reason"]) == ("Normal", "ImageUpdated")
    assert event["message"] == (f"docker.io/library/postgres:15 updated upstream at "
                                f"registry-1.docker.io: {OLD} -> {DIGEST}")


async def test_token_file_is_read_again_after_a_401(apiserver: ApiServer, tmp_path: Path,
                                                    dropped: RecordingMetric) -> None:
    token = tmp_path / "token"
    token.write_text("not-a-token-the-server-knows\n")
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig",
                                            user={"tokenFile": str(token)})
    pod = bound_pod(apiserver)
    events = node_events(kubeconfig)
    await events.start()
    try:
        events.observe(served(pod))
        for _ in range(100):
            if dropped.counts:
                break
            await asyncio.sleep(0.05)
        assert dropped.counts == {"refused": 1}  # a 401 twice over is a refusal
        token.write_text(apiserver.node_token)
        events.observe(served(pod, detail="timeout after 2s"))
        (event,) = await events_of(apiserver, pod)
    finally:
        await events.close()
    assert "timeout after 2s" in event["message"]


async def test_a_changed_credential_file_is_read_again(apiserver: ApiServer, tmp_path: Path,
                                                       dropped: RecordingMetric,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_client, "RECHECK_SECONDS", 0.0)
    token = tmp_path / "token"
    token.write_text(apiserver.node_token)
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig",
                                            user={"tokenFile": str(token)})
    pod = bound_pod(apiserver)
    events = node_events(kubeconfig)
    await events.start()
    try:
        events.observe(served(pod))
        await events_of(apiserver, pod)
        replaced = tmp_path / "token.new"  # replaced by a rename, as rotation does
        replaced.write_text(apiserver.stranger_token)
        replaced.rename(token)
        events.observe(served(pod))
        for _ in range(100):
            if dropped.counts:
                break
            await asyncio.sleep(0.05)
    finally:
        await events.close()
    assert dropped.counts == {"refused": 1}  # the stranger may not patch it


async def test_exec_plugin(apiserver: ApiServer, tmp_path: Path) -> None:
    seen = tmp_path / "exec-info.json"
    plugin = tmp_path / "get-token"
    credential = json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                             "kind": "ExecCredential", "status": {"token": apiserver.node_token}})
    plugin.write_text(f"#!/bin/sh\nprintf '%s' \"$KUBERNETES_EXEC_INFO\" > {seen}\n"
                      f"echo '{credential}'\n")
    plugin.chmod(0o700)
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", user={"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
        "interactiveMode": "Never", "provideClusterInfo": True}})
    pod = bound_pod(apiserver)
    events = node_events(kubeconfig)
    await events.start()
    try:
        events.observe(served(pod))
        (event,) = await events_of(apiserver, pod)
    finally:
        await events.close()
    assert event["reason"] == "ImageFallback"
    info = json.loads(seen.read_text())
    assert info["kind"] == "ExecCredential"
    assert info["spec"]["interactive"] is False
    assert info["spec"]["cluster"]["server"] == apiserver.url


@pytest.fixture
def proxy(apiserver: ApiServer) -> Iterator[FaultProxy]:
    verify = ssl.create_default_context(cafile=str(apiserver.ca_cert))
    front = FaultProxy(apiserver.url, verify=verify, upstream_timeout=10)
    try:
        yield front
    finally:
        front.close()


def proxied_events(apiserver: ApiServer, proxy: FaultProxy, tmp_path: Path, *,
                   queue: int = 4) -> Events:
    """Events posted through the proxy (plain http on loopback, so a token)."""
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig", server=proxy.url,
                                            user={"token": apiserver.node_token})
    return Events(NODE, (Decision.FALLBACK,), ApiSink(str(kubeconfig), 0.5), timeout=0.5,
                  queue=queue)


async def test_api_server_down_costs_observe_nothing(
        apiserver: ApiServer, proxy: FaultProxy, tmp_path: Path,
        dropped: RecordingMetric) -> None:
    proxy.refuse()
    pods = [bound_pod(apiserver) for _ in range(6)]
    events = proxied_events(apiserver, proxy, tmp_path)
    await events.start()
    try:
        slowest = max(observe_timed(events, served(pod), 20) for pod in pods)
        await asyncio.sleep(1.0)  # the worker tries, fails, backs off
        assert slowest < INSTANT_S
        assert dropped.counts == {"queue_full": 2 * 20}  # 6 pods, room for 4
        assert events.posted == {}
        proxy.start()  # back: what waited is posted, repeats as counts
        for pod in pods[:4]:
            (event,) = await events_of(apiserver, pod, total=20, timeout=40)
            assert event["count"] == 20
    finally:
        await events.close()
    for pod in pods[4:]:
        assert apiserver.events(pod.namespace, involvedObject__uid=pod.uid) == []


async def test_api_server_silent_costs_observe_nothing(apiserver: ApiServer,
                                                       proxy: FaultProxy,
                                                       tmp_path: Path) -> None:
    proxy.hang()
    pod = bound_pod(apiserver)
    events = proxied_events(apiserver, proxy, tmp_path)
    await events.start()
    try:
        slowest = observe_timed(events, served(pod), 50)
        await asyncio.sleep(2.0)  # requests time out (0.5 s) and are retried
        slowest = max(slowest, observe_timed(events, served(pod), 50))
        assert slowest < INSTANT_S
        hung = len(proxy.requests(path_contains="/events"))
        assert hung >= 2
        proxy.passthrough()
        (event,) = await events_of(apiserver, pod, total=100, timeout=40)
    finally:
        await events.close()
    assert event["count"] == 100


async def test_a_refusing_api_server_costs_observe_nothing(apiserver: ApiServer,
                                                           tmp_path: Path,
                                                           dropped: RecordingMetric) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig",
                                            user={"token": apiserver.stranger_token})
    pod = bound_pod(apiserver)
    with capture_logs() as logged:
        events = node_events(kubeconfig)
        await events.start()
        try:
            slowest = observe_timed(events, served(pod), 20)
            for _ in range(100):
                if sum(dropped.counts.values()) >= 20:
                    break
                await asyncio.sleep(0.05)
        finally:
            await events.close()
    assert slowest < INSTANT_S
    (warning,) = [line for line in logged if line["log_level"] == "warning"]
    assert "403" in warning["detail"]
    assert apiserver.stranger_token not in json.dumps(logged, default=str)
    assert set(dropped.counts) == {"refused"}
    assert sum(dropped.counts.values()) == 20
    assert apiserver.events(pod.namespace, involvedObject__uid=pod.uid) == []


def test_the_daemon_starts_with_events_on_and_stops_promptly(
        apiserver: ApiServer, tmp_path: Path) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    daemon = Nodekeeper(tmp_path / "nk", str(tmp_path / "no-containerd.sock"), settings={
        "kubernetes": {"kubeconfig": str(kubeconfig), "node_name": NODE}})
    try:
        daemon.start()
        assert daemon.wait_ready() < 30  # generous: a hang, not a speed
        time.sleep(0.5)  # the Events worker builds its client
        started = time.monotonic()
        assert daemon.stop() == 0
        # Far below systemd's stop timeout (90 s), where a stop that hangs would end.
        assert time.monotonic() - started < 15
    finally:
        daemon.stop()
    said = {line["event"]: line for line in daemon.events()}
    assert said["kubernetes events on"]["server"] == apiserver.url
    assert said["kubernetes events on"]["node"] == NODE
    assert not [line for line in daemon.events() if line.get("component") == "events"
                and line.get("level") == "warning"]


def test_an_unreadable_kubeconfig_given_in_config_stops_the_start(tmp_path: Path) -> None:
    daemon = Nodekeeper(tmp_path / "nk", str(tmp_path / "no-containerd.sock"), settings={
        "kubernetes": {"kubeconfig": str(tmp_path / "absent.conf")}})
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(15) == 1
    daemon.stop()
    assert f"kubernetes.kubeconfig: {tmp_path / 'absent.conf'}: cannot read" in daemon.log_text()


def test_a_fallback_through_the_daemon_shows_on_the_pod_and_in_status(
        apiserver: ApiServer, registry: Registry, containerd: Containerd,
        make_nodekeeper: MakeNodekeeper, tmp_path: Path) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    daemon = make_nodekeeper(containerd.address, settings={
        "kubernetes": {"kubeconfig": str(kubeconfig), "node_name": NODE}})
    containerd.write_hosts_toml(registry.host, plain_http_hosts_toml(registry.host))
    image = push_new(registry.url, "shop/web", "1", seed="events-e2e")
    ref = image_ref(registry.host, "shop/web", "1")
    pod = bound_pod(apiserver)
    meta = cri.PodSandboxMetadata(name=pod.name, namespace=pod.namespace, uid=pod.uid)
    with CriClient(daemon.socket) as kubelet:
        assert kubelet.pull(ref, pod=meta) == image.config_digest
        registry.stop()
        for _ in range(2):
            assert kubelet.pull(ref, pod=meta) == image.config_digest
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [e for e in apiserver.events(pod.namespace) if e.get("reason") ==
                 "ImageFallback" and e["involvedObject"]["uid"] == pod.uid]
        if found and found[0].get("count") == 2:
            break
        time.sleep(0.2)
    assert found, dump(apiserver.events(pod.namespace))
    (event,) = found
    assert event["type"] == "Warning"
    assert event["count"] == 2
    assert event["source"] == {"component": "nodekeeper", "host": NODE}
    assert f"upstream {registry.host} unreachable" in event["message"]
    assert f"the node's copy of {ref}, {image.digest}" in event["message"]
    assert "last confirmed less than a minute ago" in event["message"]
    status = subprocess.run(
        [sys.executable, "-m", "nodekeeper", "status", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert "served without upstream's confirmation (1;" in status
    assert f"{ref}\n      {image.digest} since" in status


class ApiServerWorld:
    """The real API server, with the verbs the sink suite uses."""

    def __init__(self, apiserver: ApiServer) -> None:
        self.apiserver = apiserver

    def pod(self) -> Pod:
        return bound_pod(self.apiserver)

    def events(self, pod: Pod) -> list[dict[str, Any]]:
        return self.apiserver.events(pod.namespace, involvedObject__uid=pod.uid)


class TestApiSink(conformance.SinkSuite):
    """The same suite as the fake sink's (tests/unit/test_fakes.py), as the node."""

    @pytest.fixture
    def sink_world(self, apiserver: ApiServer) -> ApiServerWorld:
        return ApiServerWorld(apiserver)

    @pytest.fixture
    async def sink(self, apiserver: ApiServer, tmp_path: Path) -> AsyncIterator[ApiSink]:
        kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
        sink = ApiSink(str(kubeconfig), 5.0)
        await sink.prepare()
        yield sink
        await sink.close()
