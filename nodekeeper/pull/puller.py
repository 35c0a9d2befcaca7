"""PullImage's I/O: it gathers what decision.py decides with, and carries out each step.

    pull(request)
      a Job: the reference, rule, credentials and state, read once
      the node's copy vouched for by image events and no network needed -> answered at once
      otherwise, one round per reference and credentials (singleflight):
        loop: step = decision.next_step(pull)
              Probe       upstream digest, bounded by probe_timeout (the round is sealed
                          first: later callers start a round of their own)
              AskBacking  does the backing registry hold the digest? is it public?
              PullFrom    containerd pulls, from upstream or from backing
              Serve       the answer          Refuse  a clear error

What it records: the check (state), who was seen to pull (state), the decision (state,
log, metrics), the copy to backing (write-through), which references are answered with a
copy upstream did not confirm (state), and for those an Event on each pod (events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodekeeper import logs, metrics
from nodekeeper.errors import ContainerdError, PullFailed, PullRefused, RequestError
from nodekeeper.failures import Failure, Kind
from nodekeeper.kube.events import Pod, Served
from nodekeeper.pull.credentials import ANONYMOUS, Credentials, fingerprint
from nodekeeper.pull.decision import (
    Access,
    AskBacking,
    BackingView,
    Decision,
    Failed,
    NodeCopy,
    Probe,
    Probed,
    Pull,
    Pulled,
    PullFrom,
    Refuse,
    Result,
    Serve,
    Source,
    next_step,
)
from nodekeeper.pull.edges import BackingStore, Images, Observer, StateStore, Upstream
from nodekeeper.pull.policy import Policy, Rule
from nodekeeper.pull.reference import InvalidReference, Reference, parse
from nodekeeper.pull.singleflight import Seal, SingleFlight
from nodekeeper.registry import ProbeResult
from nodekeeper.registry.copy import Location
from nodekeeper.registry.hosts import default_host
from nodekeeper.state.memory import PullRecord
from nodekeeper.timetext import ago

_log = logs.get("puller")


@dataclass(frozen=True)
class PullRequest:
    image: str                        # as the kubelet wrote it
    credentials: Credentials | None
    # The request as it came, opaque here: Images.pull forwards it, so that fields
    # nodekeeper does not interpret still reach containerd.
    original: object
    pod: Pod | None = None            # whose pull this is, from the sandbox metadata


@dataclass
class Outcome:
    """How a PullImage was answered: everything its log line and `status` show."""

    image: str
    reference: str = ""
    rule: str = ""
    decision: Decision = Decision.ERROR
    reason: str = ""
    kind: Kind | None = None          # what upstream did, for fallbacks and errors
    detail: str = ""                  # and what exactly
    upstream: str = ""                # the registry host asked
    image_ref: str = ""
    local_digest: str = ""
    upstream_digest: str = ""
    digest: str = ""                  # the digest answered
    probe_ms: float | None = None
    last_confirmed: float | None = None  # when upstream last confirmed the reference
    shared: bool = False
    outage: str = ""                  # the endpoint whose outage episode answered

    def fields(self) -> dict[str, object]:
        found: dict[str, object] = {
            "reference": self.reference, "rule": self.rule, "decision": self.decision.value,
            "reason": self.reason, "kind": self.kind.value if self.kind else "",
            "detail": self.detail if self.decision is not Decision.ERROR else "",
            "local_digest": self.local_digest, "upstream_digest": self.upstream_digest,
            "probe_ms": self.probe_ms, "outage": self.outage}
        if self.shared:
            found["shared"] = True
        return {k: v for k, v in found.items() if v not in ("", None)}


@dataclass(frozen=True)
class _Job:
    """One PullImage, as read once when it arrives."""

    request: PullRequest
    ref: Reference
    name: str                         # str(ref): containerd's name for it
    rule: Rule
    credentials: Credentials | None   # those containerd would use for this registry
    who: str                          # their keyed fingerprint, or ANONYMOUS
    access: Access
    last_ok: float | None
    last_digest: str

    @property
    def registry_host(self) -> str:
        """The host containerd asks for this registry unless a hosts.toml says otherwise."""
        return default_host(self.ref.domain)

    def facts(self, node: NodeCopy | None, now: float, backing: bool) -> Pull:
        return Pull(self.ref, self.rule.label, self.rule.settings, node, self.access, now,
                    self.last_ok, self.last_digest, backing)


# Answers that say something the pod's owner should see on the pod (kube/events.py).
_NOTICED = frozenset({Decision.FALLBACK, Decision.BACKING_FALLBACK, Decision.UPDATED})


class Puller:
    def __init__(self, images: Images, upstream: Upstream, state: StateStore,
                 policy: Callable[[], Policy], backing: BackingStore | None = None,
                 events: Observer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._images = images
        self._upstream = upstream
        self._state = state
        self._policy = policy
        self._backing = backing
        self._events = events
        self._clock = clock
        self._rounds: SingleFlight[tuple[str, str], Outcome] = SingleFlight()

    async def pull(self, request: PullRequest) -> Outcome:
        started = self._clock()
        job = self._job(request)
        known = self._answer_known(job)
        if known is not None:
            self._record(known, started)
            self._notice(request, known)
            return known
        try:
            outcome, shared = await self._rounds.run(
                (job.name, job.who), lambda seal: self._decide(job, seal))
        except PullFailed as failure:
            details = failure.details
            self._record(Outcome(request.image, job.name, job.rule.label,
                                 reason=failure.message, kind=failure.kind,
                                 local_digest=str(details.get("local_digest", "")),
                                 upstream_digest=str(details.get("upstream_digest", ""))),
                         started)
            raise
        if shared:
            outcome = dataclasses.replace(outcome, image=request.image, shared=True)
        self._record(outcome, started)
        self._notice(request, outcome)
        return outcome

    def _job(self, request: PullRequest) -> _Job:
        try:
            ref = parse(request.image)
        except InvalidReference as exc:
            raise RequestError(f"invalid image reference {request.image!r}: {exc}") from None
        credentials = self._upstream.applicable(ref, request.credentials)
        who = fingerprint(self._state.key, ref.name, credentials)
        public = self._state.seen_working(ref.name, ANONYMOUS)
        these = who != ANONYMOUS and self._state.seen_working(ref.name, who)
        check = self._state.check(str(ref))
        return _Job(request, ref, str(ref), self._policy().rule_for(ref), credentials, who,
                    Access(public, these, anonymous=who == ANONYMOUS),
                    check.ok_at if check else None, check.digest if check else "")

    def _answer_known(self, job: _Job) -> Outcome | None:
        """The node's copy, when image events vouch for it and no network is needed:
        answered at once, without containerd, a task or a round."""
        image_id = self._images.known_image_id(job.name)
        if not image_id:
            return None
        node = NodeCopy(image_id, job.ref.digest or job.last_digest)
        pull = job.facts(node, self._clock(), self._backing is not None)
        step = next_step(pull)
        if not isinstance(step, Serve):
            return None
        return self._served(job, pull, step, None)

    async def _decide(self, job: _Job, seal: Seal) -> Outcome:
        try:
            return await self._steps(job, seal)
        except ContainerdError as exc:  # containerd itself failed outside a pull
            raise PullFailed(None, exc.message, exc, {"rule": job.rule.label}) from None

    async def _steps(self, job: _Job, seal: Seal) -> Outcome:
        # One ImageStatus (or what image events kept true) says whether the node has a
        # copy; what the name points at is asked only when the network will be used.
        image_id = await self._images.held_image_id(job.name)
        node = NodeCopy(image_id, job.ref.digest or job.last_digest) if image_id else None
        pull = job.facts(node, self._clock(), self._backing is not None)
        step = next_step(pull)
        if node is not None and not isinstance(step, Serve | Refuse):
            node = NodeCopy(image_id, await self._images.target_digest(job.name))
            pull = dataclasses.replace(pull, node=node)
            step = next_step(pull)
        probe: ProbeResult | None = None
        probe_ms: float | None = None
        while True:
            result: Result
            if isinstance(step, Serve):
                return self._served(job, pull, step, probe_ms, probe)
            if isinstance(step, Refuse):
                raise self._refused(job, pull, step, probe_ms)
            if isinstance(step, Probe):
                seal()
                probe_started = self._clock()
                probe, result = await self._probe(job)
                probe_ms = round((self._clock() - probe_started) * 1000, 1)
            elif isinstance(step, AskBacking):
                result = await self._ask_backing(job, step)
            else:
                result = await self._pull_from(job, step, pull.probed)
            pull = pull.after(step, result)
            step = next_step(pull)

    # -- the steps' I/O ----------------------------------------------------------------------

    async def _probe(self, job: _Job) -> tuple[ProbeResult | None, Probed | Failed]:
        try:
            found = await self._upstream.probe(job.ref, job.credentials,
                                               job.rule.settings.probe_timeout)
        except Failure as failure:
            self._state.record_check(job.name, failure.kind.value)
            return None, Failed(failure.kind, failure.detail, outage=failure.outage)
        self._state.record_access(job.ref.name, job.who if found.authenticated else ANONYMOUS)
        return found, Probed(found.digest, found.authenticated, found.pull_quota_spent)

    async def _ask_backing(self, job: _Job, step: AskBacking) -> BackingView:
        backing = self._backing
        assert backing is not None
        digest = step.digest
        if step.fallback and not digest:
            digest = await backing.resolve_tag(job.ref)
        holds = bool(digest) and await backing.holds(job.ref, digest)
        public = step.fallback and holds and await backing.is_public(job.ref)
        return BackingView(digest, holds, public, backing.down_reason)

    async def _pull_from(self, job: _Job, step: PullFrom,
                         probed: Probed | Failed | None) -> Pulled | Failed:
        try:
            if step.source is Source.BACKING:
                image_id = await self._pull_from_backing(job, step.digest)
                return Pulled(image_id, step.digest)
            image_id = await self._images.pull(job.request.original)
        except PullRefused as refused:
            if step.source is Source.BACKING:
                await self._backing_refused(job, step.digest, refused)
            return Failed(refused.kind, refused.detail, refused.answer)
        pulled = await self._images.target_digest(job.name)
        if isinstance(probed, Probed) and pulled and pulled != probed.digest:
            _log.warning("upstream moved during the pull", image=job.name,
                         probed=probed.digest, pulled=pulled)
        return Pulled(image_id, pulled)

    async def _backing_refused(self, job: _Job, digest: str, refused: PullRefused) -> None:
        """A pull from backing failed. When backing's bytes did not match their digest,
        what containerd kept of them is dropped (it would commit them again on the pull
        from upstream that follows), and backing's copy is not used for a while."""
        _log.warning("pull from backing failed", image=job.name, digest=digest,
                     kind=refused.kind.value, error=refused.detail)
        if refused.kind is not Kind.INVALID:
            return
        assert self._backing is not None
        self._backing.mark_bad(job.ref, digest, refused.detail)
        try:
            await self._images.discard((digest, *refused.digests))
        except ContainerdError as exc:
            _log.warning("could not drop the failed download; the pull from upstream may "
                         "fail the same way", image=job.name, error=exc.message)

    async def _pull_from_backing(self, job: _Job, digest: str) -> str:
        """containerd pulls backing's copy, then records it under the original names, so
        ImageStatus for what the pod asked for answers as if it came from upstream."""
        backing = self._backing
        assert backing is not None
        source = backing.name(job.ref, digest)
        image_id = await self._images.pull(job.request.original, source, backing.credentials)
        names = [str(job.ref.with_digest(digest))] + ([job.name] if job.ref.tag else [])
        try:
            await self._images.alias(source, names)
        except ContainerdError as exc:
            raise PullRefused(Kind.INVALID, exc) from None
        await self._images.wait_visible(job.name)
        return image_id

    # -- answers -----------------------------------------------------------------------------

    def _served(self, job: _Job, pull: Pull, step: Serve, probe_ms: float | None,
                probe: ProbeResult | None = None) -> Outcome:
        decision, failure = step.decision, step.failure
        outcome = Outcome(job.request.image, job.name, job.rule.label, decision, step.reason,
                          failure.kind if failure else None, failure.detail if failure else "",
                          probe.endpoint if probe else job.registry_host, step.image_id,
                          pull.node.digest if pull.node else "", digest=step.digest,
                          probe_ms=probe_ms, last_confirmed=job.last_ok,
                          outage=failure.outage if failure else "")
        probed = pull.probed
        if isinstance(probed, Probed):
            outcome.upstream_digest = probed.digest
        if decision is Decision.BACKING_FALLBACK:
            outcome.upstream_digest = step.digest
        if decision in (Decision.FRESH, Decision.UPDATED, Decision.BACKING) or (
                decision is Decision.PULLED and probe is not None):
            self._state.record_check(job.name, "ok", step.digest)
            self._state.clear_stale(job.name)
        if failure is not None:
            self._state.mark_stale(job.name, step.digest, failure.kind.value)
        if probe is not None and decision in (Decision.FRESH, Decision.UPDATED,
                                              Decision.PULLED):
            self._write_through(job, step.digest, probe)
        if failure is not None:
            metrics.FALLBACKS.labels(failure.kind.value).inc()
            where = ("the node's copy" if decision is Decision.FALLBACK
                     else "the backing registry's copy")
            _log.warning(f"upstream failed; answering with {where}", image=job.name,
                         kind=failure.kind.value, detail=failure.detail, digest=step.digest,
                         last_confirmed=ago(pull.now - job.last_ok) if job.last_ok else "never",
                         rule=job.rule.label,
                         **({"outage": failure.outage} if failure.outage else {}))
        return outcome

    def _refused(self, job: _Job, pull: Pull, step: Refuse,
                 probe_ms: float | None) -> PullFailed:
        probed = pull.probed
        outcome = Outcome(job.request.image, job.name, job.rule.label, Decision.ERROR,
                          step.message, step.kind,
                          local_digest=pull.node.digest if pull.node else "",
                          upstream_digest=probed.digest if isinstance(probed, Probed) else "",
                          probe_ms=probe_ms)
        return PullFailed(step.kind, step.message, step.answer, outcome.fields())

    def _write_through(self, job: _Job, digest: str, probe: ProbeResult) -> None:
        if self._backing is None or probe.source is None:
            return
        creds = job.credentials if probe.authenticated else None
        self._backing.write_through(job.ref, digest, Location(probe.source, job.ref.path, creds),
                                    public=not probe.authenticated)

    def _notice(self, request: PullRequest, outcome: Outcome) -> None:
        if self._events is None or request.pod is None or outcome.decision not in _NOTICED:
            return
        self._events.observe(Served(
            request.pod, request.image, outcome.reference, outcome.decision.value,
            outcome.kind.value if outcome.kind else "", outcome.detail, outcome.upstream,
            outcome.digest, outcome.local_digest if outcome.decision is Decision.UPDATED
            else "", outcome.last_confirmed, outcome.outage))

    def _record(self, outcome: Outcome, started: float) -> None:
        metrics.DECISIONS.labels(outcome.decision.value,
                                 outcome.kind.value if outcome.kind else "none").inc()
        if outcome.shared:
            return  # the caller that ran the work recorded it
        # Written once the answer is on its way: the kubelet need not wait for the disk.
        asyncio.get_running_loop().call_soon(self._state.record_decision, PullRecord(
            started, outcome.image, outcome.rule, outcome.decision.value, outcome.reason,
            outcome.local_digest, outcome.upstream_digest,
            round((self._clock() - started) * 1000, 3)))

