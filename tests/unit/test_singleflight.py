"""SingleFlight: one execution per key, shared by everyone asking while it runs."""

from __future__ import annotations

import asyncio
import gc

import pytest

from nodekeeper.singleflight import SingleFlight


class Work:
    """Counts its runs; each run waits for `release` and returns its run number."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> int:
        self.runs += 1
        run = self.runs
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

    async def cancelled() -> int:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await flight.run("k", cancelled)
    await asyncio.sleep(0)
    assert not flight.busy("k")
