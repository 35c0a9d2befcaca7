"""The event loop's lag is measured, kept for `status`, and a stall is logged once."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from nodekeeper.host.looplag import STALL_SECONDS, WINDOW, LagMonitor


async def test_a_blocked_loop_shows_as_lag() -> None:
    monitor = LagMonitor(interval=0.01)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 - the loop cannot run anything meanwhile
    await asyncio.sleep(0.05)
    task.cancel()
    view = monitor.view()
    assert 0.15 < view.worst_s < 0.5
    assert view.last_minute_s == view.worst_s
    assert abs(view.worst_at - time.time()) < 1


async def test_an_idle_loop_shows_little_lag() -> None:
    monitor = LagMonitor(interval=0.01)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.3)
    task.cancel()
    assert monitor.view().worst_s < 0.05


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

