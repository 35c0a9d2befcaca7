"""How one PullImage is decided: a pure function from what is known to what to do next.

    step = next_step(pull)

`Pull` is plain data: the rule's settings, the reference, the node's copy, the last
successful check, what is known of these credentials, and the result of every step taken
so far. The puller performs the step (probe upstream, ask backing, have containerd
pull), adds its result with `pull.after(step, result)`, and asks again, until the step is
`Serve` (the answer) or `Refuse` (a clear error). Nothing here does I/O or reads a clock.
`Serve` also says what the answer means beyond the image: whether upstream confirmed it
during this pull (the check succeeded; the reference is no longer stale), and whether the
image is to be copied to the backing registry.

    the node has a copy and needs no network     Serve local-pinned | local-interval
    update: interval, this node's check is old   AskCluster: another node's recent check of
                                                 the node's digest -> Serve cluster-interval
    otherwise                                    Probe
      digest equals the node's copy              Serve fresh
      moved, or no copy    [backing holds it]    PullFrom backing  -> Serve backing
                           [backing lacks it]    Claim: another node holds the lease ->
                                                   AwaitBacking (fetch_wait at most) ->
                                                   PullFrom backing -> Serve backing
                                                 PullFrom upstream -> Serve updated | pulled
      probe or pull failed                       fall back:
        the node's copy, if the rule allows       Serve fallback
        backing's copy, if the rule allows        PullFrom backing  -> Serve backing-fallback
        otherwise                                 Refuse
    a digest reference the node lacks            PullFrom upstream -> Serve pulled

The security rule is `node_copy_refusal` and `backing_copy_refusal`: the node's copy
is handed out without a successful upstream check only to a repository seen public, or
to credentials seen to work for it; backing's copy only for a repository a node found
public, unless the rule opts in; `shared_check_refusal`: another node's check stands in
for this node's only for a repository seen public, or for credentials seen to work for it
on this node.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from nodekeeper.errors import ContainerdError
from nodekeeper.failures import Kind
from nodekeeper.pull.policy import AuthFallback, BackingPrivateFallback, Settings, Update
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import Decision, NodeCopy

__all__ = [
    "Access", "AskBacking", "AskCluster", "AwaitBacking", "BackingView", "Claim", "Claimed",
    "ClusterCheck", "Decision", "Failed", "NodeCopy", "Probe", "Probed", "Pull", "PullFrom",
    "Pulled", "Refuse", "Result", "Serve", "Source", "Step", "backing_copy_refusal",
    "next_step", "node_copy_refusal", "shared_check_refusal",
]


class Source(str, enum.Enum):
    UPSTREAM = "upstream"
    BACKING = "backing"


# -- what is known -------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """What is known about who may pull the repository."""

    public: bool = False      # a pull without credentials was seen to work
    these: bool = False       # this request's credentials were seen to work
    anonymous: bool = True    # this request carries no credentials that apply

    @property
    def verified(self) -> bool:
        return self.public or self.these


# -- step results --------------------------------------------------------------------------

@dataclass(frozen=True)
class Probed:
    digest: str
    authenticated: bool       # the request's credentials were used
    quota_spent: bool = False  # Docker Hub: a HEAD works, a pull would not


@dataclass(frozen=True)
class Pulled:
    image_id: str
    digest: str = ""          # what the name points at after the pull ('' unknown)


@dataclass(frozen=True)
class Failed:
    kind: Kind
    detail: str
    # containerd's own answer, when containerd refused a pull: passed on unchanged when
    # nothing better can be answered.
    containerd: ContainerdError | None = None
    # The registry endpoint whose outage episode answered instead of a probe of this pull
    # ('' when the failure is this pull's own).
    outage: str = ""


@dataclass(frozen=True)
class BackingView:
    digest: str               # the digest asked about, or the one backing's tag names
    holds: bool
    public: bool = False      # the repository carries backing's anonymous marker
    down: str = ""            # why backing could not be asked ('' when it answered)


@dataclass(frozen=True)
class Claimed:
    """Who holds the lease on fetching a digest upstream, after this node claimed it."""

    mine: bool                # this node fetches (it won, or backing could not be asked)
    holder: str = ""          # the node that holds the lease ('' when backing failed)


@dataclass(frozen=True)
class ClusterCheck:
    """The cluster's last successful check of the reference, as backing keeps it."""

    digest: str = ""          # '' when there is none, or backing could not be asked
    at: float = 0.0           # when (the checking node's clock)
    node: str = ""            # which node checked
    public: bool = False      # the repository carries backing's anonymous marker


