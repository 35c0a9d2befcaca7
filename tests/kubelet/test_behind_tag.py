"""Containers behind their tag under a real kubelet: a pod keeps running an old build
after a newer one was pulled for another pod, and `nodekeeper status` lists it, with the
digest it runs and the one the tag has; once it restarts on the tag's build, it is not
listed any more. Nothing but the pulls the kubelet asked for reaches the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeContainerd, MakeNodekeeper
from tests.harness import CriClient, Registry, free_port, image_ref
from tests.harness.apiserver import NODE_NAME, ApiServer
from tests.harness.nodekeeper import scrape
from tests.kubelet.conftest import (
    POD_START_TIMEOUT,
    POLICY,
    MakeNode,
    Node,
    Upstream,
    wait_until,
)

pytestmark = pytest.mark.kubelet

# State reaches the database in batches, a restart takes the kubelet some seconds, and the
# daemon counts every SURVEY_SECONDS (15): generous on a shared machine.
LISTED_WITHIN = 60.0


def status(node: Node) -> dict[str, Any]:
    assert node.nodekeeper is not None
    done = subprocess.run(
        [sys.executable, "-m", "nodekeeper", "status", "-o", "json", "--config",
         str(node.nodekeeper.config_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


def behind(node: Node) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] | None = status(node)["behind_tag"]
    assert listed is not None, status(node)["behind_tag_error"]
    return listed


def counted(address: str) -> float:
    return scrape(address)["nodekeeper_containers_behind_tag"]


def test_a_pod_on_an_old_build_is_listed_until_it_restarts_on_the_tags_build(
    make_node: MakeNode, upstream: Upstream, infra: Registry,
    make_containerd: MakeContainerd, make_nodekeeper: MakeNodekeeper,
    apiserver: ApiServer, tmp_path: Path
) -> None:
    old = upstream.push("app", "stable", seed="behind-old")
    # The API server serves the whole module: Events of earlier runs are not this one's.
    earlier = {e["metadata"]["name"] for e in apiserver.events("default")}
    kubernetes = {"kubeconfig": str(apiserver.write_kubeconfig(tmp_path / "kubelet.conf")),
                  "node_name": NODE_NAME, "event_decisions": ["behind"]}
    # The node as make_node builds it, with metrics served and Events on.
    sandbox = image_ref(infra.host, "pause", "1")
    containerd = make_containerd("behind-containerd", sandbox_image=sandbox)
    with CriClient(containerd.address) as cri:
        cri.pull(sandbox, timeout=60)
    address = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(containerd.address, policy=POLICY,
                             settings={"metrics_address": address,
                                       "kubernetes": kubernetes})
    node = make_node("nodekeeper", containerd=containerd, nodekeeper=daemon)
    ref = upstream.ref("app", "stable")
    first = node.run("first", ref)
    assert first.wait_starts(1, POD_START_TIMEOUT) is not None, node.kubelet.log_text()[-4000:]
    assert wait_until(lambda: status(node)["checks"] != [], LISTED_WITHIN)
    assert behind(node) == []  # the one running container runs the tag's build

    new = upstream.push("app", "stable", seed="behind-new")
    second = node.run("second", ref)
    assert second.wait_starts(1, POD_START_TIMEOUT) is not None
    assert second.builds() == ["behind-new"]
    assert node.decisions() == ["pulled", "updated"]

    assert wait_until(lambda: behind(node) != [], LISTED_WITHIN), status(node)
    [listed] = behind(node)
    assert listed["pod"] == f"first-{node.kubelet.node_name}"
    assert listed["namespace"] == "default"
    assert listed["container"] == "app"
    assert listed["reference"] == ref
    assert listed["runs"] == old.digest
    assert listed["image_id"] == old.config_digest
    assert listed["tag_digest"] == new.digest
    assert listed["since"] >= listed["started_at"]
    assert node.nodekeeper is not None
    text = subprocess.run(
        [sys.executable, "-m", "nodekeeper", "status", "--config",
         str(node.nodekeeper.config_path)], capture_output=True, text=True, timeout=60).stdout
    assert f"default/first-{node.kubelet.node_name} app: {ref}" in text
    assert f"runs {old.digest}; the tag is {new.digest}" in text
    assert wait_until(lambda: counted(address) == 1, LISTED_WITHIN)

    def told() -> list[dict[str, Any]]:
        return [e for e in apiserver.events("default") if e.get("reason") == "ImageBehindTag"
                and e["metadata"]["name"] not in earlier]

    assert wait_until(lambda: bool(told()), LISTED_WITHIN), apiserver.events("default")
    [event] = told()
    assert event["involvedObject"]["name"] == listed["pod"]
    assert event["type"] == "Normal"
    assert event["message"].startswith(
        f"runs {old.digest}; the tag {ref} is {new.digest} since ")
    assert event["message"].endswith("; restart the pod to run it")

    first.crash()
    assert first.wait_starts(2, POD_START_TIMEOUT) is not None
    assert first.builds() == ["behind-old", "behind-new"]
    assert wait_until(lambda: behind(node) == [], LISTED_WITHIN), status(node)
    assert wait_until(lambda: counted(address) == 0, LISTED_WITHIN)
    [once] = told()  # one Event, never counted up: the container was told once
    assert once.get("count", 1) == 1
