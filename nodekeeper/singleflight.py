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
    """

    def __init__(self) -> None:
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
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited is not "lost"
