"""Every Prometheus metric nodekeeper exports, in one place, and the endpoint serving them."""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from nodekeeper.config import split_host_port

RPCS = Counter(
    "nodekeeper_rpcs", "CRI image RPCs answered, by method and gRPC status code",
    ["rpc", "code"],
)
RPC_SECONDS = Histogram(
    "nodekeeper_rpc_duration_seconds", "Time to answer a CRI image RPC", ["rpc"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONTAINERD_UP = Gauge(
    "nodekeeper_containerd_reachable", "1 while containerd's socket answers, else 0",
)


def serve(address: str) -> None:
    """Expose /metrics on host:port in a background thread (prometheus-client's own)."""
    host, port = split_host_port(address)
    prometheus_client.start_http_server(port, addr=host)

DECISIONS = Counter(
    "nodekeeper_pull_decisions", "PullImage decisions, by decision and reason class",
    ["decision", "reason"],
)
FALLBACKS = Counter(
    "nodekeeper_fallbacks", "PullImage answered with the node's copy because upstream failed",
    ["reason"],
)
PROBE_SECONDS = Histogram(
    "nodekeeper_probe_duration_seconds", "Time to learn a tag's digest upstream",
    ["registry", "result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
UPSTREAM_REQUESTS = Counter(
    "nodekeeper_upstream_requests", "HTTP requests nodekeeper sent to registries",
    ["host", "method", "status"],
)
POLICY_VALID = Gauge(
    "nodekeeper_policy_valid", "1 when the policy file on disk loaded; 0 while the last "
    "reload failed and the previous policy is still in force",
)
POLICY_LOADED = Gauge(
    "nodekeeper_policy_loaded_timestamp_seconds", "When the policy in force was loaded",
)
