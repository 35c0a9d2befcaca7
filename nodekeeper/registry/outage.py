"""Outage episodes of registry endpoints: pure bookkeeping, no I/O, no clock.

An endpoint is one host a registry's tags are resolved at (registry/hosts.py: the mirrors
of a hosts.toml, then the server). It enters an episode when a probe finds it unreachable
or silent past its deadline, and leaves it with its first answer of any kind: a 404 or a
503 is an answer, the host is there. While it is in one, a pull that reaches it does
what `next_step` says:

    SEND   nothing in flight: send the episode's one probe (with the full probe_timeout,
           detached from the pull), and wait for it at most outage_wait
    WAIT   a probe is in flight: wait for it at most outage_wait
    ASK    no episode (or it ended while the pull waited): ask as usual. An answer to a
           probe another pull sent is never this pull's answer: under `update: always` a
           pull that starts after a push must get the build pushed.

A pull that waited outage_wait without an answer goes on without the endpoint (`served`):
the next host, or the episode's failure. So an outage costs the first pull one
probe_timeout (it cannot know), and every later pull at most outage_wait per endpoint,
with one probe to the endpoint in flight at a time. Nothing polls: every probe is sent by
a pull. Times are whatever clock the caller passes in (seconds).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nodekeeper.failures import Kind

# The failures that say nothing answered. Every other kind is an answer from the host.
OUTAGE_KINDS = frozenset({Kind.UNREACHABLE, Kind.TIMEOUT})


class Step(str, enum.Enum):
    ASK = "ask"
    SEND = "send"
    WAIT = "wait"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Outage:
    """One episode as it stands: `since` in the caller's clock, `answered` the pulls that
    went on without the endpoint because of it."""

    endpoint: str
    since: float
    kind: Kind
    detail: str
    answered: int = 0


@dataclass(frozen=True)
class Started:
    outage: Outage


@dataclass(frozen=True)
class Ended:
    outage: Outage
    lasted: float


@dataclass
class _Episode:
    since: float
    kind: Kind
    detail: str
    answered: int = 0
    probing: bool = False   # the episode's probe is in flight


class Outages:
    """Every endpoint's episode, if it is in one."""

    def __init__(self) -> None:
        self._open: dict[str, _Episode] = {}

    def next_step(self, endpoint: str) -> Step:
        """What a pull reaching `endpoint` does now. SEND makes the caller the sender of
        the episode's probe: it must report how that ended (`failed(..., probe=True)` or
        `answered`)."""
        episode = self._open.get(endpoint)
        if episode is None:
            return Step.ASK
        if episode.probing:
            return Step.WAIT
        episode.probing = True
        return Step.SEND

    def failed(self, endpoint: str, kind: Kind, detail: str, now: float, *,
               probe: bool = False) -> Started | Ended | None:
        """A request to `endpoint` failed with `kind`; `probe` when it was the episode's
        probe. Starts an episode when nothing answered; any other kind is an answer."""
        if kind not in OUTAGE_KINDS:
            return self.answered(endpoint, now)
        episode = self._open.get(endpoint)
        if episode is None:
            episode = self._open[endpoint] = _Episode(now, kind, detail)
            return Started(self._view(endpoint, episode))
        if probe:
            episode.probing = False
        return None

    def answered(self, endpoint: str, now: float) -> Ended | None:
        """`endpoint` answered (anything at all): its episode, if any, is over."""
        episode = self._open.pop(endpoint, None)
        if episode is None:
            return None
        return Ended(self._view(endpoint, episode), now - episode.since)

    def served(self, endpoint: str) -> Outage | None:
        """A pull goes on without an answer from `endpoint` (it waited its outage_wait, or
        its own probe failed too): the episode answered it. The episode, or None when it
        ended meanwhile."""
        episode = self._open.get(endpoint)
        if episode is None:
            return None
        episode.answered += 1
        return self._view(endpoint, episode)

    def get(self, endpoint: str) -> Outage | None:
        """`endpoint`'s episode, if it is in one."""
        episode = self._open.get(endpoint)
        return None if episode is None else self._view(endpoint, episode)

    def open(self) -> list[Outage]:
        """Every open episode, oldest first."""
        found = [self._view(endpoint, episode) for endpoint, episode in self._open.items()]
        return sorted(found, key=lambda outage: outage.since)

    @staticmethod
    def _view(endpoint: str, episode: _Episode) -> Outage:
        return Outage(endpoint, episode.since, episode.kind, episode.detail, episode.answered)
