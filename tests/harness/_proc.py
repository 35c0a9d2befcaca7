"""A child process owned by the harness: started with its output in a log file, stopped by PID.

Every process started here is also remembered in a module-level registry so that an
interpreter exit (for example a test run interrupted with Ctrl-C between a fixture's start
and its teardown) still ends it. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _reap_all() -> None:
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _LIVE.pop(pid, None)


atexit.register(_reap_all)


def log_tail(path: Path, max_bytes: int = 6000) -> str:
    """The last ``max_bytes`` of a log file, decoded leniently ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        # Drop the (probably partial) first line.
        text = text.partition("\n")[2]
    return text


class ManagedProcess:
    """One run of a command, appending stdout and stderr to ``log_path``."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = None if env is None else dict(env)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.argv[0]} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            header = f"\n===== harness: starting {' '.join(self.argv)} =====\n"
            log.write(header.encode())
            log.flush()
            # A new session keeps terminal signals (Ctrl-C) for the test runner to handle;
            # teardown then stops the child itself.
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        _LIVE[self._proc.pid] = self._proc

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; waits for the exit. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                    # A SIGSTOPped child would leave SIGTERM pending forever.
                    proc.send_signal(signal.SIGCONT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=timeout)
        finally:
            _LIVE.pop(proc.pid, None)
        return proc.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the child (only while it runs; never any other process)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL without a graceful phase (a crash), and wait for it."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        finally:
            _LIVE.pop(proc.pid, None)

    def tail(self, max_bytes: int = 6000) -> str:
        return log_tail(self.log_path, max_bytes)


class Service:
    """Something the harness runs: started on entering `with`, closed on leaving it."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_S = TypeVar("_S", bound=Service)
_R = TypeVar("_R")


def wait_for_count(read: Callable[[], list[_R]], count: int, timeout: float) -> list[_R]:
    """Poll `read` until it returns at least `count` items, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)