Result = Probed | Pulled | Failed | BackingView | Claimed | ClusterCheck


# -- steps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """Ask upstream for the tag's digest, within the rule's probe_timeout."""

    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class AskBacking:
    """Does backing hold `digest`? ('' : which digest does backing's tag name?)"""

    digest: str
    fallback: bool = False    # asked because upstream failed: is the repository public?


@dataclass(frozen=True)
class Claim:
    """Claim the cluster's lease on fetching `digest` upstream (backing lacks it)."""

    digest: str


@dataclass(frozen=True)
class AwaitBacking:
    """Another node fetches `digest`: wait at most `bound` seconds for backing to hold it."""

    digest: str
    bound: float


@dataclass(frozen=True)
class AskCluster:
    """Read the cluster's last check of the reference from backing (`marker`: and whether
    the repository carries backing's anonymous marker)."""

    marker: bool = False


@dataclass(frozen=True)
class PullFrom:
    """containerd pulls `digest` (or the reference as requested) from `source`."""

    source: Source
    digest: str = ""


@dataclass(frozen=True)
class Serve:
    decision: Decision
    reason: str
    image_id: str
    digest: str = ""           # the digest answered ('' when unknown)
    failure: Failed | None = None  # for fallbacks: what upstream did
    # Upstream confirmed `digest` (and these credentials) during this pull: the check
    # succeeded, and the reference is no longer answered with an unconfirmed copy.
    confirmed: bool = False
    # The image came from upstream with a probe: copy it to backing (when configured).
    copy_to_backing: bool = False


@dataclass(frozen=True)
class Refuse:
    kind: Kind
    message: str
    containerd: ContainerdError | None = None  # containerd's own answer, passed on unchanged


Step = Probe | AskBacking | Claim | AwaitBacking | AskCluster | PullFrom | Serve | Refuse


@dataclass(frozen=True)
class Pull:
    ref: Reference
    rule: str                 # the rule's label, for messages
    settings: Settings
    node: NodeCopy | None
    access: Access
    now: float
    last_ok: float | None = None   # when upstream last confirmed the reference
    last_digest: str = ""     # the digest upstream confirmed then
    backing: bool = False     # a backing registry is configured for reads
    # Backing is read and written: the longest a pull waits for another node's fetch of a
    # digest (0: every node fetches for itself).
    fetch_wait: float = 0.0
    shared_checks: bool = False  # backing is read for the cluster's checks of references
    history: tuple[tuple[Step, Result], ...] = ()

    def after(self, step: Step, result: Result) -> Pull:
        return replace(self, history=(*self.history, (step, result)))

    def result(self, step: Step) -> Result | None:
        for taken, result in self.history:
            if taken == step:
                return result
        return None

    @property
    def probed(self) -> Probed | Failed | None:
        found = self.result(Probe())
        assert found is None or isinstance(found, Probed | Failed)
        return found

    @property
    def access_now(self) -> Access:
        """Access, with what a successful probe has just shown."""
        probed = self.probed
        if not isinstance(probed, Probed):
            return self.access
        if probed.authenticated:
            return replace(self.access, these=True)
        return replace(self.access, public=True)


# -- the decision --------------------------------------------------------------------------

def next_step(pull: Pull) -> Step:
    probed = pull.probed
    if probed is None:
        pinned_pull = pull.result(PullFrom(Source.UPSTREAM, pull.ref.digest))
        if pinned_pull is None:
            return _before_network(pull)
        return _after_pinned_pull(pull, pinned_pull)
    if isinstance(probed, Failed):
        return _fall_back(pull, probed)
    return _after_probe(pull, probed)


