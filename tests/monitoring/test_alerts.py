"""The alert rules shipped in monitoring/: valid for promtool, each with a summary, a
description pointing into docs/operations.md and a severity, and each seen by
`promtool test rules` to fire on input series showing its trouble and to stay silent on a
healthy node and before its `for` has passed.

The promtool test file is written from CASES below; the annotations it expects are the
rules' own templates with the labels and value of each case filled in, so a template
naming a label the alert does not carry fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "nodekeeper-alerts.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
NODE = {"job": "nodekeeper", "instance": "node-a:9745"}


@dataclass(frozen=True)
class Fires:
    """At `at`, the alert fires once per label set in `labels` (none: it does not fire);
    `value` is what `{{ $value }}` renders to."""

    at: str
    alert: str
    labels: list[dict[str, str]] = field(default_factory=list)
    value: str = ""


@dataclass(frozen=True)
class Case:
    series: dict[str, str]  # series -> promtool's expanding notation
    checks: list[Fires]
    interval: str = "1m"


def node(name: str, **labels: str) -> str:
    body = ", ".join(f'{key}="{value}"' for key, value in {**NODE, **labels}.items())
    return f"{name}{{{body}}}"


HEALTHY = {
    node("up"): "1x600",
    node("nodekeeper_containerd_reachable"): "1x600",
    node("nodekeeper_registry_outage", endpoint="registry.test"): "0x600",
    node("nodekeeper_images_served_stale"): "0x600",
    node("nodekeeper_state_persistent"): "1x600",
    node("nodekeeper_policy_valid"): "1x600",
    node("nodekeeper_backing_up"): "1x600",
    node("nodekeeper_backing_corrupt_total"): "0x600",
    node("nodekeeper_kubernetes_events_dropped_total", reason="queue_full"): "0x600",
    node("nodekeeper_event_loop_lag_seconds_bucket", le="0.05"): "0+1200x600",
    node("nodekeeper_event_loop_lag_seconds_count"): "0+1200x600",
    node("nodekeeper_containers_behind_tag"): "0x600",
}

CASES = [
    # nodekeeper stops answering scrapes at minute 10.
    Case({node("up"): "1x10 0x10"}, [
        Fires("11m", "NodekeeperDown"),
        Fires("14m", "NodekeeperDown", [NODE]),
    ]),
    # Prometheus scrapes something, but no nodekeeper.
    Case({'up{job="other", instance="node-a:9100"}': "1x20"}, [
        Fires("5m", "NodekeeperMetricsAbsent"),
        Fires("15m", "NodekeeperMetricsAbsent", [{"job": "nodekeeper"}]),
    ]),
    Case({node("nodekeeper_containerd_reachable"): "1x10 0x10"}, [
        Fires("11m", "NodekeeperContainerdUnreachable"),
        Fires("14m", "NodekeeperContainerdUnreachable", [NODE]),
    ]),
    # One endpoint in an episode for 10 minutes, another for 2 (too short to alert).
    Case({node("nodekeeper_registry_outage", endpoint="registry.test"): "0x5 1x10 0x5",
          node("nodekeeper_registry_outage", endpoint="other.test"): "0x5 1x2 0x13"}, [
        Fires("8m", "NodekeeperRegistryOutage"),
        Fires("14m", "NodekeeperRegistryOutage", [{**NODE, "endpoint": "registry.test"}]),
        Fires("18m", "NodekeeperRegistryOutage"),
    ]),
    Case({node("nodekeeper_images_served_stale"): "0 3x500"}, [
        Fires("3h", "NodekeeperImagesServedStale"),
        Fires("7h", "NodekeeperImagesServedStale", [NODE], value="3"),
    ]),
    Case({node("nodekeeper_state_persistent"): "1x5 0x20"}, [
        Fires("10m", "NodekeeperStateNotPersistent"),
        Fires("20m", "NodekeeperStateNotPersistent", [NODE]),
    ]),
    Case({node("nodekeeper_policy_valid"): "1x5 0x10"}, [
        Fires("7m", "NodekeeperPolicyInvalid"),
        Fires("12m", "NodekeeperPolicyInvalid", [NODE]),
    ]),
    Case({node("nodekeeper_backing_up"): "1x5 0x20"}, [
        Fires("10m", "NodekeeperBackingDown"),
        Fires("20m", "NodekeeperBackingDown", [NODE]),
    ]),
    # One corrupt download at minute 10: alerts for the next 15 minutes, then clears.
    Case({node("nodekeeper_backing_corrupt_total"): "0x10 1x40"}, [
        Fires("9m", "NodekeeperBackingCorrupt"),
        Fires("12m", "NodekeeperBackingCorrupt", [NODE]),
        Fires("40m", "NodekeeperBackingCorrupt"),
    ]),
    Case({node("nodekeeper_kubernetes_events_dropped_total", reason="refused"): "0x10 4x30",
          node("nodekeeper_kubernetes_events_dropped_total", reason="queue_full"): "0x40"}, [
        Fires("9m", "NodekeeperKubernetesEventsDropped"),
        Fires("12m", "NodekeeperKubernetesEventsDropped",
              [{"instance": NODE["instance"], "reason": "refused"}]),
    ]),
    # 5% of the loop's samples over 50 ms from minute 10 on.
    Case({node("nodekeeper_event_loop_lag_seconds_bucket", le="0.05"):
          "0+1200x10 12000+1140x30",
          node("nodekeeper_event_loop_lag_seconds_count"): "0+1200x40"}, [
        Fires("9m", "NodekeeperEventLoopLag"),
        Fires("14m", "NodekeeperEventLoopLag"),
        Fires("30m", "NodekeeperEventLoopLag", [NODE]),
    ]),
    Case({node("nodekeeper_containers_behind_tag"): "0 2x400"}, [
        Fires("12h", "NodekeeperContainersBehindTag"),
        Fires("26h", "NodekeeperContainersBehindTag", [NODE], value="2"),
    ], interval="5m"),
]


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def render(template: str, labels: dict[str, str], value: str) -> str:
    """Prometheus' rendering of the two template forms the rules use."""

    def label(match: re.Match[str]) -> str:
        assert match[1] in labels, f"template names {match[1]!r}, alert has {labels}"
        return labels[match[1]]

    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", label, template)
    return text.replace("{{ $value }}", value)


