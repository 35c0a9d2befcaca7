"""The policy in force, and reloading it: on SIGHUP and when the file changes on disk.

A policy that fails to load at start stops the daemon. One that fails on reload is
logged, counted in metrics, and the last good policy stays in force. Every load runs off
the event loop (offloop.py), so serving and the watchdog never wait for one.
"""

from __future__ import annotations

import asyncio
import os
import time

from nodekeeper import logs, metrics
from nodekeeper.errors import SettingsError
from nodekeeper.offloop import Loader
from nodekeeper.pull import policy

WATCH_SECONDS = 2.0

_log = logs.get("policy")


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class PolicyFile:
    def __init__(self, path: str, loader: Loader, current: policy.Policy,
                 signature: tuple[int, int, int] | None) -> None:
        self.path = path
        self._loader = loader
        self._signature = signature
        self.current = current
        self.loaded_at = time.time()
        self.error = ""
        metrics.POLICY_VALID.set(1)
        metrics.POLICY_LOADED.set(self.loaded_at)

    @classmethod
    async def open(cls, path: str, loader: Loader) -> PolicyFile:
        """The policy at start; SettingsError when it is invalid or too slow to load."""
        signature = _signature(path)
        return cls(path, loader, await loader.load(path, lambda: policy.load(path)), signature)

    def get(self) -> policy.Policy:
        return self.current

    async def reload(self, why: str) -> bool:
        self._signature = _signature(self.path)
        try:
            fresh = await self._loader.load(self.path, lambda: policy.load(self.path))
        except SettingsError as exc:
            self.error = str(exc)
            metrics.POLICY_VALID.set(0)
            _log.error("policy reload failed; the previous policy stays in force",
                       error=self.error, trigger=why)
            return False
        self.current, self.error, self.loaded_at = fresh, "", time.time()
        metrics.POLICY_VALID.set(1)
        metrics.POLICY_LOADED.set(self.loaded_at)
        _log.info("policy loaded", path=self.path, rules=len(fresh.rules), trigger=why)
        return True

    async def watch(self) -> None:
        """Reload when the file's modification time, size or inode changes (editors
        replace files by renaming). A local stat every few seconds; no registry traffic."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            if _signature(self.path) != self._signature:
                await self.reload("file changed")
