"""The core of PullImage: policy, probe, pull, fallback. No protobuf here.

    plan (policy.py)       local copy fresh enough? credentials verified?
      local  ->  answer the node's copy, no network            local-pinned / local-interval
      probe  ->  digest upstream, bounded by probe_timeout
                   same as the node's copy    -> answer it         fresh
                   different, or no copy      -> containerd pulls  updated / pulled
                   failed (a class in fallback_on, credentials
                   seen to work)              -> the node's copy   fallback
                   failed otherwise           -> a clear error     error
      pull   ->  a digest reference the node lacks: containerd pulls     pulled

A `local` answer for a copy that containerd's image events vouch for (presence.py) is
given at once, before any of the below. Concurrent pulls of one reference with the same
credentials share one probe and one containerd pull. The security rule: the node's copy
of a repository that needs credentials is handed out only to credentials recorded as
having worked upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from nodekeeper import logs, metrics
from nodekeeper.backing import Backing
from nodekeeper.containerd import Containerd, LocalImage
from nodekeeper.credentials import ANONYMOUS, Credentials, fingerprint
from nodekeeper.errors import ContainerdError, PullFailed, RequestError
from nodekeeper.policy import Plan, Policy, Rule, plan
from nodekeeper.reference import InvalidReference, Reference, parse
from nodekeeper.registry import Prober, ProbeResult, RegistryError
from nodekeeper.registry.copy import Location
from nodekeeper.singleflight import SingleFlight
from nodekeeper.state import Decision, State

_log = logs.get("puller")

# A burst of PullImage calls reaches us spread over tens of milliseconds; calls this close
# behind a finished decision reuse it instead of asking upstream again.
COALESCE_SECONDS = 0.2

# Failure classes the kubelet should report as RegistryUnavailable.
_UNAVAILABLE = frozenset({"unreachable", "timeout"})
_CODES = {
    # The kubelet recognizes RegistryUnavailable only in the message of an UNKNOWN status.
    "unreachable": grpc.StatusCode.UNKNOWN,
    "timeout": grpc.StatusCode.UNKNOWN,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unauthorized": grpc.StatusCode.PERMISSION_DENIED,
}
# How containerd words the failures of a pull, to classify them like a probe's.
_PULL_ERRORS = (
    ("rate_limited", re.compile(r"\b429\b|too many requests", re.I)),
    ("unauthorized", re.compile(r"\b40[13]\b|unauthorized|forbidden|pull access denied|"
                                r"authorization failed|insufficient_scope", re.I)),
    ("not_found", re.compile(r"\bnot found\b|\b404\b", re.I)),
    ("server_error", re.compile(r"\b5\d\d\b", re.I)),
    ("unreachable", re.compile(r"connection refused|no such host|dial tcp|i/o timeout|EOF|"
                               r"connection reset|deadline exceeded|network is unreachable",
                               re.I)),
)


@dataclass(frozen=True)
class PullRequest:
    image: str                       # as the kubelet wrote it
    raw: bytes                       # the PullImageRequest as it came, for containerd
    credentials: Credentials | None


@dataclass
class Outcome:
    """How a PullImage was answered: everything its log line and `status` show."""

    image: str
    reference: str = ""
    rule: str = ""
    decision: str = "error"
    reason: str = ""
    image_ref: str = ""
    local_digest: str = ""
    upstream_digest: str = ""
    probe_ms: float | None = None
    shared: bool = False

    def fields(self) -> dict[str, object]:
        found = {"reference": self.reference, "rule": self.rule, "decision": self.decision,
                 "reason": self.reason, "local_digest": self.local_digest,
                 "upstream_digest": self.upstream_digest, "probe_ms": self.probe_ms}
        if self.shared:
            found["shared"] = True
        return {k: v for k, v in found.items() if v not in ("", None)}


class Puller:
    def __init__(self, containerd: Containerd, prober: Prober, state: State,
                 policy: Callable[[], Policy], backing: Backing | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._containerd = containerd
        self._backing = backing
        self._prober = prober
        self._state = state
        self._policy = policy
        self._clock = clock
        # Pulls of one reference with the same credentials that overlap, or follow within
        # COALESCE_SECONDS, share one decision (one probe, one containerd pull).
        self._flights: SingleFlight[tuple[str, str], Outcome] = SingleFlight(
            linger=COALESCE_SECONDS)

    async def pull(self, request: PullRequest) -> Outcome:
        try:
            ref = parse(request.image)
        except InvalidReference as exc:
            raise RequestError(f"invalid image reference {request.image!r}: {exc}") from None
        who = fingerprint(self._state.key, ref.name, request.credentials)
        started = self._clock()
        known = self._answer_known(ref, request, who)
        if known is not None:
            self._record(known, started)
            return known
        try:
            outcome, shared = await self._flights.run(
                (str(ref), who), lambda: self._decide(ref, request, who))
        except PullFailed as failure:
            details = failure.details
            self._record(Outcome(request.image, str(ref), str(details.get("rule", "")),
                                 reason=failure.message,
                                 local_digest=str(details.get("local_digest", "")),
                                 upstream_digest=str(details.get("upstream_digest", ""))),
                         started)
            raise
        if shared:
            outcome = dataclasses.replace(outcome, image=request.image, shared=True)
        self._record(outcome, started)
        return outcome

    def _record(self, outcome: Outcome, started: float) -> None:
        metrics.DECISIONS.labels(outcome.decision, _reason_class(outcome)).inc()
        if outcome.shared:
            return  # the caller that ran the work recorded it
        # Written once the answer is on its way: the kubelet need not wait for the disk.
        asyncio.get_running_loop().call_soon(self._state.record_decision, Decision(
            started, outcome.image, outcome.rule, outcome.decision, outcome.reason,
            outcome.local_digest, outcome.upstream_digest,
            round((self._clock() - started) * 1000, 3)))

    def _answer_known(self, ref: Reference, request: PullRequest, who: str) -> Outcome | None:
        """The node's copy, when image events vouch for it and the rule needs no network:
        answered at once, without containerd, a task or a shared flight."""
        image_id = self._containerd.known_image_id(str(ref))
        if not image_id:
            return None
        rule = self._policy().rule_for(ref)
        step, known = self._plan(rule, ref, image_id, who)
        if step.action != "local":
            return None
        return self._answer(Outcome(request.image, str(ref), rule.label),
                            LocalImage(image_id, known), step.decision, step.reason)

    def _plan(self, rule: Rule, ref: Reference, image_id: str, who: str) -> tuple[Plan, str]:
        """What to do, and the digest the node's copy is known by ('' when unknown)."""
        check = self._state.check(str(ref))
        step = plan(rule.settings, ref, bool(image_id), check.ok_at if check else None,
                    self._clock(), self._verified(ref, who))
        return step, ref.digest or (check.digest if check else "")

    async def _decide(self, ref: Reference, request: PullRequest, who: str) -> Outcome:
        rule = self._policy().rule_for(ref)
        outcome = Outcome(request.image, str(ref), rule.label)
        try:
            return await self._decide_with(outcome, rule, ref, request, who)
        except PullFailed as failure:
            outcome.reason = outcome.reason or failure.message
            raise PullFailed(failure.code, failure.message, outcome.fields()) from None
        except ContainerdError as failure:
            outcome.reason = failure.message
            raise PullFailed(failure.code, failure.message, outcome.fields()) from None

    async def _decide_with(self, outcome: Outcome, rule: Rule, ref: Reference,
                           request: PullRequest, who: str) -> Outcome:
        # One ImageStatus, or what containerd's image events kept true since the last one
        # (presence.py), decides whether the node has a copy; what the name points at is
        # asked only when a probe will compare it, keeping answers without network quick.
        image_id = await self._containerd.held_image_id(str(ref))
        step, known = self._plan(rule, ref, image_id, who)
        if step.action == "local":
            return self._answer(outcome, LocalImage(image_id, known), step.decision, step.reason)
        local = (LocalImage(image_id, await self._containerd.target_digest(str(ref)))
                 if image_id else None)
        if local:
            outcome.local_digest = local.digest
        if step.action == "pull":
            try:
                outcome.image_ref = await self._containerd.pull(request.raw)
            except ContainerdError as exc:
                kind = classify_pull_error(exc.message)
                if kind not in _UNAVAILABLE:
                    raise
                return await self._fall_back(outcome, ref, rule, None, who, kind, exc.message)
            outcome.decision, outcome.reason = "pulled", step.reason
            return outcome

        probe_started = self._clock()
        try:
            result = await self._prober.probe(ref, request.credentials,
                                              rule.settings.probe_timeout)
        except RegistryError as failure:
            outcome.probe_ms = round((self._clock() - probe_started) * 1000, 1)
            self._state.record_check(str(ref), failure.kind)
            return await self._fall_back(outcome, ref, rule, local, who, failure.kind,
                                         failure.detail)
        outcome.probe_ms = round((self._clock() - probe_started) * 1000, 1)
        outcome.upstream_digest = result.digest
        self._state.record_access(ref.name, who if result.authenticated else ANONYMOUS)
        if local is not None and local.digest == result.digest:
            self._state.record_check(str(ref), "ok", result.digest)
            self._write_through(ref, result.digest, request, result)
            return self._answer(outcome, local, "fresh", step.reason or "digest unchanged")
        if result.pull_quota_spent and local is not None:
            return await self._fall_back(
                outcome, ref, rule, local, who, "rate_limited",
                "Docker Hub's pull quota is spent (ratelimit-remaining: 0)")
        return await self._pull_update(outcome, ref, rule, request, local, who, result)

    async def _pull_update(self, outcome: Outcome, ref: Reference, rule: Rule,
                           request: PullRequest, local: LocalImage | None, who: str,
                           result: ProbeResult) -> Outcome:
        if self._backing is not None and await self._backing.holds(ref, result.digest):
            # Upstream confirmed the digest and this pod's credentials; the bytes can come
            # from inside the cluster.
            try:
                outcome.image_ref = await self._pull_from_backing(ref, result.digest,
                                                                  request.raw)
            except ContainerdError as exc:
                _log.warning("pull from backing failed; pulling from upstream",
                             image=str(ref), error=exc.message)
            else:
                self._state.record_check(str(ref), "ok", result.digest)
                outcome.decision, outcome.reason = "backing", "digest held by backing"
                return outcome
        try:
            outcome.image_ref = await self._containerd.pull(request.raw)
        except ContainerdError as exc:
            kind = classify_pull_error(exc.message)
            if local is None and kind not in _UNAVAILABLE:
                raise
            return await self._fall_back(outcome, ref, rule, local, who, kind,
                                         f"pull after a good probe failed: {exc.message}")
        pulled = await self._containerd.target_digest(str(ref))
        if pulled and pulled != result.digest:
            _log.warning("upstream moved during the pull", image=str(ref),
                         probed=result.digest, pulled=pulled)
        self._state.record_check(str(ref), "ok", pulled or result.digest)
        self._write_through(ref, pulled or result.digest, request, result)
        outcome.decision = "updated" if local is not None else "pulled"
        outcome.reason = "digest changed" if local is not None else "not on the node"
        return outcome

    async def _fall_back(self, outcome: Outcome, ref: Reference, rule: Rule,
                         local: LocalImage | None, who: str, kind: str,
                         detail: str) -> Outcome:
        outcome.reason = kind
        if local is None:
            return await self._fall_back_to_backing(outcome, ref, rule, kind, detail)
        refusal = self._refusal(ref, rule, who, kind)
        if refusal:
            raise PullFailed(
                grpc.StatusCode.PERMISSION_DENIED if kind not in _UNAVAILABLE
                else _CODES[kind],
                f"{'RegistryUnavailable: ' if kind in _UNAVAILABLE else ''}{ref}: upstream "
                f"{kind}: {detail}; the node's copy is not used because {refusal}")
        check = self._state.check(str(ref))
        age = f"{self._clock() - check.ok_at:.0f}s" if check and check.ok_at else "unknown"
        metrics.FALLBACKS.labels(kind).inc()
        _log.warning("upstream failed; answering with the node's copy", image=str(ref),
                     reason=kind, detail=detail, cached_digest=local.digest,
                     cached_age=age, rule=rule.label)
        return self._answer(outcome, local, "fallback", kind)

    async def _fall_back_to_backing(self, outcome: Outcome, ref: Reference, rule: Rule,
                                    kind: str, detail: str) -> Outcome:
        """No copy on the node: backing's copy, if the rules allow, else a clear error."""
        prefix = "RegistryUnavailable: " if kind in _UNAVAILABLE else ""
        problem = f"{prefix}{ref}: upstream {kind}: {detail}"
        code = _CODES.get(kind, grpc.StatusCode.UNKNOWN)
        backing = self._backing
        if backing is None or kind not in rule.settings.fallback_on:
            raise PullFailed(code, f"{problem}; the node has no copy to fall back to")
        check = self._state.check(str(ref))
        digest = ref.digest or (check.digest if check else "") or await backing.resolve_tag(ref)
        if not digest or not await backing.holds(ref, digest):
            where = (f"the backing registry is unavailable ({backing.down_reason})"
                     if backing.down_reason else "neither has the backing registry")
            raise PullFailed(code, f"{problem}; the node has no copy, and {where}")
        if (rule.settings.backing_private_fallback != "allow"
                and not await backing.is_public(ref)):
            raise PullFailed(code, f"{problem}; the backing registry has a copy, but "
                                   f"{ref.name} was never seen pullable without credentials "
                                   "(backing_private_fallback: deny)")
        try:
            outcome.image_ref = await self._pull_from_backing(ref, digest, request_raw=None)
        except ContainerdError as exc:
            raise PullFailed(code, f"{problem}; pulling the backing registry's copy failed "
                                   f"too: {exc.message}") from None
        metrics.FALLBACKS.labels(kind).inc()
        _log.warning("upstream failed; answering with the backing registry's copy",
                     image=str(ref), reason=kind, detail=detail, digest=digest,
                     rule=rule.label)
        outcome.upstream_digest = digest
        outcome.decision, outcome.reason = "backing-fallback", kind
        return outcome

    async def _pull_from_backing(self, ref: Reference, digest: str,
                                 request_raw: bytes | None) -> str:
        """containerd pulls backing's copy, then records it under the original names, so
        ImageStatus for what the pod asked for answers as if it came from upstream."""
        assert self._backing is not None
        backing = self._backing
        creds = backing.credentials
        image_id = await self._containerd.pull_from(
            backing.name(ref, digest), creds.username if creds else "",
            creds.password if creds else "", request_raw or b"")
        names = [str(ref.with_digest(digest))] + ([str(ref)] if ref.tag else [])
        await self._containerd.alias(backing.name(ref, digest), names)
        await self._containerd.wait_visible(str(ref))
        return image_id

    def _write_through(self, ref: Reference, digest: str, request: PullRequest,
                       result: ProbeResult) -> None:
        if self._backing is None or result.source is None:
            return
        creds = request.credentials if result.authenticated else None
        self._backing.write_through(ref, digest, Location(result.source, ref.path, creds),
                                    public=not result.authenticated)

    def _refusal(self, ref: Reference, rule: Rule, who: str, kind: str) -> str:
        """Why the node's copy may not stand in for upstream here ('' when it may)."""
        settings = rule.settings
        if kind != "unauthorized" and kind not in settings.fallback_on:
            return f"fallback_on of {rule.label} does not include {kind}"
        if self._state.seen_working(ref.name, ANONYMOUS):
            return ""  # public: anyone could pull it
        if settings.auth_fallback == "never":
            return f"{ref.name} needs credentials and auth_fallback is never"
        if who != ANONYMOUS and self._state.seen_working(ref.name, who):
            return ""
        return (f"these credentials were never seen to work for {ref.name}"
                if who != ANONYMOUS else f"{ref.name} was never seen to be pullable without "
                "credentials")

    def _verified(self, ref: Reference, who: str) -> bool:
        return (self._state.seen_working(ref.name, ANONYMOUS)
                or self._state.seen_working(ref.name, who))

    @staticmethod
    def _answer(outcome: Outcome, local: LocalImage, decision: str, reason: str) -> Outcome:
        outcome.image_ref = local.id
        outcome.local_digest = local.digest
        outcome.decision, outcome.reason = decision, reason
        return outcome


def classify_pull_error(message: str) -> str:
    for kind, pattern in _PULL_ERRORS:
        if pattern.search(message):
            return kind
    return "server_error"


def _reason_class(outcome: Outcome) -> str:
    """A small, fixed set of metric label values (reasons themselves are free text)."""
    if outcome.decision in ("fallback", "error"):
        for kind in ("unreachable", "timeout", "server_error", "rate_limited", "not_found",
                     "unauthorized", "invalid"):
            if kind in outcome.reason:
                return kind
        return "other"
    return "none"
