"""Metrics: nothing recorded and prometheus_client never loaded while they are off; the
same call sites feed the real metrics once enabled, and the endpoint stops when asked.

Each case runs in a fresh interpreter: enabling registers the metrics in
prometheus_client's process-wide registry, which the rest of the unit tier must not see.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every metric, as its call sites spell it.
RECORD = """
from nodekeeper import metrics
metrics.RPCS.labels("PullImage", "OK").inc()
metrics.RPC_SECONDS.labels("PullImage").observe(0.25)
metrics.CONTAINERD_UP.set(1)
metrics.IMAGE_EVENTS.set(1)
metrics.DECISIONS.labels("fallback", "timeout").inc()
metrics.FALLBACKS.labels("timeout").inc()
metrics.PROBE_SECONDS.labels("registry.test", "ok").observe(0.1)
metrics.UPSTREAM_REQUESTS.labels("registry.test", "HEAD", "200").inc()
metrics.POLICY_VALID.set(1)
metrics.POLICY_LOADED.set(1700000000)
metrics.BACKING_UP.set(0)
metrics.BACKING_READS.labels("ok").inc()
metrics.COPIES.labels("started").inc()
metrics.COPY_BYTES.inc(1234)
metrics.IMAGES_STALE.set(3)
metrics.BACKING_CORRUPT.inc()
metrics.KUBE_EVENTS.labels("created").inc()
metrics.KUBE_EVENTS_DROPPED.labels("queue_full").inc(2)
metrics.LOOP_LAG.observe(0.002)
metrics.STATE_PERSISTENT.set(0)
metrics.OUTAGES.labels("registry.test").set(1)
metrics.OUTAGE_PULLS.labels("registry.test").inc()
metrics.CONTAINERS_BEHIND.set(2)
metrics.UPSTREAM_SAVED.labels("pull").inc()
metrics.UPSTREAM_SAVED_BYTES.inc(4096)
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_off_records_nothing_and_never_loads_prometheus_client() -> None:
    out = run("import sys\nimport nodekeeper.daemon\n" + RECORD
              + "print('prometheus_client' in sys.modules)")
    assert out.strip() == "False"


def test_enabled_metrics_take_every_call_site() -> None:
    out = run("from nodekeeper import metrics\nmetrics.enable()\n" + RECORD + """
import prometheus_client
print(prometheus_client.generate_latest().decode())
""")
    assert 'nodekeeper_fallbacks_total{kind="timeout"} 1.0' in out
    assert 'nodekeeper_kubernetes_events_dropped_total{reason="queue_full"} 2.0' in out
    assert "nodekeeper_backing_copy_bytes_total 1234.0" in out
    assert "nodekeeper_images_served_stale 3.0" in out
    assert "nodekeeper_event_loop_lag_seconds_count 1.0" in out
    assert 'nodekeeper_registry_outage{endpoint="registry.test"} 1.0' in out
    assert 'nodekeeper_upstream_saved_total{what="pull"} 1.0' in out
    assert "nodekeeper_upstream_saved_bytes_total 4096.0" in out
    assert "nodekeeper_containers_behind_tag 2.0" in out
    assert ('nodekeeper_probe_duration_seconds_count{registry="registry.test",result="ok"} 1.0'
            in out)


def test_the_endpoint_serves_stops_and_refuses_a_taken_address() -> None:
    out = run("""
import socket
import httpx
from nodekeeper import metrics
from nodekeeper.errors import StartupError
metrics.enable()
metrics.IMAGES_STALE.set(5)
holder = socket.socket()
holder.bind(("127.0.0.1", 0))
port = holder.getsockname()[1]
holder.close()
stop = metrics.serve(f"127.0.0.1:{port}")
print("served", "nodekeeper_images_served_stale 5.0" in httpx.get(
    f"http://127.0.0.1:{port}/metrics", timeout=5).text)
try:
    metrics.serve(f"127.0.0.1:{port}")
except StartupError as exc:
    print("refused", exc)
stop()
try:
    httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
except httpx.ConnectError:
    print("stopped")
""")
    lines = out.splitlines()
    assert lines[0] == "served True"
    assert lines[1].startswith("refused cannot serve metrics on 127.0.0.1:")
    assert "Address already in use" in lines[1]
    assert lines[2] == "stopped"
