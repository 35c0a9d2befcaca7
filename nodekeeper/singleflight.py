"""One piece of work per key, however many callers ask for it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Callers asking for the same key while its work runs share that work's result.

    The work runs in a task of its own: a caller that is cancelled (a kubelet that gave
    up) stops waiting, but the work goes on for everyone else.

    A successful result stays shared for `linger` seconds after it is ready: the gRPC
    server hands a burst of calls to us over several milliseconds, and without this the
    stragglers of one burst would start a second round of work. Failures are forgotten at
    once, so the next caller tries again.
    """

    def __init__(self, linger: float = 0.0) -> None:
        self._linger = linger
        self._running: dict[K, asyncio.Task[V]] = {}

    def busy(self, key: K) -> bool:
        return key in self._running

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The work's result, and whether this caller joined work already running."""
        task = self._running.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task), joined

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        # Retrieving the exception here means a failure nobody awaited is not reported lost.
        failed = task.cancelled() or task.exception() is not None
        if failed or self._linger <= 0:
            self._drop(key, task)
        else:
            asyncio.get_running_loop().call_later(self._linger, self._drop, key, task)

    def _drop(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
