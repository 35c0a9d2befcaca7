"""Which image the node holds under each name, as learned from containerd, kept true by
containerd's image events. Pure: the event stream lives in client.py.

Inside an `interval`, a PullImage is answered with the node's copy without any network.
Asking containerd's ImageStatus first would double the cost of that answer, so the last
answer for each name is kept here, under three rules:

- Only while the event stream is up (`follow(True)`). Losing it forgets everything, and
  nothing is kept until it is back: an image removed while nobody listened is never served.
- Any image event forgets that name, and an ImageStatus that was in flight when any event
  arrived is not kept (the generation moved), so a late answer cannot undo a removal.
- An answer is kept at most TTL_SECONDS, a bound on harm should an event ever be missed.

containerd's own CRI plugin learns about image records the same way, through these events.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TTL_SECONDS = 60.0


class Presence:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 ttl: float = TTL_SECONDS) -> None:
        self._clock = clock
        self._ttl = ttl
        self._ids: dict[str, tuple[str, float]] = {}
        self._live = False
        self._generation = 0

    @property
    def live(self) -> bool:
        return self._live

    @property
    def generation(self) -> int:
        """Read before asking containerd; hand back to learn()."""
        return self._generation

    def image_id(self, name: str) -> str:
        """The image ID last learned for `name`, or '' when it must be asked afresh."""
        entry = self._ids.get(name)
        if entry is None:
            return ""
        image_id, learned_at = entry
        if self._clock() - learned_at > self._ttl:
            del self._ids[name]
            return ""
        return image_id

    def learn(self, name: str, image_id: str, generation: int) -> None:
        """Keep containerd's answer for `name`, if nothing changed since it was asked."""
        if self._live and image_id and generation == self._generation:
            self._ids[name] = (image_id, self._clock())

    def changed(self, name: str) -> None:
        """An image event for `name`."""
        self._generation += 1
        self._ids.pop(name, None)

    def follow(self, live: bool) -> None:
        """The event stream started (True) or ended (False); either way, start over."""
        self._generation += 1
        self._ids.clear()
        self._live = live

    def __len__(self) -> int:
        return len(self._ids)
