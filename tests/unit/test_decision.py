"""The PullImage decision (decision.py), row by row: every row of the README's decision
table, every fallback kind, and every refusal of the security rule, as plain data in and
the steps taken and the answer out."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import pytest

from nodekeeper.errors import ContainerdError
from nodekeeper.failures import Kind
from nodekeeper.pull.decision import (
    Access,
    AskBacking,
    AskCluster,
    AwaitBacking,
    BackingView,
    Claim,
    Claimed,
    ClusterCheck,
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
    Step,
    next_step,
    shared_check_refusal,
)
from nodekeeper.pull.policy import (
    FALLBACK_REASONS,
    AuthFallback,
    BackingPrivateFallback,
    Settings,
    Update,
)
from nodekeeper.pull.reference import parse


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


OLD, NEW, CONFIG_OLD, CONFIG_NEW = sha("old"), sha("new"), sha("config-old"), sha("config-new")
TAGGED = parse("registry.example/team/app:1")
PINNED = parse(f"registry.example/team/app@{OLD}")
NOW = 1_000_000.0
NODE = NodeCopy(CONFIG_OLD, OLD)
PUBLIC = Access(public=True)
KNOWN = Access(these=True, anonymous=False)            # credentials seen to work
STRANGER = Access(anonymous=False)                     # credentials never seen to work
NOBODY = Access()                                      # no credentials, never seen public

Answers = Callable[[Step], Result]


def facts(settings: Settings | None = None, node: NodeCopy | None = NODE,
          access: Access = PUBLIC, ref: object = TAGGED, last_ok: float | None = None,
          backing: bool = False, last_digest: str = "") -> Pull:
    assert ref in (TAGGED, PINNED)
    return Pull(TAGGED if ref is TAGGED else PINNED, "rules[0] (team/*)",
                settings or Settings(Update.ALWAYS), node, access, NOW, last_ok, last_digest,
                backing)


def upstream(digest: str = NEW, authenticated: bool = False, quota_spent: bool = False,
             failure: Failed | None = None, pull: Pulled | Failed | None = None,
             backing: BackingView | None = None, backing_pull: Pulled | Failed | None = None,
             fallback_view: BackingView | None = None) -> Answers:
    """What the world answers to each step."""

    def answer(step: Step) -> Result:
        if isinstance(step, Probe):
            return failure or Probed(digest, authenticated, quota_spent)
        if isinstance(step, AskBacking):
            view = fallback_view if step.fallback else backing
            assert view is not None, f"unexpected {step}"
            return view
        assert isinstance(step, PullFrom)
        if step.source is Source.BACKING:
            assert backing_pull is not None, f"unexpected {step}"
            return backing_pull
        return pull or Pulled(CONFIG_NEW, step.digest or digest)

    return answer


def decide(pull: Pull, world: Answers) -> tuple[Serve | Refuse, list[Step]]:
    taken: list[Step] = []
    while True:
        step = next_step(pull)
        if isinstance(step, Serve | Refuse):
            return step, taken
        assert len(taken) < 10, taken
        taken.append(step)
        pull = pull.after(step, world(step))


def served(answer: Serve | Refuse) -> Serve:
    assert isinstance(answer, Serve), answer
    return answer


def refused(answer: Serve | Refuse) -> Refuse:
    assert isinstance(answer, Refuse), answer
    return answer


def no_network(step: Step) -> Result:
    raise AssertionError(f"no step expected, got {step}")


# -- answers without network -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("settings", "ref", "last_ok", "decision", "reason"),
    [
        (Settings(Update.NEVER), TAGGED, None, Decision.LOCAL_PINNED, "update: never"),
        (Settings(Update.ALWAYS), PINNED, None, Decision.LOCAL_PINNED, "digest reference"),
        (Settings(Update.INTERVAL, interval=60), TAGGED, NOW - 59, Decision.LOCAL_INTERVAL,
         "checked 59s ago"),
    ],
)
@pytest.mark.parametrize("access", [PUBLIC, KNOWN])
def test_the_nodes_copy_without_network(settings: Settings, ref: object, last_ok: float | None,
                                        decision: Decision, reason: str,
                                        access: Access) -> None:
    answer, steps = decide(facts(settings, ref=ref, last_ok=last_ok, access=access),
                           no_network)
    assert steps == []
    assert served(answer) == Serve(decision, reason, CONFIG_OLD, OLD)


@pytest.mark.parametrize(
    ("settings", "last_ok"),
    [
        (Settings(Update.ALWAYS), NOW),
        (Settings(Update.INTERVAL, interval=60), NOW - 60),    # elapsed, exactly
        (Settings(Update.INTERVAL, interval=60), None),        # never checked
    ],
)
def test_a_check_is_due(settings: Settings, last_ok: float | None) -> None:
    assert next_step(facts(settings, last_ok=last_ok)) == Probe()


@pytest.mark.parametrize("access", [STRANGER, NOBODY])
@pytest.mark.parametrize(("settings", "ref", "last_ok"), [
    (Settings(Update.NEVER), TAGGED, None),
    (Settings(Update.ALWAYS), PINNED, None),
    (Settings(Update.INTERVAL, interval=3600), TAGGED, NOW),
])
def test_unverified_credentials_are_checked_upstream_first(
        settings: Settings, ref: object, last_ok: float | None, access: Access) -> None:
    step = next_step(facts(settings, ref=ref, last_ok=last_ok, access=access))
    assert step == Probe()
    assert isinstance(step, Probe)
    assert step.reason == "credentials not yet verified"


# -- a check upstream ------------------------------------------------------------------------

def test_digest_unchanged_is_fresh() -> None:
    answer, steps = decide(facts(), upstream(OLD))
    assert steps == [Probe()]
    assert served(answer) == Serve(Decision.FRESH, "digest unchanged", CONFIG_OLD, OLD,
                                   confirmed=True, copy_to_backing=True)


def test_fresh_after_verifying_credentials_says_so() -> None:
    answer, _ = decide(facts(Settings(Update.NEVER), access=STRANGER), upstream(OLD, True))
    assert served(answer).decision is Decision.FRESH
    assert served(answer).reason == "credentials not yet verified"


def test_digest_moved_is_updated() -> None:
    answer, steps = decide(facts(), upstream(NEW))
    assert steps == [Probe(), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer) == Serve(Decision.UPDATED, "digest changed", CONFIG_NEW, NEW,
                                   confirmed=True, copy_to_backing=True)


def test_the_digest_pulled_is_the_one_answered() -> None:
    # Upstream moved again between the probe and the pull: what containerd recorded counts.
    third = sha("third")
    answer, _ = decide(facts(), upstream(NEW, pull=Pulled(CONFIG_NEW, third)))
    assert served(answer).digest == third


def test_no_copy_is_pulled() -> None:
    answer, steps = decide(facts(node=None), upstream(NEW))
    assert steps == [Probe(), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer) == Serve(Decision.PULLED, "not on the node", CONFIG_NEW, NEW,
                                   confirmed=True, copy_to_backing=True)


def test_a_digest_reference_without_a_copy_is_pulled_without_a_probe() -> None:
    answer, steps = decide(facts(node=None, ref=PINNED), upstream())
    assert steps == [PullFrom(Source.UPSTREAM, OLD)]
    assert served(answer) == Serve(Decision.PULLED, "digest reference", CONFIG_NEW, OLD)


# -- backing on the update path --------------------------------------------------------------

@pytest.mark.parametrize("node", [NODE, None])
def test_a_needed_pull_comes_from_backing_when_it_holds_the_digest(node: NodeCopy | None
                                                                   ) -> None:
    answer, steps = decide(facts(node=node, backing=True), upstream(
        NEW, backing=BackingView(NEW, holds=True), backing_pull=Pulled(CONFIG_NEW, NEW)))
    assert steps == [Probe(), AskBacking(NEW), PullFrom(Source.BACKING, NEW)]
    assert served(answer) == Serve(Decision.BACKING, "digest held by backing", CONFIG_NEW, NEW,
                                   confirmed=True)


def test_backing_without_the_digest_leaves_the_pull_to_upstream() -> None:
    answer, steps = decide(facts(backing=True), upstream(NEW, backing=BackingView(NEW, False)))
    assert steps == [Probe(), AskBacking(NEW), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer).decision is Decision.UPDATED


def test_a_failed_pull_from_backing_is_retried_upstream() -> None:
    answer, steps = decide(facts(backing=True), upstream(
        NEW, backing=BackingView(NEW, True), backing_pull=Failed(Kind.INVALID, "bad blob")))
    assert steps == [Probe(), AskBacking(NEW), PullFrom(Source.BACKING, NEW),
                     PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer).decision is Decision.UPDATED


def test_fresh_needs_no_backing() -> None:
    answer, steps = decide(facts(backing=True), upstream(OLD))
    assert steps == [Probe()]
    assert served(answer).decision is Decision.FRESH


# -- falling back to the node's copy ---------------------------------------------------------

@pytest.mark.parametrize("kind", FALLBACK_REASONS)
@pytest.mark.parametrize("access", [PUBLIC, KNOWN])
def test_every_fallback_kind_serves_the_nodes_copy(kind: Kind, access: Access) -> None:
    answer, steps = decide(facts(access=access), upstream(failure=Failed(kind, "detail")))
    assert steps == [Probe()]
    assert served(answer) == Serve(Decision.FALLBACK, kind.value, CONFIG_OLD, OLD,
                                   Failed(kind, "detail"))


@pytest.mark.parametrize("kind", FALLBACK_REASONS)
def test_a_kind_missing_from_fallback_on_is_refused(kind: Kind) -> None:
    settings = Settings(Update.ALWAYS, fallback_on=frozenset(FALLBACK_REASONS) - {kind})
    answer = refused(decide(facts(settings), upstream(failure=Failed(kind, "detail")))[0])
    assert answer.kind is kind
    assert f"fallback_on of rules[0] (team/*) does not include {kind.value}" in answer.message


@pytest.mark.parametrize(("access", "why"), [
    (STRANGER, "these credentials were never seen to work for registry.example/team/app"),
    (NOBODY, "registry.example/team/app was never seen to be pullable without credentials"),
])
@pytest.mark.parametrize("kind", list(Kind))
def test_the_nodes_copy_is_refused_to_unverified_credentials(access: Access, why: str,
                                                            kind: Kind) -> None:
    answer = refused(decide(facts(access=access), upstream(failure=Failed(kind, "x")))[0])
    assert answer.kind is kind
    assert answer.message == (f"{TAGGED}: upstream {kind.value}: x; the node's copy is not "
                              f"used because {why}")


def test_unauthorized_falls_back_for_credentials_that_worked_before() -> None:
    # A rotated password: 401 now, but these credentials pulled this image before.
    answer, _ = decide(facts(access=KNOWN), upstream(failure=Failed(Kind.UNAUTHORIZED, "401")))
    assert served(answer).decision is Decision.FALLBACK


def test_unauthorized_cannot_be_left_out_of_fallback_on() -> None:
    # It is governed by auth_fallback instead; fallback_on never lists it.
    settings = Settings(Update.ALWAYS, fallback_on=frozenset())
    answer, _ = decide(facts(settings, access=KNOWN),
                       upstream(failure=Failed(Kind.UNAUTHORIZED, "401")))
    assert served(answer).decision is Decision.FALLBACK


@pytest.mark.parametrize("kind", [Kind.UNREACHABLE, Kind.UNAUTHORIZED])
def test_auth_fallback_never_refuses_known_credentials(kind: Kind) -> None:
    settings = Settings(Update.ALWAYS, auth_fallback=AuthFallback.NEVER)
    answer = refused(decide(facts(settings, access=KNOWN),
                            upstream(failure=Failed(kind, "x")))[0])
    assert "needs credentials and auth_fallback is never" in answer.message


def test_auth_fallback_never_still_serves_public_repositories() -> None:
    settings = Settings(Update.ALWAYS, auth_fallback=AuthFallback.NEVER)
    answer, _ = decide(facts(settings), upstream(failure=Failed(Kind.UNREACHABLE, "x")))
    assert served(answer).decision is Decision.FALLBACK


def test_a_spent_docker_hub_quota_falls_back_instead_of_pulling() -> None:
    answer, steps = decide(facts(), upstream(NEW, quota_spent=True))
    assert steps == [Probe()]
    assert served(answer).decision is Decision.FALLBACK
    assert served(answer).reason == "rate_limited"


def test_a_spent_quota_without_a_copy_still_tries_the_pull() -> None:
    answer, steps = decide(facts(node=None), upstream(NEW, quota_spent=True))
    assert steps == [Probe(), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer).decision is Decision.PULLED


@pytest.mark.parametrize("kind", list(Kind))
def test_a_pull_failing_after_a_good_probe_falls_back(kind: Kind) -> None:
    # The probe has just shown these credentials work: they may have the node's copy.
    answer, steps = decide(facts(access=STRANGER), upstream(
        NEW, authenticated=True, pull=Failed(kind, "connection reset")))
    assert steps == [Probe(), PullFrom(Source.UPSTREAM, NEW)]
    if kind is Kind.UNAUTHORIZED or kind in FALLBACK_REASONS:
        assert served(answer).decision is Decision.FALLBACK
        assert served(answer).failure == Failed(
            kind, "pull after a good probe failed: connection reset")


def test_an_anonymous_probe_shows_the_repository_public() -> None:
    answer, _ = decide(facts(access=NOBODY), upstream(
        NEW, authenticated=False, pull=Failed(Kind.UNREACHABLE, "gone")))
    assert served(answer).decision is Decision.FALLBACK


# -- no copy on the node ---------------------------------------------------------------------

CONTAINERD_SAYS = ContainerdError("UNKNOWN", "failed to pull and unpack image: 401")


@pytest.mark.parametrize("kind", [Kind.UNAUTHORIZED, Kind.NOT_FOUND, Kind.SERVER_ERROR,
                                  Kind.INVALID, Kind.RATE_LIMITED])
def test_containerds_own_refusal_is_passed_on(kind: Kind) -> None:
    answer = refused(decide(facts(node=None), upstream(
        NEW, pull=Failed(kind, "x", CONTAINERD_SAYS)))[0])
    assert answer == Refuse(kind, "x", CONTAINERD_SAYS)


@pytest.mark.parametrize("kind", list(Kind))
def test_no_copy_and_no_backing_is_an_error(kind: Kind) -> None:
    answer = refused(decide(facts(node=None), upstream(failure=Failed(kind, "x")))[0])
    assert answer.kind is kind
    assert answer.message == (f"{TAGGED}: upstream {kind.value}: x; the node has no copy to "
                              "fall back to")


@pytest.mark.parametrize("kind", [Kind.UNREACHABLE, Kind.TIMEOUT])
def test_an_unreachable_registry_for_a_pinned_pull_goes_to_the_fallback(kind: Kind) -> None:
    answer = refused(decide(facts(node=None, ref=PINNED),
                            upstream(pull=Failed(kind, "dial tcp", CONTAINERD_SAYS)))[0])
    assert answer.kind is kind
    assert "the node has no copy to fall back to" in answer.message


# -- falling back to backing's copy ----------------------------------------------------------

HELD_PUBLIC = BackingView(NEW, holds=True, public=True)


@pytest.mark.parametrize("kind", FALLBACK_REASONS)
def test_backings_public_copy_stands_in_for_a_node_without_one(kind: Kind) -> None:
    answer, steps = decide(facts(node=None, backing=True, last_digest=NEW, access=NOBODY),
                           upstream(failure=Failed(kind, "x"), fallback_view=HELD_PUBLIC,
                                    backing_pull=Pulled(CONFIG_NEW, NEW)))
    assert steps == [Probe(), AskBacking(NEW, fallback=True), PullFrom(Source.BACKING, NEW)]
    assert served(answer) == Serve(Decision.BACKING_FALLBACK, kind.value, CONFIG_NEW, NEW,
                                   Failed(kind, "x"))


def test_without_a_known_digest_backing_is_asked_for_its_tag() -> None:
    _, steps = decide(facts(node=None, backing=True), upstream(
        failure=Failed(Kind.UNREACHABLE, "x"), fallback_view=HELD_PUBLIC,
        backing_pull=Pulled(CONFIG_NEW, NEW)))
    assert steps[1] == AskBacking("", fallback=True)


def test_a_pinned_reference_asks_backing_for_its_digest() -> None:
    answer, steps = decide(facts(node=None, ref=PINNED, backing=True), upstream(
        pull=Failed(Kind.UNREACHABLE, "x"), fallback_view=BackingView(OLD, True, True),
        backing_pull=Pulled(CONFIG_OLD, OLD)))
    assert steps == [PullFrom(Source.UPSTREAM, OLD), AskBacking(OLD, fallback=True),
                     PullFrom(Source.BACKING, OLD)]
    assert served(answer).decision is Decision.BACKING_FALLBACK


@pytest.mark.parametrize(("view", "why"), [
    (BackingView(NEW, holds=False, public=True), "neither has the backing registry"),
    (BackingView("", holds=False), "neither has the backing registry"),
    (BackingView("", holds=False, down="no answer within 2s"),
     "the backing registry is unavailable (no answer within 2s)"),
    (BackingView(NEW, holds=True, public=False),
     "registry.example/team/app was never seen pullable without credentials "
     "(backing_private_fallback: deny)"),
])
def test_backings_copy_refused(view: BackingView, why: str) -> None:
    answer = refused(decide(facts(node=None, backing=True, last_digest=NEW), upstream(
        failure=Failed(Kind.TIMEOUT, "x"), fallback_view=view))[0])
    assert answer.kind is Kind.TIMEOUT
    assert why in answer.message


def test_backing_private_fallback_allow_serves_a_private_copy() -> None:
    settings = Settings(Update.ALWAYS, backing_private_fallback=BackingPrivateFallback.ALLOW)
    answer, _ = decide(facts(settings, node=None, backing=True, last_digest=NEW), upstream(
        failure=Failed(Kind.UNREACHABLE, "x"), fallback_view=BackingView(NEW, True, False),
        backing_pull=Pulled(CONFIG_NEW, NEW)))
    assert served(answer).decision is Decision.BACKING_FALLBACK


def test_backing_is_not_asked_for_a_kind_outside_fallback_on() -> None:
    settings = Settings(Update.ALWAYS, fallback_on=frozenset({Kind.TIMEOUT}))
    answer, steps = decide(facts(settings, node=None, backing=True),
                           upstream(failure=Failed(Kind.NOT_FOUND, "x")))
    assert steps == [Probe()]
    assert "the node has no copy to fall back to" in refused(answer).message


def test_unauthorized_never_falls_back_to_backing() -> None:
    answer, steps = decide(facts(node=None, backing=True, access=KNOWN),
                           upstream(failure=Failed(Kind.UNAUTHORIZED, "401")))
    assert steps == [Probe()]
    assert refused(answer).kind is Kind.UNAUTHORIZED


def test_a_failed_pull_of_backings_copy_is_an_error() -> None:
    answer = refused(decide(facts(node=None, backing=True, last_digest=NEW), upstream(
        failure=Failed(Kind.UNREACHABLE, "x"), fallback_view=HELD_PUBLIC,
        backing_pull=Failed(Kind.INVALID, "digest mismatch")))[0])
    assert answer.message.endswith("pulling the backing registry's copy failed too: "
                                   "digest mismatch")


def test_a_failed_backing_pull_is_not_tried_twice() -> None:
    # Backing failed on the update path; upstream then failed too: no second attempt.
    answer, steps = decide(facts(node=None, backing=True), upstream(
        NEW, backing=BackingView(NEW, True), backing_pull=Failed(Kind.INVALID, "bad"),
        pull=Failed(Kind.UNREACHABLE, "gone"), fallback_view=HELD_PUBLIC))
    assert steps.count(PullFrom(Source.BACKING, NEW)) == 1
    assert refused(answer).message.endswith("failed too: bad")


def test_access_now_reflects_the_probe() -> None:
    pull = facts(access=STRANGER)
    assert not pull.access_now.verified
    assert pull.after(Probe(), Probed(NEW, authenticated=True)).access_now.these
    assert pull.after(Probe(), Probed(NEW, authenticated=False)).access_now.public
    assert not replace(pull).after(Probe(), Failed(Kind.TIMEOUT, "x")).access_now.verified


@pytest.mark.parametrize("kind", [Kind.NOT_FOUND, Kind.UNAUTHORIZED, Kind.INVALID])
def test_a_pinned_pull_refused_by_containerd_is_passed_on(kind: Kind) -> None:
    answer, steps = decide(facts(node=None, ref=PINNED, backing=True),
                           upstream(pull=Failed(kind, "x", CONTAINERD_SAYS)))
    assert steps == [PullFrom(Source.UPSTREAM, OLD)]
    assert answer == Refuse(kind, "x", CONTAINERD_SAYS)


# -- what an answer confirms, and what is copied to backing ----------------------------------

@pytest.mark.parametrize(("pull", "world", "confirmed", "copied"), [
    (facts(Settings(Update.NEVER)), no_network, False, False),                # local-pinned
    (facts(), upstream(OLD), True, True),                                      # fresh
    (facts(), upstream(NEW), True, True),                                      # updated
    (facts(node=None), upstream(NEW), True, True),                             # pulled
    (facts(node=None, ref=PINNED), upstream(OLD), False, False),               # pinned pull
    (facts(node=None, backing=True), upstream(NEW, backing=BackingView(NEW, True),
                                              backing_pull=Pulled(CONFIG_NEW, NEW)),
     True, False),                                                             # backing
    (facts(), upstream(failure=Failed(Kind.UNREACHABLE, "refused")), False, False),  # fallback
    (facts(node=None, backing=True),
     upstream(failure=Failed(Kind.UNREACHABLE, "refused"),
              fallback_view=BackingView(OLD, True, public=True),
              backing_pull=Pulled(CONFIG_OLD, OLD)), False, False),          # backing-fallback
])
def test_an_answer_says_whether_upstream_confirmed_it_and_whether_backing_gets_a_copy(
        pull: Pull, world: Answers, confirmed: bool, copied: bool) -> None:
    answer = served(decide(pull, world)[0])
    assert (answer.confirmed, answer.copy_to_backing) == (confirmed, copied), answer


# -- one fetch per digest for the cluster ----------------------------------------------------

WAIT = 5.0


def cluster(world: Answers, claimed: Claimed | None = None, awaited: BackingView | None = None,
            check: ClusterCheck | None = None) -> Answers:
    """`world`, and what backing answers about the cluster."""

    def answer(step: Step) -> Result:
        found: Result | None = world(step) if isinstance(step, Probe | AskBacking | PullFrom) \
            else {Claim: claimed, AwaitBacking: awaited, AskCluster: check}[type(step)]
        assert found is not None, f"unexpected {step}"
        return found

    return answer


def test_another_nodes_fetch_is_pulled_from_backing_once_it_holds_the_digest() -> None:
    answer, steps = decide(
        replace(facts(node=None, backing=True), fetch_wait=WAIT),
        cluster(upstream(NEW, backing=BackingView(NEW, False),
                         backing_pull=Pulled(CONFIG_NEW, NEW)),
                claimed=Claimed(mine=False, holder="node-b"),
                awaited=BackingView(NEW, holds=True)))
    assert steps == [Probe(), AskBacking(NEW), Claim(NEW), AwaitBacking(NEW, WAIT),
                     PullFrom(Source.BACKING, NEW)]
    assert served(answer) == Serve(Decision.BACKING, "fetched upstream by node-b", CONFIG_NEW,
                                   NEW, confirmed=True)


def test_the_lease_holder_fetches_upstream_and_feeds_backing() -> None:
    answer, steps = decide(replace(facts(backing=True), fetch_wait=WAIT),
                           cluster(upstream(NEW, backing=BackingView(NEW, False)),
                                   claimed=Claimed(mine=True, holder="node-a")))
    assert steps == [Probe(), AskBacking(NEW), Claim(NEW), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer) == Serve(Decision.UPDATED, "digest changed", CONFIG_NEW, NEW,
                                   confirmed=True, copy_to_backing=True)


@pytest.mark.parametrize("awaited", [BackingView(NEW, holds=False),
                                     BackingView(NEW, holds=False, down="no answer within 2s")])
def test_a_fetch_that_does_not_land_in_time_is_made_upstream(awaited: BackingView) -> None:
    answer, steps = decide(replace(facts(node=None, backing=True), fetch_wait=WAIT),
                           cluster(upstream(NEW, backing=BackingView(NEW, False)),
                                   claimed=Claimed(mine=False, holder="node-b"),
                                   awaited=awaited))
    assert steps[-2:] == [AwaitBacking(NEW, WAIT), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer) == Serve(Decision.PULLED, "not on the node", CONFIG_NEW, NEW,
                                   confirmed=True, copy_to_backing=True)


def test_a_failed_pull_of_another_nodes_fetch_is_made_upstream() -> None:
    answer, steps = decide(replace(facts(node=None, backing=True), fetch_wait=WAIT),
                           cluster(upstream(NEW, backing=BackingView(NEW, False),
                                            backing_pull=Failed(Kind.INVALID, "bad blob")),
                                   claimed=Claimed(mine=False, holder="node-b"),
                                   awaited=BackingView(NEW, holds=True)))
    assert steps[-2:] == [PullFrom(Source.BACKING, NEW), PullFrom(Source.UPSTREAM, NEW)]
    assert served(answer).decision is Decision.PULLED


@pytest.mark.parametrize(("fetch_wait", "view"), [
    (0.0, BackingView(NEW, False)),                              # leases switched off
    (WAIT, BackingView(NEW, False, down="connection refused")),  # backing is down
])
def test_no_lease_is_claimed_without_a_wait_or_a_backing(fetch_wait: float,
                                                         view: BackingView) -> None:
    _, steps = decide(replace(facts(backing=True), fetch_wait=fetch_wait),
                      cluster(upstream(NEW, backing=view)))
    assert steps == [Probe(), AskBacking(NEW), PullFrom(Source.UPSTREAM, NEW)]


def test_no_lease_is_claimed_for_a_digest_backing_holds() -> None:
    _, steps = decide(replace(facts(backing=True), fetch_wait=WAIT), cluster(upstream(
        NEW, backing=BackingView(NEW, True), backing_pull=Pulled(CONFIG_NEW, NEW))))
    assert Claim(NEW) not in steps


# -- checks shared through backing -----------------------------------------------------------

INTERVAL = Settings(Update.INTERVAL, interval=60)


def shared(settings: Settings = INTERVAL, access: Access = PUBLIC,
           last_ok: float | None = NOW - 600) -> Pull:
    return replace(facts(settings, access=access, last_ok=last_ok, backing=True),
                   shared_checks=True)


@pytest.mark.parametrize("access", [PUBLIC, KNOWN])
def test_a_recent_cluster_check_of_the_nodes_digest_stands_in(access: Access) -> None:
    answer, steps = decide(shared(access=access),
                           cluster(no_network, check=ClusterCheck(OLD, NOW - 20, "node-b")))
    assert steps == [AskCluster()]
    assert served(answer) == Serve(Decision.CLUSTER_INTERVAL, "checked by node-b 20s ago",
                                   CONFIG_OLD, OLD)


def test_the_nodes_own_recent_check_needs_no_cluster() -> None:
    answer, steps = decide(shared(last_ok=NOW - 10), no_network)
    assert steps == []
    assert served(answer).decision is Decision.LOCAL_INTERVAL


def test_a_clock_a_little_ahead_counts_as_just_checked() -> None:
    answer, _ = decide(shared(), cluster(no_network, check=ClusterCheck(OLD, NOW + 5, "b")))
    assert served(answer).reason == "checked by b 0s ago"


@pytest.mark.parametrize(("check", "reason"), [
    (ClusterCheck(), ""),                                     # none, or backing failed
    (ClusterCheck(OLD, NOW - 60, "node-b"), ""),              # as old as the interval
    (ClusterCheck(OLD, NOW + 60, "node-b"), ""),              # from a clock far ahead
    (ClusterCheck(NEW, NOW - 5, "node-b"), "the cluster's check names another digest"),
])
def test_a_cluster_check_that_does_not_vouch_leaves_the_check_upstream(
        check: ClusterCheck, reason: str) -> None:
    answer, steps = decide(shared(), cluster(upstream(OLD), check=check))
    assert steps == [AskCluster(), Probe()]
    assert served(answer) == Serve(Decision.FRESH, reason or "digest unchanged", CONFIG_OLD,
                                   OLD, confirmed=True, copy_to_backing=True)


@pytest.mark.parametrize("settings", [Settings(Update.ALWAYS), Settings(Update.NEVER)])
def test_only_update_interval_reads_the_cluster(settings: Settings) -> None:
    step = next_step(shared(settings))
    assert not isinstance(step, AskCluster)


def test_an_anonymous_pull_uses_a_check_of_a_repository_backing_marks_public() -> None:
    answer, steps = decide(shared(access=NOBODY), cluster(
        no_network, check=ClusterCheck(OLD, NOW - 20, "node-b", public=True)))
    assert steps == [AskCluster(marker=True)]
    assert served(answer).decision is Decision.CLUSTER_INTERVAL


@pytest.mark.parametrize(("access", "public"), [(NOBODY, False), (STRANGER, False),
                                                (STRANGER, True)])
def test_nothing_private_is_answered_on_another_nodes_word(access: Access,
                                                           public: bool) -> None:
    answer, steps = decide(shared(access=access), cluster(
        upstream(OLD, authenticated=access is STRANGER),
        check=ClusterCheck(OLD, NOW - 20, "node-b", public=public)))
    assert steps == [AskCluster(marker=True), Probe()]
    assert served(answer).decision is Decision.FRESH


@pytest.mark.parametrize(("access", "public", "why"), [
    (PUBLIC, False, ""),
    (KNOWN, False, ""),
    (NOBODY, True, ""),
    (NOBODY, False, "registry.example/team/app was never seen to be pullable without credentials"),
    (STRANGER, True,
     "these credentials were never seen to work for registry.example/team/app on this node"),
])
def test_the_shared_check_rule(access: Access, public: bool, why: str) -> None:
    assert shared_check_refusal(TAGGED, access, public) == why
