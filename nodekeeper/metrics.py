"""Every Prometheus metric nodekeeper exports, in one place, and the endpoint serving them.

prometheus_client costs about 4 MB of memory, so it is loaded only when metrics are
served (`metrics_address` set). Until then each metric is a no-op with the same methods.
"""

from __future__ import annotations

from typing import Any

from nodekeeper.addresses import split_host_port


class _Off:
    """Stands in for a metric while metrics are not served."""

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


_OFF = _Off()
RPCS: Any = _OFF
RPC_SECONDS: Any = _OFF
CONTAINERD_UP: Any = _OFF
IMAGE_EVENTS: Any = _OFF
DECISIONS: Any = _OFF
FALLBACKS: Any = _OFF
PROBE_SECONDS: Any = _OFF
UPSTREAM_REQUESTS: Any = _OFF
OUTAGES: Any = _OFF
OUTAGE_PULLS: Any = _OFF
POLICY_VALID: Any = _OFF
POLICY_LOADED: Any = _OFF
BACKING_UP: Any = _OFF
BACKING_READS: Any = _OFF
COPIES: Any = _OFF
COPY_BYTES: Any = _OFF
IMAGES_STALE: Any = _OFF
BACKING_CORRUPT: Any = _OFF
KUBE_EVENTS: Any = _OFF
KUBE_EVENTS_DROPPED: Any = _OFF
LOOP_LAG: Any = _OFF
STATE_PERSISTENT: Any = _OFF


def enable() -> None:
    """Create the real metrics. Call once, before anything records a value."""
    global RPCS, RPC_SECONDS, CONTAINERD_UP, IMAGE_EVENTS, DECISIONS, FALLBACKS, PROBE_SECONDS
    global UPSTREAM_REQUESTS, POLICY_VALID, POLICY_LOADED, BACKING_UP, BACKING_READS, COPIES
    global COPY_BYTES, KUBE_EVENTS, KUBE_EVENTS_DROPPED, IMAGES_STALE, BACKING_CORRUPT
    global LOOP_LAG, STATE_PERSISTENT, OUTAGES, OUTAGE_PULLS
    from prometheus_client import Counter, Gauge, Histogram

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
    IMAGE_EVENTS = Gauge(
        "nodekeeper_containerd_image_events",
        "1 while containerd's image events are followed, else 0 (every pull asks containerd)",
    )
    DECISIONS = Counter(
        "nodekeeper_pull_decisions",
        "PullImage decisions, by decision and failure kind ('none' when nothing failed)",
        ["decision", "kind"],
    )
    FALLBACKS = Counter(
        "nodekeeper_fallbacks",
        "PullImage answered with the node's or backing's copy because upstream failed, by "
        "failure kind", ["kind"],
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
    OUTAGES = Gauge(
        "nodekeeper_registry_outage", "1 while a registry endpoint is in an outage episode "
        "(unreachable or silent since a probe found it so), else 0", ["endpoint"],
    )
    OUTAGE_PULLS = Counter(
        "nodekeeper_registry_outage_pulls", "Pulls that went on without an endpoint's "
        "answer because it was in an outage episode (after waiting at most outage_wait)",
        ["endpoint"],
    )
    POLICY_VALID = Gauge(
        "nodekeeper_policy_valid", "1 when the policy file on disk loaded; 0 while the last "
        "reload failed and the previous policy is still in force",
    )
    POLICY_LOADED = Gauge(
        "nodekeeper_policy_loaded_timestamp_seconds", "When the policy in force was loaded",
    )
    BACKING_UP = Gauge(
        "nodekeeper_backing_up", "0 while the backing registry is considered down, else 1",
    )
    BACKING_READS = Counter(
        "nodekeeper_backing_reads", "Backing registry lookups on the pull path", ["result"],
    )
    COPIES = Counter(
        "nodekeeper_backing_copies", "Copies to the backing registry, by stage",
        ["result"],
    )
    COPY_BYTES = Counter(
        "nodekeeper_backing_copy_bytes", "Blob bytes copied to the backing registry",
    )
    BACKING_CORRUPT = Counter(
        "nodekeeper_backing_corrupt",
        "Pulls from the backing registry that failed because its bytes did not match "
        "their digest (then pulled from upstream)",
    )
    IMAGES_STALE = Gauge(
        "nodekeeper_images_served_stale",
        "References last answered with a copy upstream did not confirm (fallbacks), until "
        "upstream confirms them again",
    )
    KUBE_EVENTS = Counter(
        "nodekeeper_kubernetes_events",
        "Kubernetes Events posted on pods, by result (created, or updated for a repeat)",
        ["result"],
    )
    KUBE_EVENTS_DROPPED = Counter(
        "nodekeeper_kubernetes_events_dropped",
        "Kubernetes Events not posted, by reason (queue_full, refused, expired, closing, "
        "internal)", ["reason"],
    )
    LOOP_LAG = Histogram(
        "nodekeeper_event_loop_lag_seconds",
        "How late the event loop serving the kubelet ran a timer (sampled every 50 ms)",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    STATE_PERSISTENT = Gauge(
        "nodekeeper_state_persistent", "1 while state writes reach the state directory; 0 "
        "while it fails and state is kept in memory only",
    )


def serve(address: str) -> None:
    """Expose /metrics on host:port in a background thread (prometheus-client's own)."""
    from prometheus_client import start_http_server

    host, port = split_host_port(address)
    start_http_server(port, addr=host)
