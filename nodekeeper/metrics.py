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
