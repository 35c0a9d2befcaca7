"""The event loop's lag is measured, kept for `status`, and a stall is logged once."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from nodekeeper.host.looplag import STALL_SECONDS, WINDOW, LagMonitor


async def test_a_blocked_loop_shows_as_lag() -> None:
    interval = 0.01
    monitor = LagMonitor(interval=interval)
    before, began = time.time(), time.monotonic()
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0)  # the monitor's first wait has begun
    blocked_from = time.monotonic()
    time.sleep(0.05)  # noqa: ASYNC251 - the loop cannot run anything meanwhile
    blocked = time.monotonic() - blocked_from
    await asyncio.sleep(interval * 2)  # the monitor's wake-up was due first: it has sampled
    task.cancel()
    lasted, after = time.monotonic() - began, time.time()
    view = monitor.view()
    assert blocked - interval <= view.worst_s <= lasted
    assert view.last_minute_s == view.worst_s
    assert before <= view.worst_at <= after


async def test_an_idle_loop_shows_no_more_lag_than_it_has() -> None:
    """Against a timer of the test's own, measured the same way at the same time: the
    monitor reports lateness, not its interval, so a busy machine moves both alike."""
    interval = 0.02
    monitor = LagMonitor(interval=interval)
    task = asyncio.create_task(monitor.run())
    loop = asyncio.get_running_loop()
    reference = 0.0
    for _ in range(4):
        asked = loop.time()
        await asyncio.sleep(interval)
        reference = max(reference, loop.time() - asked - interval)
    task.cancel()
    assert monitor.view().worst_s < reference + interval / 2


def test_the_last_minute_forgets_and_the_worst_does_not() -> None:
    monitor = LagMonitor()
    monitor.sample(0.2, now=1000.0)
    monitor.sample(0.001, now=1000.0 + WINDOW + 1)
    view = monitor.view()
    assert view.worst_s == 0.2
    assert view.last_minute_s == 0.001


def test_a_stall_is_logged_once_a_minute() -> None:
    monitor = LagMonitor()
    with capture_logs() as logs:
        monitor.sample(STALL_SECONDS, now=100.0)
        monitor.sample(STALL_SECONDS * 4, now=110.0)
        monitor.sample(STALL_SECONDS - 0.01, now=200.0)
        monitor.sample(STALL_SECONDS * 2, now=200.0)
    assert [e["stall_s"] for e in logs] == [STALL_SECONDS, STALL_SECONDS * 2]
    assert all(e["log_level"] == "warning" for e in logs)

