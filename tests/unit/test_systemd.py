"""sd_notify: the watchdog pings only while the event loop runs."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from nodekeeper.host.systemd import Notifier


def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return sock


def received(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


async def pings(sock: socket.socket, count: int) -> int:
    """Wait (on the loop) until `count` more watchdog pings have come; how many came."""
    seen = 0
    deadline = time.monotonic() + 30
    while seen < count and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        seen += sum(m == "WATCHDOG=1" for _, m in received(sock))
    return seen


async def test_watchdog_stops_when_the_loop_is_wedged(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sock = notify_socket(tmp_path, monkeypatch)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # 20 ms: pings every 10 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    task = asyncio.create_task(Notifier().watchdog())
    try:
        assert await pings(sock, 3) >= 3
        received(sock)
        # Wedging the loop on purpose, for ten ping intervals: nothing may ping.
        time.sleep(0.1)  # noqa: ASYNC251
        wedged = [m for _, m in received(sock) if m == "WATCHDOG=1"]
        assert await pings(sock, 2) >= 2  # and once the loop runs again, it pings again
    finally:
        task.cancel()
        sock.close()
    assert wedged == []


async def test_no_watchdog_for_another_pid(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sock = notify_socket(tmp_path, monkeypatch)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    await asyncio.wait_for(Notifier().watchdog(), 1)  # returns at once
    assert received(sock) == []
    sock.close()


def test_ready_carries_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = notify_socket(tmp_path, monkeypatch)
    Notifier().ready("Serving")
    [(_, message)] = received(sock)
    assert message.splitlines() == ["READY=1", "STATUS=Serving"]
    sock.close()


def test_a_reader_that_falls_behind_never_blocks_the_sender(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = notify_socket(tmp_path, monkeypatch)  # bound, and never read
    notifier = Notifier()
    sent = threading.Event()

    def many() -> None:
        for n in range(200):
            notifier.status(f"status {n}")
        sent.set()

    sender = threading.Thread(target=many, daemon=True)
    sender.start()
    assert sent.wait(5), "a notification blocked"
    assert received(sock)[0][1] == "STATUS=status 0"
