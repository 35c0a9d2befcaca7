"""Kubernetes Events on the pod, for every PullImage answer upstream did not confirm.

    PullImage answer ── observe(answer) ──> pending: at most QUEUE distinct Events;
                        sync, O(1), never      a repeat only counts up its entry
                        raises or waits                 │ one worker task
                                                        ▼
                        core/v1 Event in the pod's namespace: POST the first time, then
                        PATCH count, lastTimestamp and message (what the kubelet's own
                        recorder does, so `kubectl describe pod` shows "x3 over 5m").
                        Each request is bounded by the timeout; failures are retried with
                        back-off (BACKOFF_FIRST doubling to BACKOFF_MAX) for RETRY_FOR
                        seconds; refusals (401, 403, 4xx) are dropped at once.

Why core/v1 and not events.k8s.io/v1: the kubelet posts its pod Events (Pulling, Pulled)
through core/v1, `kubectl describe pod` lists core/v1 Events by the pod's name, namespace
and uid, and the node identity may create and patch them under the Node authorizer. The
fields events.k8s.io names reportingController and reportingInstance are core/v1's
reportingComponent and reportingInstance: both are set, as is source.

Repeats are one Event: the same pod, reason and message, where the message is compared
without its "last confirmed ... ago", which moves with the clock (the Event shows the
latest). A new outage after upstream confirmed the image again is a new Event.

Drops (queue full, refused, given up after RETRY_FOR, internal error, still pending at
close) are counted in nodekeeper_kubernetes_events_dropped and logged once per episode:
an episode ends when an Event is posted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from nodekeeper import logs, metrics
from nodekeeper.config import KubernetesConfig
from nodekeeper.errors import PostFailed
from nodekeeper.failures import Kind
from nodekeeper.kube import kubeconfig
from nodekeeper.pull.edges import Answer, Decision, Pod, Sink
from nodekeeper.timetext import ago_in_words

REASON_FALLBACK = "ImageFallback"  # fallback and backing-fallback: one reason to select on
REASON_UPDATED = "ImageUpdated"
REASON_BEHIND = "ImageBehindTag"  # a running container, not a pull: host/behindtag.py
_NORMAL = (REASON_UPDATED, REASON_BEHIND)
COMPONENT = "nodekeeper"

QUEUE = 256
# Posted Events kept for aggregation (about 600 bytes each): a node runs at most a few
# hundred containers (110 pods by default), each naming one or two images.
REMEMBERED = 1024
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
RETRY_FOR = 300.0
CLOSE_GRACE = 2.0
MAX_MESSAGE = 1024  # events.k8s.io's limit on a note; core/v1 takes it unchanged
MAX_DETAIL = 200
_MAX_NAME = 253
_MAX_INSTANCE = 128

_TROUBLE = {
    Kind.UNREACHABLE: "unreachable",
    Kind.TIMEOUT: "not answering",
    Kind.SERVER_ERROR: "failing",
    Kind.RATE_LIMITED: "rate-limiting",
    Kind.NOT_FOUND: "no longer has the tag",
    Kind.UNAUTHORIZED: "refusing the credentials",
    Kind.INVALID: "answering something invalid",
}
_COPY = {Decision.FALLBACK: "the node's copy",
         Decision.BACKING_FALLBACK: "the backing registry's copy"}

_log = logs.get("events")


@dataclass(frozen=True)
class Behind:
    """A running container whose tag names a newer digest than the one it runs."""

    pod: Pod
    reference: str  # the tag, normalized
    runs: str  # the digest the container runs
    digest: str  # the digest the tag names
    since: float  # when the tag was first seen naming it (epoch seconds)


Notice = Answer | Behind


def _statement(notice: Notice) -> str:
    """The message without the age of the last confirmation."""
    if isinstance(notice, Behind):
        return (f"runs {notice.runs}; the tag {notice.reference} is {notice.digest} since "
                f"{_timestamp(notice.since)}; restart the pod to run it")
    answer = notice
    if answer.decision is Decision.UPDATED:
        source = f" at {answer.upstream}" if answer.upstream else ""
        change = (f"{answer.node_digest} -> {answer.digest}" if answer.node_digest
                  else f"now {answer.digest}")
        return f"{answer.reference} updated upstream{source}: {change}"
    trouble = _TROUBLE.get(answer.kind, "failing") if answer.kind else "failing"
    detail = answer.detail[:MAX_DETAIL]
    who = f"upstream {answer.upstream}" if answer.upstream else "upstream"
    copy = _COPY.get(answer.decision, "a copy")
    during = f", during an outage of {answer.outage}" if answer.outage else ""
    return (f"{who} {trouble}{f' ({detail})' if detail else ''}{during}: started with "
            f"{copy} of {answer.reference}, {answer.digest}")


def message(notice: Notice, now: float) -> str:
    """The Event's message, e.g. "upstream registry-1.docker.io unreachable (timeout after
    2s): started with the node's copy of docker.io/library/postgres:15, sha256:..., last
    confirmed 3 days ago"."""
    text = _statement(notice)
    if isinstance(notice, Answer) and notice.decision is not Decision.UPDATED:
        text += (f", last confirmed {ago_in_words(now - notice.last_confirmed)}"
                 if notice.last_confirmed is not None
                 else ", never confirmed upstream from this node")
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def event_name(pod_name: str, stamp_ns: int) -> str:
    """`<pod>.<hex nanoseconds>`, the kubelet's naming, cut to fit a DNS subdomain."""
    suffix = f".{stamp_ns:x}"
    return pod_name[:_MAX_NAME - len(suffix)].rstrip(".-") + suffix


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


