"""The daemon in-process: every part it starts is stopped again, on a signal and when
starting fails part-way, newest first (no containerd: it starts without one)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodekeeper import config as configuration
from nodekeeper.daemon import Daemon
from nodekeeper.errors import StartupError
from nodekeeper.host import runstatus
from nodekeeper.state.memory import DB_NAME


def settings(tmp_path: Path, **changes: object) -> configuration.Config:
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    return configuration.Config(
        listen=str(tmp_path / "run" / "cri.sock"),
        containerd=configuration.ContainerdConfig(address=str(tmp_path / "containerd.sock"),
                                                  hosts_dir=(str(tmp_path / "certs.d"),)),
        state_dir=str(tmp_path / "state"), policy_file=str(tmp_path / "policy.yaml"),
        kubernetes=configuration.KubernetesConfig(events=False), **changes)  # type: ignore[arg-type]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port someone else is listening on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def present(path: str) -> bool:
    return os.path.lexists(path)


def new_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def handlers_left(loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
    # remove_signal_handler answers whether there was one to remove.
    return [number for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            if loop.remove_signal_handler(number)]


async def test_metrics_failing_to_bind_stops_everything_started_before(
        tmp_path: Path, held_port: int) -> None:
    config = settings(tmp_path, metrics_address=f"127.0.0.1:{held_port}")
    threads = set(threading.enumerate())
    with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{held_port}"):
        await Daemon(config, configuration.Overrides()).run()
    # State, the gRPC server and its socket had started: all are gone again.
    assert (tmp_path / "state" / DB_NAME).is_file()
    assert not present(config.listen)
    assert not runstatus.path_for(config.listen).exists()
    assert new_threads(threads) == []  # state's writer among them
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert handlers_left(asyncio.get_running_loop()) == []


async def test_a_live_socket_refuses_the_start_and_is_left_to_its_owner(
        tmp_path: Path) -> None:
    config = settings(tmp_path)
    (tmp_path / "run").mkdir()
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind(config.listen)
    owner.listen()
    threads = set(threading.enumerate())
    try:
        with pytest.raises(StartupError, match="another process already answers"):
            await Daemon(config, configuration.Overrides()).run()
        assert present(config.listen)  # not ours to remove
    finally:
        owner.close()
    assert (tmp_path / "state" / DB_NAME).is_file()
    assert new_threads(threads) == []
    assert handlers_left(asyncio.get_running_loop()) == []


async def test_sigterm_stops_every_part(tmp_path: Path) -> None:
    config = settings(tmp_path)
    status_file = runstatus.path_for(config.listen)
    threads = set(threading.enumerate())
    daemon = asyncio.create_task(Daemon(config, configuration.Overrides()).run())
    # The status file is written once the daemon serves, its signal handlers in place.
    while not status_file.exists():
        assert not daemon.done(), daemon
        await asyncio.sleep(0.02)
    running = runstatus.read(status_file)
    assert running is not None
    assert running.pid == os.getpid()
    assert present(config.listen)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await daemon == 0
    assert not present(config.listen)
    assert not status_file.exists()
    assert new_threads(threads) == []
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert handlers_left(asyncio.get_running_loop()) == []
