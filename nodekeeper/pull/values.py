"""The values that cross the PullImage core's edges (re-exported by `edges`).

They are defined here, below everything that implements an edge, so that adapters
(containerd/, registry/, state/, kube/) import them from the core and never the other
way round. Plain data: this module imports nothing of nodekeeper but the failure kinds
and credentials.

    Decision     how a PullImage was answered, one vocabulary everywhere
    Answer       one answered (or refused) PullImage: what its log line, state, metrics
                 and the Event on its pod are all written from
    Pod          whose pull it is
    NodeCopy     the image the node holds under a reference
    Check        the last check of a reference upstream
    SharedCheck  another node's last check of a reference, as backing keeps it
    Endpoint, Location, ProbeResult   where a registry answered, and what
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import Credentials


class Decision(str, enum.Enum):
    """How a PullImage was answered: the `decision` of its log line and metrics."""

    LOCAL_PINNED = "local-pinned"
    LOCAL_INTERVAL = "local-interval"
    CLUSTER_INTERVAL = "cluster-interval"
    FRESH = "fresh"
    UPDATED = "updated"
    PULLED = "pulled"
    BACKING = "backing"
    BACKING_FALLBACK = "backing-fallback"
    FALLBACK = "fallback"
    ERROR = "error"

    @classmethod
    def shown_on_pods(cls) -> tuple[Decision, ...]:
        """The decisions that say something the pod's owner should see on the pod (an
        Event), when `kubernetes.event_decisions` lists them."""
        return (cls.FALLBACK, cls.BACKING_FALLBACK, cls.UPDATED)

    @property
    def on_pods(self) -> bool:
        return self in Decision.shown_on_pods()

    @property
    def fallback(self) -> bool:
        """Answered with a copy standing in for an upstream that failed."""
        return self in (Decision.FALLBACK, Decision.BACKING_FALLBACK)

    def __str__(self) -> str:
        return self.value


_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_UID = re.compile(r"^[A-Za-z0-9-]{1,128}$")


@dataclass(frozen=True)
class Pod:  # from PullImageRequest.sandbox_config.metadata
    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, name: str, namespace: str, uid: str) -> Pod | None:
        """The pod a PullImage is for, from its sandbox metadata; None when absent (crictl
        pull sends none) or not what the API server would accept (it names a URL path)."""
        if _SUBDOMAIN.match(name) and _LABEL.match(namespace) and _UID.match(uid):
            return cls(name, namespace, uid)
        return None


@dataclass(frozen=True, kw_only=True)
class Answer:
    """One PullImage as answered: an image (`image_id`), or a refusal (decision ERROR,
    with `kind` and `reason` saying why). The log line, the state's record, the metrics
    and the Event on the pod are all written from this one value."""

    image: str                        # as the kubelet wrote it
    reference: str = ""               # normalized: docker.io/library/postgres:15
    pod: Pod | None = None            # whose pull it is, when the kubelet said
    rule: str = ""
    decision: Decision = Decision.ERROR
    reason: str = ""
    kind: Kind | None = None          # what upstream did, for fallbacks and refusals
    detail: str = ""                  # and what exactly (free of secrets)
    upstream: str = ""                # the registry host asked
    image_id: str = ""                # the answer ('' when refused)
    node_digest: str = ""             # the digest of the node's copy, before the pull
    upstream_digest: str = ""         # the digest upstream named
    digest: str = ""                  # the digest answered
    confirmed: bool = False           # upstream confirmed `digest` during this pull
    probe_ms: float | None = None
    last_confirmed: float | None = None  # when upstream last confirmed the reference
    shared: bool = False              # another pull's round answered this one
    outage: str = ""                  # the endpoint whose outage episode answered instead
    at: float = 0.0                   # when the PullImage arrived
    duration_ms: float = 0.0

    def log_fields(self) -> dict[str, object]:
        """The fields of the PullImage's log line (docs/operations.md names them)."""
        found: dict[str, object] = {
            "reference": self.reference, "rule": self.rule, "decision": self.decision.value,
            "reason": self.reason, "kind": self.kind.value if self.kind else "",
            "detail": self.detail if self.decision is not Decision.ERROR else "",
            "local_digest": self.node_digest, "upstream_digest": self.upstream_digest,
            "probe_ms": self.probe_ms, "image_ref": self.image_id, "outage": self.outage}
        if self.shared:
            found["shared"] = True
        return {k: v for k, v in found.items() if v not in ("", None)}


@dataclass(frozen=True)
class NodeCopy:
    """The image the node holds under a reference: its ID (config digest) and the
    manifest or index digest the reference points at ('' when unknown)."""

    image_id: str
    digest: str


@dataclass(frozen=True)
class Check:
    """The last check of a reference upstream, and the last successful one."""

    checked_at: float
    result: str                       # "ok", or the failure kind
    ok_at: float | None
    digest: str                       # what upstream named at the last success


@dataclass(frozen=True)
class SharedCheck:
    """The last successful check of a reference upstream by any node of the cluster, as
    the backing registry keeps it: which node, when (its clock, in seconds since the
    epoch), and the digest upstream named."""

    digest: str
    at: float
    node: str


@dataclass(frozen=True)
class Endpoint:
    """One place to ask a registry: `base` is the API root (…/v2)."""

    base: str
    host: str
    ca: tuple[str, ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    # Mirrors are told which registry is meant, as containerd does (?ns=docker.io).
    namespace: str = ""
    capabilities: frozenset[str] = field(default=frozenset({"pull", "resolve", "push"}))
    # Client certificates: (certificate file, key file; '' when the key is in the first).
    client: tuple[tuple[str, str], ...] = ()
    # HTTPS that may fall back to plain HTTP (the endpoint after it) when the registry
    # does not speak TLS: containerd's way with loopback registries.
    http_fallback: bool = False


@dataclass(frozen=True)
class Location:
    """A repository on one registry, e.g. ("cache/docker.io/library/postgres")."""

    endpoint: Endpoint
    repository: str
    credentials: Credentials | None = None

    @property
    def base(self) -> str:
        return f"{self.endpoint.base}/{self.repository}"

    def __str__(self) -> str:
        return f"{self.endpoint.host}/{self.repository}"


@dataclass(frozen=True)
class ProbeResult:
    digest: str
    host: str                         # the registry host that answered
    # The request's credentials were used (else the registry answered anonymously).
    authenticated: bool
    # Docker Hub says the pull quota is spent: a HEAD still works, a pull would not.
    pull_quota_spent: bool = False
    # Where the answer came from (with the credentials that worked), for copying the
    # image to backing afterwards.
    source: Location | None = field(default=None, compare=False)
