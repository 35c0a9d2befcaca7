"""A real kubelet (1.32 and 1.36; standalone, static hostNetwork pods) in front of
nodekeeper, each scenario compared with the same kubelet pointed straight at containerd in
the same test.

Times are measured from the moment a container is told to exit to the moment its
successor has started (it writes its build to a hostPath file), and listed at the end of
the run. Every wait is bounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeRegistry
from tests.harness import resolve
from tests.harness.apiserver import NODE_NAME, ApiServer
from tests.harness.kubelet import KubeletRelease
from tests.harness.pods import AppPod
from tests.kubelet.conftest import (
    MODES,
    POD_START_TIMEOUT,
    PROBE_TIMEOUT,
    RESTART_BOUND,
    MakeNode,
    Node,
    Record,
    Upstream,
    wait_until,
)

pytestmark = pytest.mark.kubelet

# The reason the kubelet gives a container it could not start (its waiting reason), as
# its pod worker logs it: failed to "StartContainer" for "app" with <Reason>: "<message>".
_SYNC_ERROR = re.compile(r'"Error syncing pod, skipping" err="failed to \\"StartContainer\\"'
                         r' for \\"app\\" with (?P<reason>\w+): .* pod="default/(?P<pod>[^"]+)"')


def waiting_reasons(node: Node, pod: AppPod, since: int) -> list[str]:
    name = f"{pod.name}-{node.kubelet.node_name}"
    found = (_SYNC_ERROR.search(line) for line in node.kubelet.log_lines(_SYNC_ERROR, since))
    return [m["reason"] for m in found if m is not None and m["pod"] == name]


def first_failure(node: Node, pod: AppPod, since: int, timeout: float = 60.0) -> str:
    """The first waiting reason the kubelet reports for the pod's container."""
    assert wait_until(lambda: bool(waiting_reasons(node, pod, since)), timeout), \
        node.kubelet.log_text(since)[-4000:]
    return waiting_reasons(node, pod, since)[0]


def started(node: Node, name: str, image: str, record: Record, label: str = "") -> AppPod:
    pod = node.run(name, image)
    seconds = pod.wait_starts(1, POD_START_TIMEOUT)
    record(label or f"{node.mode}: pod start", seconds)
    assert seconds is not None, node.kubelet.log_text()[-4000:]
    return pod


def restart_window(restart: dict[str, float | None], mode: str) -> float:
    """How long to wait for a restart. Through nodekeeper it must come: generously (a busy
    machine is slow, not wrong). With containerd alone it must not: as long as
    nodekeeper's took, twice over, and at least RESTART_BOUND ("not in the same wait")."""
    if mode == "nodekeeper":
        return POD_START_TIMEOUT
    took = restart.get("nodekeeper")
    return RESTART_BOUND if took is None else max(RESTART_BOUND, 2 * took)


def test_always_runs_the_build_the_tag_names_and_a_new_build_after_a_restart(
    make_node: MakeNode, upstream: Upstream, record: Record
) -> None:
    for mode in MODES:
        first = upstream.push("app", "stable", seed=f"{mode}-1")
        node = make_node(mode)
        pod = started(node, "app", upstream.ref("app", "stable"), record)
        assert pod.builds() == [f"{mode}-1"]
        assert node.containers(pod)[-1].image_ref == first.config_digest

        second = upstream.push("app", "stable", seed=f"{mode}-2")
        pod.crash()
        seconds = pod.wait_starts(2, POD_START_TIMEOUT)
        record(f"{mode}: restart with a new build", seconds)
        assert pod.builds() == [f"{mode}-1", f"{mode}-2"]
        assert node.containers(pod)[-1].image_ref == second.config_digest
        if node.nodekeeper is not None:
            assert node.decisions() == ["pulled", "updated"]


@pytest.mark.parametrize("fault", ["stopped", "black-holed"])
def test_a_restarted_container_runs_while_the_registry_fails(
    make_node: MakeNode, upstream: Upstream, record: Record, fault: str
) -> None:
    restart: dict[str, float | None] = {}
    upstream.push("app", "v1", seed="steady")
    for mode in MODES:
        node = make_node(mode)
        pod = started(node, "app", upstream.ref("app", "v1"), record)
        if fault == "stopped":
            upstream.stop()
        else:
            upstream.black_hole()
        try:
            pod.crash()
            restart[mode] = pod.wait_starts(2, restart_window(restart, mode))
            record(f"{mode}: restart, registry {fault}", restart[mode])
        finally:
            upstream.restore()
        if node.nodekeeper is not None:
            assert node.decisions() == ["pulled", "fallback"]
            fallback = [e for e in node.nodekeeper.events()
                        if e.get("event", "").startswith("upstream failed")]
            assert fallback[0]["kind"] == {"stopped": "unreachable",
                                             "black-holed": "timeout"}[fault]
    seconds = restart["nodekeeper"]
    assert seconds is not None, f"not running within {POD_START_TIMEOUT:g}s through nodekeeper"
    if fault == "black-holed":
        assert seconds >= PROBE_TIMEOUT  # it did wait for the registry first
    assert restart["containerd"] is None  # containerd alone: not running in the same wait


def test_a_new_pod_without_the_image_reports_registry_unavailable(
    make_node: MakeNode, upstream: Upstream
) -> None:
    upstream.push("app", "v1", seed="never-pulled")
    upstream.stop()
    reasons = {}
    for mode in MODES:
        node = make_node(mode)
        since = node.kubelet.log_size()
        pod = node.run("app", upstream.ref("app", "v1"))
        reasons[mode] = first_failure(node, pod, since)
        # The same reason in the event the kubelet would post for the pod.
        assert re.search(rf'reason="Failed" message="Error: {reasons[mode]}"',
                         node.kubelet.log_text(since))
        assert pod.builds() == []
    # The kubelet reads the reason from the message only when the status code is UNKNOWN:
    # containerd's own failure is a plain ErrImagePull.
    assert reasons == {"nodekeeper": "RegistryUnavailable", "containerd": "ErrImagePull"}


def test_a_second_node_starts_a_new_pod_from_backing_while_upstream_is_down(
    make_node: MakeNode, upstream: Upstream, make_registry: MakeRegistry, record: Record
) -> None:
    backing = make_registry()
    image = upstream.push("app", "v1", seed="scale-out")
    node_a = make_node("nodekeeper", backing_url=backing.url)
    started(node_a, "app", upstream.ref("app", "v1"), record, "node A: pod start")
    repo = f"cache/{upstream.host.replace(':', '_')}/app"
    assert wait_until(lambda: resolve(backing.url, repo, "v1") == image.digest, 30)
    upstream.stop()

    node_b = make_node("nodekeeper", backing_url=backing.url)  # closes node A's kubelet
    pod = started(node_b, "app", upstream.ref("app", "v1"), record,
                  "node B: new pod from backing, upstream stopped")
    assert pod.builds() == ["scale-out"]
    assert node_b.decisions() == ["backing-fallback"]
    assert node_b.containers(pod)[-1].image_ref == image.config_digest

    direct = make_node("containerd")  # a third node, without nodekeeper
    since = direct.kubelet.log_size()
    lonely = direct.run("app", upstream.ref("app", "v1"))
    assert first_failure(direct, lonely, since) == "ErrImagePull"
    assert lonely.wait_starts(1, RESTART_BOUND) is None


