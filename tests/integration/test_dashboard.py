"""The shipped dashboard and alert rules against a real Prometheus scraping a real
nodekeeper: every metric they name is one nodekeeper exports, Prometheus loads the rules,
and after a scenario of pulls, an update, copies to backing and an outage, the query of
every panel returns data."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MakeNodekeeper, MakeRegistry
from tests.harness import Containerd, CriClient, free_port, image_ref, push_new
from tests.harness.prometheus import Prometheus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "monitoring" / "nodekeeper-dashboard.json"
RULES = REPO / "monitoring" / "nodekeeper-alerts.yaml"
POLICY = "defaults:\n  update: always\n  probe_timeout: 1s\n"

# Prometheus' own series, not nodekeeper's.
PROMETHEUS_OWN = {"up"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target, with the dashboard's variables set
    as Grafana would for all nodes."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$node", ".*")
             .replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] for target in panel["targets"]]


def rule_queries() -> list[tuple[str, str]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in loaded["groups"]
            for rule in group["rules"]]


def named_metrics(expr: str) -> set[str]:
    """The series names an expression selects (identifiers followed by `{` or `[`, or
    standing alone as an argument)."""
    return {name for name in re.findall(r"\b([a-z_][a-z0-9_]*)\s*[{\[]", expr)
            if name.startswith(("nodekeeper_", "process_")) or name in PROMETHEUS_OWN}


def exported(address: str) -> set[str]:
    """Every series name nodekeeper's /metrics declares, histograms with their parts."""
    names = set()
    for line in httpx.get(f"http://{address}/metrics", timeout=5).text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
            if kind == "counter":
                names.add(f"{name}_total")
    return names


def test_every_metric_the_dashboard_and_rules_name_is_exported(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd
) -> None:
    address = f"127.0.0.1:{free_port()}"
    make_nodekeeper(containerd.address, settings={"metrics_address": address})
    available = exported(address)
    named = {name for _, expr in panel_queries() + rule_queries()
             for name in named_metrics(expr)} - PROMETHEUS_OWN
    assert "nodekeeper_fallbacks_total" in named  # the parsing finds names at all
    assert named - available == set()


def test_every_panel_query_returns_data_after_pulls_fallbacks_and_an_outage(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd, make_registry: MakeRegistry,
    tmp_path: Path
) -> None:
    upstream, backing = make_registry(), make_registry()
    address = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(containerd.address, policy=POLICY, settings={
        "metrics_address": address, "backing": {"url": backing.url, "timeout": "1s"}})
    prometheus = Prometheus(tmp_path / "prometheus", [address], [RULES])
    try:
        prometheus.start()
        prometheus.wait_for('up{job="nodekeeper"} == 1')
        ref = image_ref(upstream.host, "team/app", "v1")
        with CriClient(daemon.socket) as kubelet:
            first = push_new(upstream.url, "team/app", "v1", seed="dashboard-1")
            assert kubelet.pull(ref) == first.config_digest  # pulled, copied to backing
            _wait_for_copy(address)
            second = push_new(upstream.url, "team/app", "v1", seed="dashboard-2")
            assert kubelet.pull(ref) == second.config_digest  # updated
            upstream.stop()  # the outage: answered with the node's copy, twice: the
            assert kubelet.pull(ref) == second.config_digest  # pull that finds it and
            assert kubelet.pull(ref) == second.config_digest  # one answered during it
        decisions = [e["decision"] for e in daemon.events()
                     if e.get("rpc") == "PullImage" and "decision" in e]
        assert decisions[-1] == "fallback", decisions
        empty = []
        for title, expr in panel_queries():
            try:
                prometheus.wait_for(expr, timeout=30)
            except AssertionError:
                empty.append(f"{title}: {expr}")
        assert empty == []
        unhealthy = [rule["name"] for rule in prometheus.rules() if rule["health"] != "ok"]
        assert unhealthy == []
    finally:
        prometheus.stop()


def _wait_for_copy(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while 'nodekeeper_backing_copies_total{result="finished"}' not in _samples(address):
        assert time.monotonic() < deadline, "no copy to backing finished"
        time.sleep(0.2)


def _samples(address: str) -> dict[str, Any]:
    text = httpx.get(f"http://{address}/metrics", timeout=5).text
    return {line.rpartition(" ")[0]: line.rpartition(" ")[2] for line in text.splitlines()
            if line and not line.startswith("#")}