def _before_network(pull: Pull) -> Step:
    node, ref, settings = pull.node, pull.ref, pull.settings
    if node is None:
        if ref.pinned:
            return PullFrom(Source.UPSTREAM, ref.digest)
        return Probe()
    if not pull.access.verified:
        # Nobody saw these credentials work: ask upstream first, as containerd would,
        # unless the cluster checked a repository backing saw public.
        return _cluster_check(pull, node) or Probe("credentials not yet verified")
    if ref.pinned:
        return Serve(Decision.LOCAL_PINNED, "digest reference", node.image_id, node.digest)
    if settings.update is Update.NEVER:
        return Serve(Decision.LOCAL_PINNED, "update: never", node.image_id, node.digest)
    if (settings.update is Update.INTERVAL and pull.last_ok is not None
            and pull.now - pull.last_ok < settings.interval):
        return Serve(Decision.LOCAL_INTERVAL, f"checked {pull.now - pull.last_ok:.0f}s ago",
                     node.image_id, node.digest)
    return _cluster_check(pull, node) or Probe()


def _cluster_check(pull: Pull, node: NodeCopy) -> Step | None:
    """Under `update: interval`, another node's check younger than the interval stands in
    for this node's, when it named the digest of the node's copy and the security rule
    allows; None: ask upstream."""
    settings = pull.settings
    if not pull.shared_checks or settings.update is not Update.INTERVAL or pull.ref.pinned:
        return None
    ask = AskCluster(marker=not pull.access.verified)
    check = pull.result(ask)
    if check is None:
        return ask
    assert isinstance(check, ClusterCheck)
    age = pull.now - check.at
    # A check from a node whose clock runs ahead counts as just made, within the interval.
    if not check.digest or not -settings.interval < age < settings.interval:
        return None
    if check.digest != node.digest:
        return Probe("the cluster's check names another digest")
    refusal = shared_check_refusal(pull.ref, pull.access, check.public)
    if refusal:
        return Probe(f"the cluster's check is not used: {refusal}")
    return Serve(Decision.CLUSTER_INTERVAL, f"checked by {check.node} {max(age, 0):.0f}s ago",
                 node.image_id, node.digest)


def _after_pinned_pull(pull: Pull, result: Result) -> Step:
    if isinstance(result, Pulled):
        return Serve(Decision.PULLED, "digest reference", result.image_id, pull.ref.digest)
    assert isinstance(result, Failed)
    if result.kind.unavailable:
        return _fall_back(pull, result)
    return Refuse(result.kind, result.detail, result.containerd)


def _after_probe(pull: Pull, probed: Probed) -> Step:
    node, digest = pull.node, probed.digest
    if node is not None and node.digest == digest:
        reason = next((s.reason for s, _ in pull.history if isinstance(s, Probe)), "")
        return Serve(Decision.FRESH, reason or "digest unchanged", node.image_id, digest,
                     confirmed=True, copy_to_backing=True)
    if probed.quota_spent and node is not None:
        return _fall_back(pull, Failed(
            Kind.RATE_LIMITED, "Docker Hub's pull quota is spent (ratelimit-remaining: 0)"))
    # A pull is needed. Upstream has just confirmed the digest and these credentials, so
    # the bytes may come from backing when it holds them.
    if pull.backing:
        view = pull.result(AskBacking(digest))
        if view is None:
            return AskBacking(digest)
        assert isinstance(view, BackingView)
        from_backing = pull.result(PullFrom(Source.BACKING, digest))
        if from_backing is None:
            if view.holds:
                return PullFrom(Source.BACKING, digest)
            waited = _wait_for_another_node(pull, digest, view)
            if waited is not None:
                return waited
        if isinstance(from_backing, Pulled):
            claimed = pull.result(Claim(digest))
            reason = (f"fetched upstream by {claimed.holder}"
                      if isinstance(claimed, Claimed) and claimed.holder
                      else "digest held by backing")
            return Serve(Decision.BACKING, reason, from_backing.image_id, digest,
                         confirmed=True)
    upstream = pull.result(PullFrom(Source.UPSTREAM, digest))
    if upstream is None:
        return PullFrom(Source.UPSTREAM, digest)
    if isinstance(upstream, Pulled):
        if node is not None:
            return Serve(Decision.UPDATED, "digest changed", upstream.image_id,
                         upstream.digest or digest, confirmed=True, copy_to_backing=True)
        return Serve(Decision.PULLED, "not on the node", upstream.image_id,
                     upstream.digest or digest, confirmed=True, copy_to_backing=True)
    assert isinstance(upstream, Failed)
    if node is None and not upstream.kind.unavailable:
        return Refuse(upstream.kind, upstream.detail, upstream.containerd)
    return _fall_back(pull, Failed(upstream.kind,
                                   f"pull after a good probe failed: {upstream.detail}",
                                   upstream.containerd))


