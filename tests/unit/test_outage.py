"""Outage episodes of registry endpoints: the pure bookkeeping (registry/outage.py), and
how a pull answered during one says so (the log line's fields, the pod's Event). The
prober's side, with requests counted, is in test_probe.py."""

from __future__ import annotations

import pytest

from nodekeeper.failures import Failure, Kind
from nodekeeper.kube.events import message
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.decision import Decision
from nodekeeper.pull.edges import Answer, Pod
from nodekeeper.pull.policy import parse as parse_policy
from nodekeeper.pull.puller import Puller, PullRequest
from nodekeeper.pull.reference import Reference, parse
from nodekeeper.registry import ProbeResult
from nodekeeper.registry.outage import Ended, Outage, Outages, Started, Step
from nodekeeper.settings import Document
from tests.fakes import (
    FakeImages,
    FakeRegistry,
    FakeState,
    FakeUpstream,
    Requested,
    published,
)

MIRROR, SERVER = "mirror.test:5001", "registry.test:5000"
DETAIL = "no answer from registry.test:5000 within probe_timeout 2s"


def in_outage(outages: Outages, endpoint: str = SERVER, now: float = 100.0,
              kind: Kind = Kind.TIMEOUT) -> Started:
    change = outages.failed(endpoint, kind, DETAIL, now)
    assert isinstance(change, Started)
    return change


# -- when an episode starts ----------------------------------------------------------------

def test_no_episode_means_ask_as_usual() -> None:
    assert Outages().next_step(SERVER) is Step.ASK


@pytest.mark.parametrize("kind", [Kind.TIMEOUT, Kind.UNREACHABLE])
def test_silence_or_no_connection_starts_an_episode(kind: Kind) -> None:
    outages = Outages()
    started = in_outage(outages, kind=kind)
    assert started.outage == Outage(SERVER, 100.0, kind, DETAIL, 0)
    assert outages.open() == [started.outage]


@pytest.mark.parametrize("kind", [Kind.NOT_FOUND, Kind.UNAUTHORIZED, Kind.SERVER_ERROR,
                                  Kind.RATE_LIMITED, Kind.INVALID])
def test_any_answer_even_an_error_is_no_outage(kind: Kind) -> None:
    outages = Outages()
    assert outages.failed(SERVER, kind, "answered", 100.0) is None
    assert outages.open() == []
    assert outages.next_step(SERVER) is Step.ASK


def test_an_episode_starts_once() -> None:
    outages = Outages()
    in_outage(outages)
    assert outages.failed(SERVER, Kind.UNREACHABLE, "refused", 101.0) is None
    (outage,) = outages.open()
    assert (outage.since, outage.kind) == (100.0, Kind.TIMEOUT)  # the cause that started it


# -- one probe in flight ---------------------------------------------------------------------

def test_the_first_pull_in_an_episode_sends_the_probe_and_the_others_wait_for_it() -> None:
    outages = Outages()
    in_outage(outages)
    assert outages.next_step(SERVER) is Step.SEND
    assert [outages.next_step(SERVER) for _ in range(5)] == [Step.WAIT] * 5


def test_when_the_probe_fails_too_the_next_pull_sends_another() -> None:
    outages = Outages()
    in_outage(outages)
    assert outages.next_step(SERVER) is Step.SEND
    assert outages.failed(SERVER, Kind.TIMEOUT, DETAIL, 102.0, probe=True) is None
    assert outages.next_step(SERVER) is Step.SEND
    assert outages.next_step(SERVER) is Step.WAIT


def test_a_pull_s_own_request_failing_does_not_free_the_probe_s_place() -> None:
    # A pull that asked before the episode started, and timed out after: the episode's
    # probe is still in flight, so nobody sends a second one.
    outages = Outages()
    in_outage(outages)
    assert outages.next_step(SERVER) is Step.SEND
    assert outages.failed(SERVER, Kind.TIMEOUT, DETAIL, 101.0) is None
    assert outages.next_step(SERVER) is Step.WAIT


# -- pulls it answers ------------------------------------------------------------------------

def test_pulls_that_go_on_without_the_endpoint_are_counted() -> None:
    outages = Outages()
    in_outage(outages)
    outages.next_step(SERVER)
    counted = [outages.served(SERVER) for _ in range(3)]
    assert [outage.answered if outage else None for outage in counted] == [1, 2, 3]
    assert outages.open()[0].answered == 3


def test_a_pull_after_the_end_is_not_counted() -> None:
    outages = Outages()
    in_outage(outages)
    outages.answered(SERVER, 101.0)
    assert outages.served(SERVER) is None


# -- when it ends ----------------------------------------------------------------------------