def test_node_wide_credentials_get_the_nodes_copy_and_wrong_ones_are_refused(
    make_node: MakeNode, make_upstream: Callable[..., Upstream], record: Record
) -> None:
    private = make_upstream(htpasswd={"alice": "alice-pw"})
    private.push("private/app", "1", seed="private")
    ref = private.ref("private/app", "1")
    right = {private.host: ("alice", "alice-pw")}
    wrong = {private.host: ("alice", "guess")}
    restart: dict[str, float | None] = {}
    for mode in MODES:
        node = make_node(mode, credentials=right)
        pod = started(node, "app", ref, record)
        private.stop()
        try:
            pod.crash()
            restart[mode] = pod.wait_starts(2, restart_window(restart, mode))
            record(f"{mode}: restart with node-wide credentials, registry stopped",
                   restart[mode])
        finally:
            private.restore()
        if node.nodekeeper is None:
            continue
        assert node.decisions() == ["pulled", "fallback"]

        # The same node (its containerd holds the image), another kubelet whose
        # config.json has a wrong password: nodekeeper never saw these work.
        private.stop()
        try:
            other = make_node(mode, containerd=node.containerd, nodekeeper=node.nodekeeper,
                              credentials=wrong)
            since = other.kubelet.log_size()
            refused = other.run("other", ref)
            assert first_failure(other, refused, since) == "RegistryUnavailable"
            assert refused.wait_starts(1, RESTART_BOUND) is None
        finally:
            private.restore()
        assert node.decisions()[-1] == "error"
        log = node.nodekeeper.log_text()
        assert "the node's copy is not used because these credentials were never seen" in log
        assert "alice-pw" not in log
        assert "guess" not in log
    assert restart["nodekeeper"] is not None
    assert restart["containerd"] is None


def test_a_fallback_shows_on_the_pod_as_an_event(
    make_node: MakeNode, upstream: Upstream, apiserver: ApiServer, tmp_path: Path
) -> None:
    # What the kubelet itself reports as "Successfully pulled image": nodekeeper adds the
    # truth beside it, a Warning on the pod posted as the node.
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    # The API server serves the whole module: Events of earlier runs are not this one's.
    earlier = {e["metadata"]["name"] for e in apiserver.events("default")}
    image = upstream.push("app", "v1", seed="event-on-the-pod")
    node = make_node("nodekeeper", kubernetes={"kubeconfig": str(kubeconfig),
                                               "node_name": NODE_NAME})
    pod = node.run("app", upstream.ref("app", "v1"))
    assert pod.wait_starts(1, POD_START_TIMEOUT) is not None
    upstream.stop()
    try:
        pod.crash()
        assert pod.wait_starts(2, POD_START_TIMEOUT) is not None
    finally:
        upstream.restore()
    name = f"{pod.name}-{node.kubelet.node_name}"

    def fallback_events() -> list[dict[str, Any]]:
        return [e for e in apiserver.events("default") if e.get("reason") == "ImageFallback"
                and e["involvedObject"]["name"] == name
                and e["metadata"]["name"] not in earlier]

    assert wait_until(lambda: bool(fallback_events()), 15), apiserver.events("default")
    (event,) = fallback_events()
    assert event["type"] == "Warning"
    assert event["source"] == {"component": "nodekeeper", "host": NODE_NAME}
    assert event["involvedObject"]["uid"]  # the static pod's own uid, from the sandbox
    assert f"the node's copy of {upstream.ref('app', 'v1')}, {image.digest}" in event["message"]


def test_a_kubelet_asking_for_images_as_a_stream_gets_containerds_answer(
    make_node: MakeNode, upstream: Upstream, kubelet_release: KubeletRelease, record: Record
) -> None:
    # CRI 1.36's StreamImages, asked only behind the kubelet's alpha gate CRIListStreaming
    # (1.32 knows neither). containerd before 2.4 refuses it as UNIMPLEMENTED: through
    # nodekeeper the kubelet must get just that, and list images the old way.
    streams = kubelet_release.name != "1.32"
    node = make_node("nodekeeper", feature_gates={"CRIListStreaming": True} if streams else None)
    assert node.nodekeeper is not None
    upstream.push("app", "v1", seed="streamed")
    started(node, "app", upstream.ref("app", "v1"), record)

    def asked(rpc: str) -> list[dict[str, Any]]:
        assert node.nodekeeper is not None
        return [e for e in node.nodekeeper.events() if e.get("rpc") == rpc]

    assert wait_until(lambda: bool(asked("ListImages")), POD_START_TIMEOUT)
    if streams:
        assert wait_until(lambda: bool(asked("StreamImages")), POD_START_TIMEOUT)
        assert {e["code"] for e in asked("StreamImages")} == {"UNIMPLEMENTED"}
    else:
        assert asked("StreamImages") == []
    assert all(e["code"] == "OK" for e in asked("ListImages"))
