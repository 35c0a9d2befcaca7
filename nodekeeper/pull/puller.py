"""PullImage's I/O: it gathers what decision.py decides with, and carries out each step.

    pull(request) -> Answer
      a Job: the reference, rule, credentials and state, read once
      the node's copy vouched for by image events and no network needed -> answered at once
      otherwise, one round per reference and credentials (singleflight):
        loop: step = decision.next_step(pull)
              Probe       upstream digest, bounded by probe_timeout (the round is sealed
                          first: later callers start a round of their own)
              AskBacking  does the backing registry hold the digest? is it public?
              AskCluster  the cluster's last check of the tag, from backing
              Claim       the cluster's lease on fetching a digest upstream
              AwaitBacking  another node fetches: wait (bounded) until backing holds it
              PullFrom    containerd pulls, from upstream or from backing
              Serve       the answer (copied to backing when the decision says so)
              Refuse      a clear error: PullFailed, carrying the answer
        the round settled (record.py): the check or stale reference, the fallback logged
      each caller's answer recorded (record.py): metrics, the Event, the decision

What a step records itself: the check when a probe fails, and who was seen to pull
(state); a successful probe is shared with the cluster, in the background.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodekeeper import logs
from nodekeeper.errors import ContainerdError, ContainerdRefusedPull, PullFailed, RequestError
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import ANONYMOUS, Credentials, fingerprint
from nodekeeper.pull.decision import (
    Access,
    AskBacking,
    AskCluster,
    AwaitBacking,
    BackingView,
    Claim,
    Claimed,
    ClusterCheck,
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
from nodekeeper.pull.edges import (
    Answer,
    BackingStore,
    Cluster,
    Decision,
    Images,
    Observer,
    Pod,
    ProbeResult,
    StateStore,
    Upstream,
)
from nodekeeper.pull.policy import Policy, Rule
from nodekeeper.pull.record import Recorder
from nodekeeper.pull.reference import InvalidReference, Reference, parse
from nodekeeper.pull.singleflight import Seal, SingleFlight

_log = logs.get("puller")


@dataclass(frozen=True)
class PullRequest:
    image: str                        # as the kubelet wrote it
    credentials: Credentials | None
    # The request as it came, opaque here: Images.pull forwards it, so that fields
    # nodekeeper does not interpret still reach containerd.
    original: object
    pod: Pod | None = None            # whose pull this is, from the sandbox metadata


@dataclass(frozen=True)
class _Job:
    """One PullImage, as read once when it arrives."""

    request: PullRequest
    ref: Reference
    reference: str                    # str(ref): containerd's name for it
    rule: Rule
    credentials: Credentials | None   # those containerd would use for this registry
    who: str                          # their keyed fingerprint, or ANONYMOUS
    access: Access
    last_ok: float | None
    last_digest: str
    registry_host: str                # the host asked unless a hosts.toml says otherwise

    def facts(self, node: NodeCopy | None, now: float, backing: bool,
              cluster: Cluster | None) -> Pull:
        return Pull(self.ref, self.rule.label, self.rule.settings, node, self.access, now,
                    self.last_ok, self.last_digest, backing,
                    fetch_wait=cluster.fetch_wait if cluster else 0.0,
                    shared_checks=cluster is not None)

    def answer(self, **decided: Any) -> Answer:
        """What every answer to this job says, with what was `decided`."""
        return Answer(image=self.request.image, reference=self.reference,
                      pod=self.request.pod, rule=self.rule.label, last_confirmed=self.last_ok,
                      **decided)


class Puller:
    def __init__(self, images: Images, upstream: Upstream, state: StateStore,
                 policy: Callable[[], Policy], backing: BackingStore | None = None,
                 events: Observer | None = None, cluster: Cluster | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._images = images
        self._upstream = upstream
        self._state = state
        self._policy = policy
        self._backing = backing
        # Shared with the other nodes only through backing.
        self._cluster = cluster if backing is not None else None
        self._clock = clock
        self._recorder = Recorder(state, events, clock)
        self._rounds: SingleFlight[tuple[str, str], Answer] = SingleFlight()

    async def pull(self, request: PullRequest) -> Answer:
        started = self._clock()
        job = self._job(request)
        answer, shared = self._answer_known(job), False
        if answer is None:
            try:
                answer, shared = await self._rounds.run(
                    (job.reference, job.who), lambda seal: self._decide(job, seal))
            except PullFailed as failure:
                # Each caller of a round has its own refusal (its image, pod and times).
                refused = self._finish(failure.answer, request, started, shared=False)
                self._recorder.answered(refused)
                raise PullFailed(refused, failure.containerd) from None
        answer = self._finish(answer, request, started, shared)
        self._recorder.answered(answer)
        return answer

    def _finish(self, answer: Answer, request: PullRequest, started: float,
                shared: bool) -> Answer:
        return dataclasses.replace(
            answer, image=request.image, pod=request.pod, shared=shared, at=started,
            duration_ms=round((self._clock() - started) * 1000, 3))

    def _job(self, request: PullRequest) -> _Job:
        try:
            ref = parse(request.image)
        except InvalidReference as exc:
            raise RequestError(f"invalid image reference {request.image!r}: {exc}") from None
        credentials = self._upstream.applicable(ref, request.credentials)
        who = fingerprint(self._state.key, ref.repository, credentials)
        public = self._state.seen_working(ref.repository, ANONYMOUS)
        these = who != ANONYMOUS and self._state.seen_working(ref.repository, who)
        reference = str(ref)
        check = self._state.check(reference)
        return _Job(request, ref, reference, self._policy().rule_for(ref), credentials, who,
                    Access(public, these, anonymous=who == ANONYMOUS),
                    check.ok_at if check else None, check.digest if check else "",
                    self._upstream.default_host(ref))

    def _answer_known(self, job: _Job) -> Answer | None:
        """The node's copy, when image events vouch for it and no network is needed:
        answered at once, without containerd, a task or a round."""
        image_id = self._images.known_image_id(job.reference)
        if not image_id:
            return None
        node = NodeCopy(image_id, job.ref.digest or job.last_digest)
        pull = job.facts(node, self._clock(), self._backing is not None, self._cluster)
        step = next_step(pull)
        if not isinstance(step, Serve):
            return None
        answer = self._served(job, pull, step, None, None)
        self._recorder.settled(answer)
        return answer

    async def _decide(self, job: _Job, seal: Seal) -> Answer:
        try:
            answer = await self._steps(job, seal)
        except ContainerdError as exc:  # containerd itself failed outside a pull
            raise PullFailed(job.answer(reason=exc.message), exc) from None
        self._recorder.settled(answer)
        return answer

    async def _steps(self, job: _Job, seal: Seal) -> Answer:
        # One ImageStatus (or what image events kept true) says whether the node has a
        # copy; what the reference points at is asked only when the network will be used.
        image_id = await self._images.held_image_id(job.reference)
        node = NodeCopy(image_id, job.ref.digest or job.last_digest) if image_id else None
        pull = job.facts(node, self._clock(), self._backing is not None, self._cluster)
        step = next_step(pull)
        if node is not None and not isinstance(step, Serve | Refuse):
            node = NodeCopy(image_id, await self._images.target_digest(job.reference))
            pull = dataclasses.replace(pull, node=node)
            step = next_step(pull)
        probe: ProbeResult | None = None
        probe_ms: float | None = None
        while True:
            result: Result
            if isinstance(step, Serve):
                return self._served(job, pull, step, probe, probe_ms)
            if isinstance(step, Refuse):
                raise PullFailed(self._refused(job, pull, step, probe_ms), step.containerd)
            if isinstance(step, Probe):
                seal()
                probe_started = self._clock()
                probe, result = await self._probe(job)
                probe_ms = round((self._clock() - probe_started) * 1000, 1)
            elif isinstance(step, AskBacking):
                result = await self._ask_backing(job, step)
            elif isinstance(step, Claim | AwaitBacking | AskCluster):
                result = await self._ask_cluster(job, step)
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
            self._state.record_check(job.reference, failure.kind)
            return None, Failed(failure.kind, failure.detail, outage=failure.outage)
        self._state.record_access(job.ref.repository,
                                  job.who if found.authenticated else ANONYMOUS)
        if self._cluster is not None and job.ref.tag:
            self._cluster.share_check(job.ref, found.digest)
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

    async def _ask_cluster(self, job: _Job, step: Claim | AwaitBacking | AskCluster
                           ) -> Claimed | BackingView | ClusterCheck:
        cluster, backing = self._cluster, self._backing
        assert cluster is not None
        assert backing is not None
        if isinstance(step, Claim):
            holder = await cluster.claim(job.ref, step.digest)
            return Claimed(mine=holder in ("", cluster.node), holder=holder)
        if isinstance(step, AwaitBacking):
            held = await cluster.await_held(job.ref, step.digest, step.bound)
            return BackingView(step.digest, held, down=backing.down_reason)
        check = await cluster.last_check(job.ref)
        if check is None:
            return ClusterCheck()
        public = step.marker and await backing.is_public(job.ref)
        return ClusterCheck(check.digest, check.at, check.node, public)

    async def _pull_from(self, job: _Job, step: PullFrom,
                         probed: Probed | Failed | None) -> Pulled | Failed:
        try:
            if step.source is Source.BACKING:
                image_id = await self._pull_from_backing(job, step.digest)
                return Pulled(image_id, step.digest)
            image_id = await self._images.pull(job.request.original)
        except ContainerdRefusedPull as refused:
            if step.source is Source.BACKING:
                await self._backing_refused(job, step.digest, refused)
            return Failed(refused.kind, refused.detail, refused.containerd)
        pulled = await self._images.target_digest(job.reference)
        if isinstance(probed, Probed) and pulled and pulled != probed.digest:
            _log.warning("upstream moved during the pull", image=job.reference,
                         probed=probed.digest, pulled=pulled)
        return Pulled(image_id, pulled)

    async def _backing_refused(self, job: _Job, digest: str,
                               refused: ContainerdRefusedPull) -> None:
        """A pull from backing failed. When backing's bytes did not match their digest,
        what containerd kept of them is dropped (it would commit them again on the pull
        from upstream that follows), and backing's copy is not used for a while."""
        _log.warning("pull from backing failed", image=job.reference, digest=digest,
                     kind=refused.kind.value, error=refused.detail)
        if refused.kind is not Kind.INVALID:
            return
        assert self._backing is not None
        self._backing.mark_bad(job.ref, digest, refused.detail)
        try:
            await self._images.discard((digest, *refused.digests))
        except ContainerdError as exc:
            _log.warning("could not drop the failed download; the pull from upstream may "
                         "fail the same way", image=job.reference, error=exc.message)

    async def _pull_from_backing(self, job: _Job, digest: str) -> str:
        """containerd pulls backing's copy, then records it under the original references,
        so ImageStatus for what the pod asked for answers as if it came from upstream."""
        backing = self._backing
        assert backing is not None
        source = backing.name(job.ref, digest)
        image_id = await self._images.pull(job.request.original, source, backing.credentials)
        references = [str(job.ref.with_digest(digest))] + ([job.reference] if job.ref.tag
                                                           else [])
        try:
            await self._images.alias(source, references)
        except ContainerdError as exc:
            raise ContainerdRefusedPull(Kind.INVALID, exc) from None
        await self._images.wait_visible(job.reference)
        return image_id

    # -- answers -----------------------------------------------------------------------------

    def _served(self, job: _Job, pull: Pull, step: Serve, probe: ProbeResult | None,
                probe_ms: float | None) -> Answer:
        failure, probed = step.failure, pull.probed
        upstream_digest = probed.digest if isinstance(probed, Probed) else ""
        if step.decision is Decision.BACKING_FALLBACK:  # what backing's tag names
            upstream_digest = step.digest
        if step.copy_to_backing and probe is not None:
            self._write_through(job, step.digest, probe)
        return job.answer(
            decision=step.decision, reason=step.reason,
            kind=failure.kind if failure else None, detail=failure.detail if failure else "",
            upstream=probe.host if probe else job.registry_host, image_id=step.image_id,
            node_digest=pull.node.digest if pull.node else "",
            upstream_digest=upstream_digest, digest=step.digest, confirmed=step.confirmed,
            probe_ms=probe_ms, outage=failure.outage if failure else "")

    def _refused(self, job: _Job, pull: Pull, step: Refuse, probe_ms: float | None) -> Answer:
        probed = pull.probed
        return job.answer(
            reason=step.message, kind=step.kind,
            node_digest=pull.node.digest if pull.node else "",
            upstream_digest=probed.digest if isinstance(probed, Probed) else "",
            probe_ms=probe_ms, outage=probed.outage if isinstance(probed, Failed) else "")

    def _write_through(self, job: _Job, digest: str, probe: ProbeResult) -> None:
        if self._backing is None or probe.source is None:
            return
        self._backing.write_through(job.ref, digest, probe.source,
                                    public=not probe.authenticated)