Key = tuple[Pod, str, str, float | None]


@dataclass
class _Pending:
    notice: Notice
    reason: str
    first: float
    last: float
    since: float  # monotonic time of the latest observation, for RETRY_FOR
    count: int = 1


@dataclass
class _Posted:
    name: str
    count: int


class Events:
    """Built from config; started and closed by the daemon; fed by `observe`."""

    def __init__(self, node: str, decisions: Collection[Decision], sink: Sink | None, *,
                 timeout: float = 5.0, queue: int = QUEUE, retry_for: float = RETRY_FOR,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 behind: bool = False) -> None:
        self.node = node
        self._decisions = frozenset(decisions)
        self._behind = behind
        self._sink = sink
        self._timeout = timeout
        self._queue = queue
        self._retry_for = retry_for
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._pending: OrderedDict[Key, _Pending] = OrderedDict()
        self._posted: OrderedDict[Key, _Posted] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._backoff = 0.0
        self._failing = False
        self._dropping = False
        self._episode_drops = 0
        self._stamp = 0
        self.posted: Counter[str] = Counter()  # created, updated
        self.dropped: Counter[str] = Counter()  # by reason

    @classmethod
    def from_config(cls, settings: KubernetesConfig) -> Events:
        node = settings.node_name or socket.gethostname().lower()
        if not settings.events:
            _log.info("kubernetes events off", setting="kubernetes.events: false")
            return cls(node, settings.event_decisions, None, behind=settings.behind_events)
        path = settings.kubeconfig or kubeconfig.DEFAULT_PATH
        try:
            loaded = kubeconfig.load(path)
        except kubeconfig.KubeconfigError as exc:
            if settings.kubeconfig:
                raise
            _log.warning("kubernetes events off: the kubelet's kubeconfig cannot be used",
                         error=str(exc),
                         fix="set kubernetes.kubeconfig, or kubernetes.events: false")
            return cls(node, settings.event_decisions, None, behind=settings.behind_events)
        # The HTTP client only when events are on (the sink never imports this module).
        from nodekeeper.kube.sink import ApiSink

        _log.info("kubernetes events on", kubeconfig=path, server=loaded.server, node=node,
                  decisions=sorted(settings.event_decisions), behind=settings.behind_events)
        return cls(node, settings.event_decisions, ApiSink(path, settings.timeout, loaded),
                   timeout=settings.timeout, behind=settings.behind_events)

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    @property
    def pending(self) -> int:
        return sum(item.count for item in self._pending.values())

    # -- the caller's side: never waits, never raises ----------------------------------

    def observe(self, answer: Answer) -> None:
        """An answered PullImage: an Event when its decision is one to show on pods."""
        if answer.pod is None or answer.decision not in self._decisions:
            return
        updated = answer.decision is Decision.UPDATED
        self._queue_up(answer, answer.pod, REASON_UPDATED if updated else REASON_FALLBACK,
                       None if updated else answer.last_confirmed)

    def observe_behind(self, behind: Behind) -> None:
        """A running container behind its tag: an Event when `behind` is configured."""
        if self._behind:
            self._queue_up(behind, behind.pod, REASON_BEHIND, None)

    def _queue_up(self, notice: Notice, pod: Pod, reason: str,
                  confirmed: float | None) -> None:
        try:
            if self._sink is None:
                return
            if self._closed:
                self._drop("closing", 1, "observed after close")
                return
            key: Key = (pod, reason, _statement(notice), confirmed)
            now, since = self._clock(), self._monotonic()
            item = self._pending.get(key)
            if item is not None:
                item.count += 1
                item.notice, item.last, item.since = notice, now, since
            elif len(self._pending) >= self._queue:
                self._drop("queue_full", 1, f"{self._queue} Events already wait")
                return
            else:
                self._pending[key] = _Pending(notice, reason, now, now, since)
            self._idle.clear()
            self._wakeup.set()
        except Exception as exc:  # a bug here must not fail a pull
            self._drop("internal", 1, repr(exc))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._sink is not None and self._task is None:
            self._task = asyncio.create_task(self._run(self._sink), name="kubernetes-events")

    async def close(self) -> None:
        """Post what can be posted within CLOSE_GRACE, drop (and count) the rest."""
        self._closed = True
        if self._task is not None:
            if self._pending:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), CLOSE_GRACE)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = self.pending
        if left:
            self._drop("closing", left, "still pending at shutdown")
            self._pending.clear()
        if self._sink is not None:
            await self._sink.close()

    # -- the worker --------------------------------------------------------------------

    async def _run(self, sink: Sink) -> None:
        try:
            await asyncio.wait_for(sink.prepare(), self._timeout)
        except Exception as exc:  # retried with every post
            _log.warning("kubernetes client not ready; trying again with the first Event",
                         error=_text(exc))
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._expire()
            if not self._pending:
                continue
            key, item = next(iter(self._pending.items()))
            try:
                result = await self._post(sink, key, item)
            except PostFailed as failure:
                if failure.retry:
                    self._failed(failure.detail)
                else:
                    self._pending.pop(key, None)
                    self._drop("refused", item.count, failure.detail)
                await self._sleep(self._next_backoff())
                continue
            except Exception as exc:  # a bug: drop this Event, keep the worker
                self._pending.pop(key, None)
                self._drop("internal", item.count, _text(exc))
                continue
            self._succeeded(result)

    async def _post(self, sink: Sink, key: Key, item: _Pending) -> str:
        sent = item.count
        pod = item.notice.pod
        assert pod is not None  # observe() keeps only answers for a pod
        text = message(item.notice, self._clock())
        posted = self._posted.get(key)
        total = sent
        result = "created"
        if posted is not None:
            total += posted.count
            try:
                await self._bounded(sink.patch(pod.namespace, posted.name, {
                    "count": total, "lastTimestamp": _timestamp(item.last), "message": text}))
                result = "updated"
            except PostFailed as failure:
                if not failure.missing:
                    raise
                posted = None  # expired from the API server: post it anew, count kept
        if posted is None:
            # Unique in this process even for Events observed in the same nanosecond.
            self._stamp = max(int(item.first * 1e9), self._stamp + 1)
            name = event_name(pod.name, self._stamp)
            await self._bounded(sink.create(pod.namespace, self._body(item, name, total, text)))
            posted = _Posted(name, total)
        posted.count = total
        self._posted[key] = posted
        self._posted.move_to_end(key)
        while len(self._posted) > REMEMBERED:
            self._posted.popitem(last=False)
        item.count -= sent  # repeats observed while posting wait for the next round
        if item.count <= 0:
            self._pending.pop(key, None)
        return result

    async def _bounded(self, call: Awaitable[None]) -> None:
        try:
            await asyncio.wait_for(call, self._timeout)
        except asyncio.TimeoutError:
            raise PostFailed(f"no answer within {self._timeout:g}s", retry=True) from None

    def _body(self, item: _Pending, name: str, count: int, text: str) -> dict[str, Any]:
        pod = item.notice.pod
        assert pod is not None
        instance = self.node[:_MAX_INSTANCE]
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace,
                               "name": pod.name, "uid": pod.uid},
            "reason": item.reason, "message": text,
            "type": "Normal" if item.reason in _NORMAL else "Warning",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT, "reportingInstance": instance,
            "firstTimestamp": _timestamp(item.first), "lastTimestamp": _timestamp(item.last),
            "count": count,
        }

    def _expire(self) -> None:
        limit = self._monotonic() - self._retry_for
        for key, item in list(self._pending.items()):
            if item.since < limit:
                del self._pending[key]
                self._drop("expired", item.count, f"not posted within {self._retry_for:g}s")

    def _next_backoff(self) -> float:
        self._backoff = min(self._backoff * 2, BACKOFF_MAX) if self._backoff else BACKOFF_FIRST
        return self._backoff * random.uniform(0.8, 1.2)

    # -- accounting: counted always, logged once per episode ----------------------------

    def _failed(self, detail: str) -> None:
        if not self._failing:
            self._failing = True
            _log.warning("kubernetes API server failing; Events wait and are retried",
                         error=detail, retry_for_s=self._retry_for)

    def _drop(self, reason: str, count: int, detail: str) -> None:
        self.dropped[reason] += count
        self._episode_drops += count
        metrics.KUBE_EVENTS_DROPPED.labels(reason).inc(count)
        if not self._dropping:
            self._dropping = True
            _log.warning("kubernetes Events dropped; counted in "
                         "nodekeeper_kubernetes_events_dropped, logged again after the "
                         "next Event posted", reason=reason, count=count, detail=detail)

    def _succeeded(self, result: str) -> None:
        self.posted[result] += 1
        metrics.KUBE_EVENTS.labels(result).inc()
        self._backoff = 0.0
        if self._failing or self._dropping:
            _log.info("kubernetes Events posted again", dropped=self._episode_drops)
        self._failing = self._dropping = False
        self._episode_drops = 0


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