def _wait_for_another_node(pull: Pull, digest: str, view: BackingView) -> Step | None:
    """Backing lacks `digest`: one node of the cluster fetches it upstream and feeds
    backing, the others wait for backing to hold it, `fetch_wait` at most. None: this node
    fetches it itself."""
    if pull.fetch_wait <= 0 or view.down:
        return None
    claimed = pull.result(Claim(digest))
    if claimed is None:
        return Claim(digest)
    assert isinstance(claimed, Claimed)
    if claimed.mine:
        return None
    wait = AwaitBacking(digest, pull.fetch_wait)
    awaited = pull.result(wait)
    if awaited is None:
        return wait
    assert isinstance(awaited, BackingView)
    return PullFrom(Source.BACKING, digest) if awaited.holds else None


def _fall_back(pull: Pull, failure: Failed) -> Step:
    problem = f"{pull.ref}: upstream {failure.kind}: {failure.detail}"
    node = pull.node
    if node is not None:
        refusal = node_copy_refusal(pull.settings, pull.rule, pull.ref, pull.access_now,
                                    failure.kind)
        if refusal:
            return Refuse(failure.kind, f"{problem}; the node's copy is not used because "
                                        f"{refusal}")
        return Serve(Decision.FALLBACK, failure.kind.value, node.image_id, node.digest, failure)
    if not pull.backing or failure.kind not in pull.settings.fallback_on:
        return Refuse(failure.kind, f"{problem}; the node has no copy to fall back to",
                      failure.containerd)
    ask = AskBacking(pull.ref.digest or pull.last_digest, fallback=True)
    view = pull.result(ask)
    if view is None:
        return ask
    assert isinstance(view, BackingView)
    if view.down:
        return Refuse(failure.kind, f"{problem}; the node has no copy, and the backing "
                                    f"registry is unavailable ({view.down})")
    if not view.digest or not view.holds:
        return Refuse(failure.kind, f"{problem}; the node has no copy, and neither has the "
                                    "backing registry")
    refusal = backing_copy_refusal(pull.settings, pull.ref, view.public)
    if refusal:
        return Refuse(failure.kind, f"{problem}; the backing registry has a copy, but "
                                    f"{refusal}")
    from_backing = pull.result(PullFrom(Source.BACKING, view.digest))
    if from_backing is None:
        return PullFrom(Source.BACKING, view.digest)
    if isinstance(from_backing, Pulled):
        return Serve(Decision.BACKING_FALLBACK, failure.kind.value, from_backing.image_id,
                     view.digest, failure)
    assert isinstance(from_backing, Failed)
    return Refuse(failure.kind, f"{problem}; pulling the backing registry's copy failed "
                                f"too: {from_backing.detail}")


# -- the security rule ---------------------------------------------------------------------

def node_copy_refusal(settings: Settings, rule: str, ref: Reference, access: Access,
                      kind: Kind) -> str:
    """Why the node's copy may not stand in for upstream after `kind` ('' when it may)."""
    if kind is not Kind.UNAUTHORIZED and kind not in settings.fallback_on:
        return f"fallback_on of {rule} does not include {kind}"
    if access.public:
        return ""  # anyone could pull it
    if settings.auth_fallback is AuthFallback.NEVER:
        return f"{ref.repository} needs credentials and auth_fallback is never"
    if access.these:
        return ""
    if access.anonymous:
        return f"{ref.repository} was never seen to be pullable without credentials"
    return f"these credentials were never seen to work for {ref.repository}"


def shared_check_refusal(ref: Reference, access: Access, public_marker: bool) -> str:
    """Why another node's check may not stand in for this node's ('' when it may): only a
    repository anyone can pull, or credentials this node saw work for it; nothing private
    is answered on another node's word."""
    if access.public or access.these:
        return ""
    if access.anonymous:
        return "" if public_marker else (f"{ref.repository} was never seen to be pullable "
                                         "without credentials")
    return f"these credentials were never seen to work for {ref.repository} on this node"


def backing_copy_refusal(settings: Settings, ref: Reference, public: bool) -> str:
    """Why backing's copy may not be handed to a node that has none while upstream fails:
    nobody can check this pod's credentials now."""
    if public or settings.backing_private_fallback is BackingPrivateFallback.ALLOW:
        return ""
    return (f"{ref.repository} was never seen pullable without credentials "
            "(backing_private_fallback: deny)")