def promtool_tests() -> dict[str, Any]:
    annotations = {rule["alert"]: rule["annotations"] for rule in rules()}
    healthy_at = "8h"
    tests = [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in HEALTHY.items()],
        "alert_rule_test": [{"eval_time": healthy_at, "alertname": name, "exp_alerts": []}
                            for name in annotations],
    }]
    for case in CASES:
        tests.append({
            "interval": case.interval,
            "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
            "alert_rule_test": [{
                "eval_time": check.at, "alertname": check.alert,
                "exp_alerts": [{
                    "exp_labels": {**labels, "severity": _severity(check.alert)},
                    "exp_annotations": {key: render(text, labels, check.value)
                                        for key, text in annotations[check.alert].items()},
                } for labels in check.labels],
            } for check in case.checks],
        })
    return {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}


def _severity(alert: str) -> str:
    [rule] = [rule for rule in rules() if rule["alert"] == alert]
    severity: str = rule["labels"]["severity"]
    return severity


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install Debian's prometheus package (scripts/setup.sh)"
    return found


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_every_alert_has_a_severity_a_summary_and_what_to_do() -> None:
    anchors = {_anchor(line) for line in OPERATIONS.read_text().splitlines()
               if line.startswith("#")}
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        pointers = re.findall(r"docs/operations\.md#([\w-]+)",
                              rule["annotations"]["description"])
        assert pointers, f"{rule['alert']} does not point into docs/operations.md"
        for pointer in pointers:
            assert pointer in anchors, f"{rule['alert']}: no section #{pointer}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_alert_fires_in_a_case_and_stays_silent_before() -> None:
    names = {rule["alert"] for rule in rules()}
    fired = {check.alert for case in CASES for check in case.checks if check.labels}
    silent = {check.alert for case in CASES for check in case.checks if not check.labels}
    assert fired == names
    assert silent == names


def test_promtool_sees_each_alert_fire_and_not_fire(tmp_path: Path) -> None:
    written = tmp_path / "alerts-test.yaml"
    written.write_text(yaml.safe_dump(promtool_tests(), sort_keys=False))
    done = subprocess.run([promtool(), "test", "rules", str(written)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
