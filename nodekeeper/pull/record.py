"""What one answered PullImage leaves behind, all written from its one `Answer`:

    state     the successful check, or the reference answered without upstream's
              confirmation (stale); the decision, for `nodekeeper status`
    metrics   the decision and failure kind; fallbacks by kind
    Event     on the pod, for the decisions shown on pods (kube/events.py)
    log       a warning for every answer standing in for an upstream that failed
              (the PullImage's own line is cri.py's, from the same answer)

A round of work shared by several callers (singleflight) is `settled` once, inside the
round, so that what upstream said is kept even when the caller that started the round
gave up; then each caller `answered` counts in metrics and gets its own Event, and the
decision is recorded once (by the caller that ran the round; every refused caller).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nodekeeper import logs, metrics
from nodekeeper.pull.edges import Answer, Decision, Observer, StateStore
from nodekeeper.timetext import ago

_log = logs.get("puller")

# What an answer saved the upstream registry, for nodekeeper_upstream_saved_total.
_SAVED = {Decision.BACKING: "pull", Decision.CLUSTER_INTERVAL: "check"}


class Recorder:
    def __init__(self, state: StateStore, events: Observer | None,
                 clock: Callable[[], float]) -> None:
        self._state = state
        self._events = events
        self._clock = clock

    def settled(self, answer: Answer) -> None:
        """Once per round: what the answer says about the reference upstream."""
        saved = _SAVED.get(answer.decision)
        if saved:
            metrics.UPSTREAM_SAVED.labels(saved).inc()
        if answer.confirmed:
            self._state.record_check(answer.reference, None, answer.digest)
            self._state.clear_stale(answer.reference)
        if answer.decision.fallback:
            assert answer.kind is not None
            self._state.mark_stale(answer.reference, answer.digest, answer.kind)
            metrics.FALLBACKS.labels(answer.kind.value).inc()
            self._warn(answer)

    def answered(self, answer: Answer) -> None:
        """Once per caller."""
        metrics.DECISIONS.labels(answer.decision.value,
                                 answer.kind.value if answer.kind else "none").inc()
        if self._events is not None and answer.pod is not None and answer.decision.on_pods:
            self._events.observe(answer)
        if answer.shared:
            return  # the caller that ran the round records the decision
        # Written once the answer is on its way: the kubelet need not wait for the disk.
        asyncio.get_running_loop().call_soon(self._state.record_decision, answer)

    def _warn(self, answer: Answer) -> None:
        assert answer.kind is not None
        where = ("the node's copy" if answer.decision is Decision.FALLBACK
                 else "the backing registry's copy")
        confirmed = answer.last_confirmed
        _log.warning(f"upstream failed; answering with {where}", image=answer.reference,
                     kind=answer.kind.value, detail=answer.detail, digest=answer.digest,
                     last_confirmed=ago(self._clock() - confirmed) if confirmed else "never",
                     rule=answer.rule, **({"outage": answer.outage} if answer.outage else {}))
