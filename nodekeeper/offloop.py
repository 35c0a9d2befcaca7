"""Loading settings files away from the event loop: on a thread of their own, with a deadline.

The event loop answers the kubelet and pings systemd's watchdog. Reading and compiling the
largest policy allowed takes about a second of CPU (settings.py and policy.py bound it),
so it runs on a worker thread while the loop keeps serving; the interpreter lock passes
between them every half millisecond. Past the deadline the load is refused like an
invalid file and the thread is left to finish (the bounds above guarantee it does);
until it has, further loads are refused rather than piled up.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from nodekeeper.errors import SettingsError

LOAD_DEADLINE = 10.0
SWITCH_INTERVAL = 0.0005

T = TypeVar("T")


def _politely(work: Callable[[], T]) -> T:
    """work(), interrupting the event loop as little as a thread in one interpreter can."""
    # A full garbage collection walks every object alive, and the largest policy makes
    # about 250,000 while it is read: each collection its allocations trigger would hold
    # the interpreter, and with it the event loop, for 30-50 ms. The load is bounded, so
    # collection waits for it instead.
    collecting = gc.isenabled()
    gc.disable()
    # The loop waits for the interpreter lock at every step of an RPC (about ten for an
    # ImageStatus); a busy thread gives it up only every switch interval. At Python's
    # 5 ms that added up to 90 ms for one ImageStatus during a load; at 0.5 ms, to less
    # than 10. Nothing else in the daemon changes the interval, and loads run one at a time.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        return work()
    finally:
        sys.setswitchinterval(interval)
        if collecting:
            gc.enable()


class Loader:
    """Runs one load at a time on its worker thread; callers on the loop await the result.

    One thread for every load, not one each: the C library gives each thread its own
    malloc arena, and the memory a large load leaves free is reused by the next load only
    if that runs on the same thread (or MALLOC_ARENA_MAX is small, as the unit sets it).
    """

    def __init__(self, deadline: float = LOAD_DEADLINE) -> None:
        self.deadline = deadline
        self._lock = asyncio.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._finished = threading.Event()
        self._finished.set()
        self._closed = False

    async def load(self, what: str, work: Callable[[], T]) -> T:
        """work() on the worker thread. SettingsError (naming `what`) when it takes longer
        than the deadline, or while an earlier load that overran it is still running."""
        async with self._lock:
            if self._closed:
                raise SettingsError(f"{what}: not loaded, nodekeeper is stopping")
            if not self._finished.is_set():
                raise SettingsError(f"{what}: an earlier load that overran its "
                                    f"{self.deadline:g}s deadline is still running")
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            finished = self._finished = threading.Event()

            def settle(result: T | None, error: BaseException | None) -> None:
                if future.done():  # the caller gave up at the deadline
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)  # type: ignore[arg-type]

            def job() -> None:
                result: T | None = None
                error: BaseException | None = None
                try:
                    result = _politely(work)
                except BaseException as exc:  # handed to the caller, raised there
                    error = exc
                finished.set()
                # RuntimeError: the loop closed while this worked, so nobody waits for it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle, result, error)

            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="settings loader",
                                                daemon=True)
                self._worker.start()
            self._jobs.put(job)
            try:
                return await asyncio.wait_for(future, self.deadline)
            except asyncio.TimeoutError:
                raise SettingsError(f"{what}: loading took longer than {self.deadline:g}s; "
                                    "refused") from None

    def close(self) -> None:
        """End the worker thread: at once when it is idle; a load that overran its
        deadline is left to finish first (it is bounded), without waiting for it."""
        self._closed = True
        if self._worker is not None:
            self._jobs.put(None)
            if self._finished.is_set():
                self._worker.join()

    def _serve(self) -> None:
        # The lowest priority: when the CPUs are busy, the threads serving the kubelet go
        # first. Raising one's own nice value needs no privilege.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (job := self._jobs.get()) is not None:
            job()
