"""SingleFlight: one round of work per key, shared by callers that arrive while it is open,
never reused once finished."""

from __future__ import annotations

import asyncio
import gc

import pytest

from nodekeeper.pull.singleflight import Seal, SingleFlight


class Work:
    """Counts its runs; each run seals itself if `seal_at_start`, waits for `release` and
    returns its run number."""

    def __init__(self, seal_at_start: bool = False) -> None:
        self.runs = 0
        self.seal_at_start = seal_at_start
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, seal: Seal) -> int:
        self.runs += 1
        run = self.runs
        if self.seal_at_start:
            seal()
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return run


async def test_concurrent_callers_share_one_execution() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(5)]
    await work.started.wait()
    assert flight.busy("k")
    work.release.set()
    results = await asyncio.gather(*callers)
    assert work.runs == 1
    assert [value for value, _ in results] == [1] * 5
    joined = [was_joined for _, was_joined in results]
    assert joined.count(False) == 1  # exactly one caller started the work
    assert joined[0] is False


async def test_different_keys_run_separately() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    first, second = Work(), Work()
    a = asyncio.create_task(flight.run("a", first))
    b = asyncio.create_task(flight.run("b", second))
    await asyncio.gather(first.started.wait(), second.started.wait())
    first.release.set()
    second.release.set()
    assert await a == (1, False)
    assert await b == (1, False)
    assert (first.runs, second.runs) == (1, 1)


async def test_key_is_freed_after_completion() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    work.release.set()
    assert await flight.run("k", work) == (1, False)
    assert not flight.busy("k")
    # A later call runs the work again, not a stale result.
    assert await flight.run("k", work) == (2, False)
    assert work.runs == 2


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    quitter = asyncio.create_task(flight.run("k", work))
    await work.started.wait()
    stayer = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert flight.busy("k")
    work.release.set()
    assert await stayer == (1, True)
    assert work.runs == 1


async def test_work_goes_on_when_every_caller_gave_up() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    caller = asyncio.create_task(flight.run("k", work))
    await work.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert flight.busy("k")
    late = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    work.release.set()
    assert await late == (1, True)
    assert work.runs == 1


async def test_exception_reaches_every_caller() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    work.error = RuntimeError("upstream broke")
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await work.started.wait()
    work.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "upstream broke" for r in results)
    assert work.runs == 1
    assert not flight.busy("k")


async def test_failure_nobody_awaits_is_not_reported_as_lost() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flight: SingleFlight[str, int] = SingleFlight()
        work = Work()
        work.error = ValueError("nobody listens")
        caller = asyncio.create_task(flight.run("k", work))
        await work.started.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        work.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not flight.busy("k")
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(previous)


async def test_cancelled_work_frees_the_key() -> None:
    flight: SingleFlight[str, int] = SingleFlight()

    async def cancelled(seal: Seal) -> int:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await flight.run("k", cancelled)
    await asyncio.sleep(0)
    assert not flight.busy("k")


async def test_a_caller_after_the_seal_starts_the_next_round() -> None:
    # The round asked its question (sealed) before this caller arrived: its answer may
    # predate the caller, so the caller gets a round of its own.
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work(seal_at_start=True)
    first = asyncio.create_task(flight.run("k", work))
    await work.started.wait()
    second = asyncio.create_task(flight.run("k", work))
    third = asyncio.create_task(flight.run("k", work))
    for _ in range(5):
        await asyncio.sleep(0)
    assert work.runs == 1  # the next round waits for the sealed one to finish
    work.release.set()
    assert await first == (1, False)
    assert await second == (2, False)
    assert await third == (2, True)  # arrived while round 2 was still open
    assert work.runs == 2
    assert not flight.busy("k")


async def test_the_next_round_waits_for_the_sealed_one_only_so_long() -> None:
    flight: SingleFlight[str, int] = SingleFlight(queue_seconds=0.05)
    stuck = Work(seal_at_start=True)
    first = asyncio.create_task(flight.run("k", stuck))
    await stuck.started.wait()
    quick = Work()
    quick.release.set()
    assert await asyncio.wait_for(flight.run("k", quick), 2.0) == (1, False)
    stuck.release.set()
    assert await first == (1, False)


async def test_a_finished_round_is_never_reused() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    work = Work()
    work.release.set()
    results = [await flight.run("k", work) for _ in range(3)]
    assert results == [(1, False), (2, False), (3, False)]
