"""Every Prometheus metric nodekeeper exports, in one place, and the endpoint serving them.

prometheus_client costs about 4 MB of memory, so it is loaded only when metrics are
served (`metrics_address` set). Each module attribute below is a slot that call sites use
as the metric itself (`metrics.FALLBACKS.labels(kind).inc()`); until `enable()` puts the
real metric in it, it holds OFF, which records nothing. The real metrics and OFF both
satisfy the Protocols here, so the call sites are checked against either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from nodekeeper.addresses import split_host_port
from nodekeeper.errors import StartupError


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


M = TypeVar("M", covariant=True)


class Family(Protocol[M]):
    """A metric with labels: one child metric per combination of label values."""

    def labels(self, *values: str) -> M: ...


class _Off:
    """What every slot holds while metrics are not served: records nothing."""

    def labels(self, *values: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


OFF = _Off()


class CounterSlot:
    def __init__(self) -> None:
        self.metric: Counter = OFF

    def inc(self, amount: float = 1) -> None:
        self.metric.inc(amount)


class GaugeSlot:
    def __init__(self) -> None:
        self.metric: Gauge = OFF

    def set(self, value: float) -> None:
        self.metric.set(value)


class HistogramSlot:
    def __init__(self) -> None:
        self.metric: Histogram = OFF

    def observe(self, amount: float) -> None:
        self.metric.observe(amount)


C = TypeVar("C", Counter, Gauge, Histogram)


class FamilySlot(Generic[C]):
    def __init__(self) -> None:
        self.metric: Family[C] = OFF

    def labels(self, *values: str) -> C:
        return self.metric.labels(*values)


RPCS = FamilySlot[Counter]()
RPC_SECONDS = FamilySlot[Histogram]()
CONTAINERD_UP = GaugeSlot()
IMAGE_EVENTS = GaugeSlot()
DECISIONS = FamilySlot[Counter]()
FALLBACKS = FamilySlot[Counter]()
PROBE_SECONDS = FamilySlot[Histogram]()
UPSTREAM_REQUESTS = FamilySlot[Counter]()
UPSTREAM_SAVED = FamilySlot[Counter]()
UPSTREAM_SAVED_BYTES = CounterSlot()
OUTAGES = FamilySlot[Gauge]()
OUTAGE_PULLS = FamilySlot[Counter]()
POLICY_VALID = GaugeSlot()
POLICY_LOADED = GaugeSlot()
BACKING_UP = GaugeSlot()
BACKING_READS = FamilySlot[Counter]()
COPIES = FamilySlot[Counter]()
COPY_BYTES = CounterSlot()
IMAGES_STALE = GaugeSlot()
BACKING_CORRUPT = CounterSlot()
LEASES = FamilySlot[Counter]()
KUBE_EVENTS = FamilySlot[Counter]()
KUBE_EVENTS_DROPPED = FamilySlot[Counter]()
LOOP_LAG = HistogramSlot()
STATE_PERSISTENT = GaugeSlot()
CONTAINERS_BEHIND = GaugeSlot()


def enable() -> None:
    """Create the real metrics. Call once, before anything records a value."""
    import prometheus_client as prometheus

    RPCS.metric = prometheus.Counter(
        "nodekeeper_rpcs", "CRI image RPCs answered, by method and gRPC status code",
        ["rpc", "code"],
    )
    RPC_SECONDS.metric = prometheus.Histogram(
        "nodekeeper_rpc_duration_seconds", "Time to answer a CRI image RPC", ["rpc"],
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    )
    CONTAINERD_UP.metric = prometheus.Gauge(
        "nodekeeper_containerd_reachable", "1 while containerd's socket answers, else 0",
    )
    IMAGE_EVENTS.metric = prometheus.Gauge(
        "nodekeeper_containerd_image_events",
        "1 while containerd's image events are followed, else 0 (every pull asks containerd)",
    )
    DECISIONS.metric = prometheus.Counter(
        "nodekeeper_pull_decisions",
        "PullImage decisions, by decision and failure kind ('none' when nothing failed)",
        ["decision", "kind"],
    )
    FALLBACKS.metric = prometheus.Counter(
        "nodekeeper_fallbacks",
        "PullImage answered with the node's or backing's copy because upstream failed, by "
        "failure kind", ["kind"],
    )
    PROBE_SECONDS.metric = prometheus.Histogram(
        "nodekeeper_probe_duration_seconds", "Time to learn a tag's digest upstream",
        ["registry", "result"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
    )
    UPSTREAM_REQUESTS.metric = prometheus.Counter(
        "nodekeeper_upstream_requests", "HTTP requests nodekeeper sent to registries",
        ["host", "method", "status"],
    )
    UPSTREAM_SAVED.metric = prometheus.Counter(
        "nodekeeper_upstream_saved",
        "What the cluster saved the upstream registry: image pulls answered from backing "
        "(what=pull) and checks answered by another node's shared check (what=check)",
        ["what"],
    )
    UPSTREAM_SAVED_BYTES.metric = prometheus.Counter(
        "nodekeeper_upstream_saved_bytes",
        "Bytes a copy to backing read from the node's own content store, not upstream",
    )
    OUTAGES.metric = prometheus.Gauge(
        "nodekeeper_registry_outage", "1 while a registry endpoint is in an outage episode "
        "(unreachable or silent since a probe found it so), else 0", ["endpoint"],
    )
    OUTAGE_PULLS.metric = prometheus.Counter(
        "nodekeeper_registry_outage_pulls", "Pulls that went on without an endpoint's "
        "answer because it was in an outage episode (after waiting at most outage_wait)",
        ["endpoint"],
    )
    POLICY_VALID.metric = prometheus.Gauge(
        "nodekeeper_policy_valid", "1 when the policy file on disk loaded; 0 while the last "
        "reload failed and the previous policy is still in force",
    )
    POLICY_LOADED.metric = prometheus.Gauge(
        "nodekeeper_policy_loaded_timestamp_seconds", "When the policy in force was loaded",
    )
    BACKING_UP.metric = prometheus.Gauge(
        "nodekeeper_backing_up", "0 while the backing registry is considered down, else 1",
    )
    BACKING_READS.metric = prometheus.Counter(
        "nodekeeper_backing_reads", "Backing registry lookups on the pull path", ["result"],
    )
    COPIES.metric = prometheus.Counter(
        "nodekeeper_backing_copies", "Copies to the backing registry, by stage",
        ["result"],
    )
    COPY_BYTES.metric = prometheus.Counter(
        "nodekeeper_backing_copy_bytes", "Blob bytes copied to the backing registry",
    )
    LEASES.metric = prometheus.Counter(
        "nodekeeper_backing_leases",
        "Digests backing lacked: leases won, held by another node, not to be had (backing "
        "failed); waits for another node's fetch that ended with the image in backing "
        "(arrived) or without (gave_up)", ["result"],
    )
    BACKING_CORRUPT.metric = prometheus.Counter(
        "nodekeeper_backing_corrupt",
        "Pulls from the backing registry that failed because its bytes did not match "
        "their digest (then pulled from upstream)",
    )
    IMAGES_STALE.metric = prometheus.Gauge(
        "nodekeeper_images_served_stale",
        "References last answered with a copy upstream did not confirm (fallbacks), until "
        "upstream confirms them again",
    )
    KUBE_EVENTS.metric = prometheus.Counter(
        "nodekeeper_kubernetes_events",
        "Kubernetes Events posted on pods, by result (created, or updated for a repeat)",
        ["result"],
    )
    KUBE_EVENTS_DROPPED.metric = prometheus.Counter(
        "nodekeeper_kubernetes_events_dropped",
        "Kubernetes Events not posted, by reason (queue_full, refused, expired, closing, "
        "internal)", ["reason"],
    )
    LOOP_LAG.metric = prometheus.Histogram(
        "nodekeeper_event_loop_lag_seconds",
        "How late the event loop serving the kubelet ran a timer (sampled every 50 ms)",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    STATE_PERSISTENT.metric = prometheus.Gauge(
        "nodekeeper_state_persistent", "1 while state writes reach the state directory; 0 "
        "while it fails and state is kept in memory only",
    )
    CONTAINERS_BEHIND.metric = prometheus.Gauge(
        "nodekeeper_containers_behind_tag",
        "Running containers whose image is not the latest digest nodekeeper knows for the "
        "tag they were started from",
    )


def serve(address: str) -> Callable[[], None]:
    """Expose /metrics on host:port in a background thread (prometheus-client's own);
    returns what stops it (it blocks up to half a second: call it off the loop)."""
    from prometheus_client import start_http_server

    host, port = split_host_port(address)
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {address}: "
                           f"{exc.strerror or exc}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop
