"""A tmpfs of a test's own, to make a directory read-only, full, or gone, as disks do.

Root ignores file permissions, so a read-only directory has to be a read-only mount.
Everything is mounted under the test's temporary directory and unmounted at close().
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from tests.harness._proc import Service


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {done.stderr.strip()}")


class Tmpfs(Service):
    """A tmpfs at `path` (created), `size` bytes large."""

    def __init__(self, path: Path, size: int = 16 << 20) -> None:
        self.path = path
        self.size = size
        self.mounted = False

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path))
        self.mounted = True

    def read_only(self, timeout: float = 10.0) -> None:
        """Remount read-only. A file open for writing makes that fail (busy), so retry:
        the process under test holds its files only while it writes."""
        self._remount("ro", timeout)

    def writable(self, timeout: float = 10.0) -> None:
        self._remount("rw", timeout)

    def _remount(self, how: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _mount("-o", f"remount,{how}", str(self.path))
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def fill(self) -> Path:
        """Fill the file system to the last byte; returns the filler (delete it to free)."""
        filler = self.path / "filler"
        with filler.open("wb", buffering=0) as handle:
            for chunk in (65536, 1):
                with contextlib.suppress(OSError):
                    while True:
                        handle.write(b"\0" * chunk)
        return filler

    def close(self) -> None:
        if self.mounted:
            # Lazily: a process still holding a file there must not fail the teardown.
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True,
                           timeout=30, check=False)
            self.mounted = False
