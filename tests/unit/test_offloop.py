"""Settings loads run on a worker thread with a deadline; the event loop keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nodekeeper.errors import SettingsError
from nodekeeper.offloop import SWITCH_INTERVAL, Loader
from nodekeeper.policyfile import PolicyFile
from nodekeeper.pull import policy
from tests.harness.policies import largest_policy


async def gaps_while(work: asyncio.Future[object] | asyncio.Task[object]) -> tuple[float, float]:
    """(the longest the loop went without running a 1 ms timer while `work` ran, how long
    `work` ran)."""
    worst = 0.0
    began = last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    return worst, last - began


async def test_the_result_comes_back_from_another_thread() -> None:
    loader = Loader()
    assert await loader.load("x", threading.get_ident) != threading.get_ident()


async def test_errors_come_back_as_they_were_raised() -> None:
    def fail() -> None:
        raise SettingsError("p.yaml:3: bad")

    with pytest.raises(SettingsError, match=r"p\.yaml:3: bad"):
        await Loader().load("p.yaml", fail)


async def test_a_load_past_its_deadline_is_refused_and_blocks_the_next_until_done() -> None:
    release = threading.Event()
    loader = Loader(deadline=0.05)
    started = time.monotonic()
    with pytest.raises(SettingsError, match=r"p\.yaml: loading took longer than 0\.05s"):
        await loader.load("p.yaml", lambda: release.wait(60))
    assert time.monotonic() - started < 30  # the deadline, not the load's minute
    with pytest.raises(SettingsError, match=r"earlier load .* is still running"):
        await loader.load("p.yaml", lambda: "again")
    release.set()
    for _ in range(3000):  # until the overrunning load has ended: at most 30 s
        with contextlib.suppress(SettingsError):
            assert await loader.load("p.yaml", lambda: "again") == "again"
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("refused still after the earlier load ended")


async def test_loads_run_one_at_a_time() -> None:
    loader = Loader()
    inside = 0
    most = 0

    def work() -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        time.sleep(0.01)
        inside -= 1

    await asyncio.gather(*(loader.load("x", work) for _ in range(4)))
    assert most == 1


async def test_the_loop_keeps_running_while_the_largest_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(largest_policy())
    loader = Loader()
    task = asyncio.ensure_future(loader.load(str(path), lambda: policy.load(path)))
    worst, lasted = await gaps_while(task)
    assert len((await task).rules) > 100
    # Held by the load, the loop would stop for all of it; a busy machine lengthens the
    # gaps and the load alike. (The gap in milliseconds: bench/responsiveness.py.)
    assert worst < lasted / 5, (worst, lasted)


async def test_policy_file_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - match: a/b\n")
    loader = Loader()
    current = await PolicyFile.open(str(path), loader)
    assert len(current.get().rules) == 1
    path.write_text("rules:\n  - match: a/b\n    tags: ['(a)\\1']\n")
    with capture_logs() as logs:
        assert not await current.reload("SIGHUP")
    assert len(current.get().rules) == 1
    assert "rules[0].tags[0]" in current.error
    assert logs[0]["log_level"] == "error"
    path.write_text("rules:\n  - match: a/b\n  - match: c/d\n")
    assert await current.reload("SIGHUP")
    assert len(current.get().rules) == 2
    assert current.error == ""


async def test_an_invalid_policy_at_start_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("a: &x 1\nb: *x\n")
    with pytest.raises(SettingsError, match="anchors and aliases"):
        await PolicyFile.open(str(path), Loader())


async def test_policy_loads_at_start_and_on_reload_run_off_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules: []\n")
    threads = []
    real = policy.load

    def load(where: str) -> policy.Policy:
        threads.append(threading.get_ident())
        return real(where)

    monkeypatch.setattr(policy, "load", load)
    current = await PolicyFile.open(str(path), Loader())
    await current.reload("SIGHUP")
    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def test_a_load_yields_the_interpreter_often_and_collects_nothing() -> None:
    before = sys.getswitchinterval()
    assert await Loader().load("x", sys.getswitchinterval) == SWITCH_INTERVAL < before
    assert await Loader().load("x", gc.isenabled) is False
    assert await Loader().load(
        "x", lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) == 19
    assert sys.getswitchinterval() == before
    assert gc.isenabled()


async def test_every_load_runs_on_the_same_thread() -> None:
    # So that the memory one large load leaves free is what the next one reuses.
    loader = Loader()
    threads = {await loader.load("x", threading.get_ident) for _ in range(3)}
    assert len(threads) == 1


async def test_close_ends_the_worker_and_refuses_later_loads() -> None:
    loader = Loader()
    worker = await loader.load("x", threading.current_thread)
    assert worker.is_alive()
    loader.close()
    assert not worker.is_alive()
    with pytest.raises(SettingsError, match="x: not loaded, nodekeeper is stopping"):
        await loader.load("x", threading.current_thread)
    Loader().close()  # never started: nothing to end