def test_the_first_answer_ends_it_with_how_long_and_how_many() -> None:
    outages = Outages()
    in_outage(outages)
    outages.next_step(SERVER)
    outages.served(SERVER)
    outages.served(SERVER)
    ended = outages.answered(SERVER, 104.5)
    assert ended == Ended(Outage(SERVER, 100.0, Kind.TIMEOUT, DETAIL, 2), 4.5)
    assert outages.open() == []
    assert outages.next_step(SERVER) is Step.ASK  # exact again: every pull asks itself
    assert outages.answered(SERVER, 105.0) is None


@pytest.mark.parametrize("kind", [Kind.NOT_FOUND, Kind.SERVER_ERROR, Kind.UNAUTHORIZED,
                                  Kind.INVALID])
def test_an_error_answer_ends_it_too(kind: Kind) -> None:
    outages = Outages()
    in_outage(outages)
    outages.next_step(SERVER)
    change = outages.failed(SERVER, kind, "answered", 101.0, probe=True)
    assert isinstance(change, Ended)
    assert outages.open() == []


def test_a_slow_answer_to_the_probe_ends_it() -> None:
    # The probe waits the full probe_timeout: a registry answering in 1.5 s of 2 s is
    # slow, not out, and leaves the episode with that answer.
    outages = Outages()
    in_outage(outages)
    assert outages.next_step(SERVER) is Step.SEND
    ended = outages.answered(SERVER, 101.5)
    assert ended is not None
    assert ended.lasted == pytest.approx(1.5)
    assert outages.next_step(SERVER) is Step.ASK


# -- per endpoint ----------------------------------------------------------------------------

def test_episodes_are_per_endpoint() -> None:
    outages = Outages()
    in_outage(outages, MIRROR, now=100.0)
    assert outages.next_step(SERVER) is Step.ASK
    in_outage(outages, SERVER, now=101.0)
    assert outages.next_step(MIRROR) is Step.SEND
    assert outages.next_step(SERVER) is Step.SEND
    outages.served(MIRROR)
    assert outages.answered(SERVER, 102.0) is not None
    assert [(o.endpoint, o.answered) for o in outages.open()] == [(MIRROR, 1)]
    assert outages.next_step(SERVER) is Step.ASK
    assert outages.next_step(MIRROR) is Step.WAIT


def test_open_lists_the_oldest_first() -> None:
    outages = Outages()
    in_outage(outages, SERVER, now=105.0)
    in_outage(outages, MIRROR, now=100.0)
    assert [o.endpoint for o in outages.open()] == [MIRROR, SERVER]


# -- how a pull answered during an outage says so -----------------------------------------

REF = f"{SERVER}/team/app:1"
V1 = published("v1")
POD = Pod("web-0", "default", "0f5c8e2a-0000-4000-8000-000000000001")


class InOutage:
    """An upstream whose endpoint is in an outage episode: the prober went on without it."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        raise Failure(Kind.TIMEOUT, DETAIL, outage=SERVER)

    def applicable(self, ref: Reference, credentials: Credentials | None
                   ) -> Credentials | None:
        return self.upstream.applicable(ref, credentials)

    def default_host(self, ref: Reference) -> str:
        return self.upstream.default_host(ref)


class Heard:
    def __init__(self) -> None:
        self.served: list[Answer] = []

    def observe(self, served: Answer) -> None:
        self.served.append(served)


async def test_a_fallback_during_an_outage_names_the_endpoint_in_the_log_and_the_event() -> None:
    registries = {SERVER: FakeRegistry()}
    registries[SERVER].publish(REF, V1)
    images, state, heard = FakeImages(registries), FakeState(), Heard()
    rules = parse_policy(Document("policy.yaml", "defaults:\n  update: always\n"))
    upstream = FakeUpstream(registries)
    await Puller(images=images, upstream=upstream, state=state, policy=lambda: rules,
                 events=heard).pull(PullRequest(REF, None, Requested(REF)))
    puller = Puller(images=images, upstream=InOutage(upstream), state=state,
                    policy=lambda: rules, events=heard)

    answer = await puller.pull(PullRequest(REF, None, Requested(REF), POD))

    assert (answer.decision, answer.image_id) == (Decision.FALLBACK, V1.image_id)
    assert answer.log_fields()["outage"] == SERVER
    (served,) = heard.served
    assert served.outage == SERVER
    assert f"during an outage of {SERVER}: started with the node's copy of " \
           f"{parse(REF)}" in message(served, 0.0)


def test_an_event_for_a_pull_s_own_failure_names_no_outage() -> None:
    served = Answer(image="app:1", reference=str(parse(REF)), pod=POD,
                    decision=Decision.FALLBACK, kind=Kind.TIMEOUT, detail=DETAIL,
                    upstream=SERVER, digest=V1.digest)
    assert "outage" not in message(served, 0.0)
