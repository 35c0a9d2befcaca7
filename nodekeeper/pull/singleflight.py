"""One piece of work per key for callers that overlap in time, never a finished one reused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Seal = Callable[[], None]

# A round that starts while the previous round for its key is still running waits at most
# this long for it, so that a round stuck in a slow pull holds nobody up for long.
QUEUE_SECONDS = 2.0
# Then it gathers callers until none has joined for GATHER_IDLE_SECONDS (at most
# GATHER_MAX_SECONDS): a burst of calls reaches the server in clumps over tens of
# milliseconds, and each clump should not cost a question upstream of its own.
GATHER_IDLE_SECONDS = 0.01
GATHER_MAX_SECONDS = 0.1


@dataclass(eq=False)
class _Round(Generic[V]):
    task: asyncio.Future[V] = field(init=False)
    last_join: float = 0.0

    async def gather(self, idle: float, longest: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + longest
        while True:
            # Each caller who joins meanwhile moves last_join, and so the end of the wait.
            wait = min(self.last_join + idle, until) - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)


class SingleFlight(Generic[K, V]):
    """Callers asking for the same key share one round of work while it is still open.

    A round's work calls `seal()` once what it is about to do would not reflect a caller
    that arrived later: PullImage seals just before it asks upstream, because a caller that
    starts after the question went out may be after a push that the answer predates.
    A caller that finds the key sealed starts the next round. That round begins once the
    sealed one has finished (or after QUEUE_SECONDS) and callers have stopped arriving
    (GATHER_*), gathering everyone who arrives meanwhile, so a burst costs a few rounds
    instead of one per caller. A caller that finds nothing running never waits.

    The work runs in a task of its own: a caller that is cancelled (a kubelet that gave
    up) stops waiting, but the work goes on for everyone else. Nothing is kept once a
    round finishes.
    """

    def __init__(self, queue_seconds: float = QUEUE_SECONDS) -> None:
        self._queue_seconds = queue_seconds
        self._open: dict[K, _Round[V]] = {}
        self._sealed: dict[K, _Round[V]] = {}

    def busy(self, key: K) -> bool:
        return key in self._open or key in self._sealed

    async def run(self, key: K, work: Callable[[Seal], Awaitable[V]]) -> tuple[V, bool]:
        """The work's result, and whether this caller joined a round already open."""
        loop = asyncio.get_running_loop()
        joined = self._open.get(key)
        if joined is not None:
            joined.last_join = loop.time()
            return await asyncio.shield(joined.task), True
        round_: _Round[V] = _Round(last_join=loop.time())
        before = self._sealed.get(key)

        def seal() -> None:
            if self._open.get(key) is round_:
                del self._open[key]
                self._sealed[key] = round_

        async def body() -> V:
            if before is not None:
                if not before.task.done():
                    await asyncio.wait({before.task}, timeout=self._queue_seconds)
                await round_.gather(GATHER_IDLE_SECONDS, GATHER_MAX_SECONDS)
            return await work(seal)

        round_.task = asyncio.ensure_future(body())
        self._open[key] = round_
        round_.task.add_done_callback(lambda done: self._forget(key, round_, done))
        return await asyncio.shield(round_.task), False

    def _forget(self, key: K, round_: _Round[V], task: asyncio.Future[V]) -> None:
        # Retrieving the exception here means a failure nobody awaited is not reported lost.
        if not task.cancelled():
            task.exception()
        for table in (self._open, self._sealed):
            if table.get(key) is round_:
                del table[key]
