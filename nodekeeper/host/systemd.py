"""Talking to systemd: readiness, status, stopping, and the watchdog.

All of it goes through sd_notify (NOTIFY_SOCKET); without systemd these are no-ops.
"""

from __future__ import annotations

import asyncio
import os

import sdnotify


class Notifier:
    """sd_notify messages; silently nothing when NOTIFY_SOCKET is not set."""

    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            # Sent from the event loop: when the reader falls behind (a busy or stuck PID 1;
            # a datagram socket queues only net.unix.max_dgram_qlen messages, 10 by
            # default), a blocking send would stall every RPC with it. A message that does
            # not fit is dropped instead (sdnotify ignores the error): the next STATUS=
            # says the same and more, and the next watchdog ping comes half an interval on.
            self._notifier.socket.setblocking(False)

    def _send(self, message: str) -> None:
        self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def reloaded(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval, for as long as the event loop runs.

        The ping is a task on the same loop that serves the kubelet: a wedged loop stops
        pinging, and systemd restarts us. Returns at once when no watchdog is set.
        """
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return
        interval = int(usec) / 1_000_000 / 2
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)
