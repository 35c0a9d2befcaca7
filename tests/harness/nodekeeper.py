"""nodekeeper run as a real subprocess, with a notify socket standing in for systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_POLICY = "defaults:\n  update: always\n"


def scrape(address: str) -> dict[str, float]:
    """One scrape of nodekeeper's /metrics: every sample by its name and labels."""
    found = {}
    for line in httpx.get(f"http://{address}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


class NotifySocket:
    """A datagram socket playing systemd's NOTIFY_SOCKET; collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, prefix: str, timeout: float) -> float:
        """Block until a message containing a line starting with `prefix`; return its time."""
        deadline = time.monotonic() + timeout
        for stamp, message in self.messages:
            if any(line.startswith(prefix) for line in message.splitlines()):
                return stamp
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                break
            stamp = time.monotonic()
            message = data.decode()
            self.messages.append((stamp, message))
            if any(line.startswith(prefix) for line in message.splitlines()):
                return stamp
        raise TimeoutError(f"no {prefix!r} notification within {timeout}s; got {self.messages}")

    def drain(self) -> list[str]:
        """Every message so far, including those read before the socket was closed."""
        if self._sock.fileno() == -1:
            return [message for _, message in self.messages]
        self._sock.setblocking(False)
        try:
            while True:
                self.messages.append((time.monotonic(), self._sock.recv(65536).decode()))
        except BlockingIOError:
            pass
        finally:
            self._sock.setblocking(True)
        return [message for _, message in self.messages]

    def close(self) -> None:
        self._sock.close()


class Nodekeeper:
    """`python -m nodekeeper serve` with its own config, socket, state and log file."""

    def __init__(self, workdir: Path, containerd_address: str,
                 settings: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, policy: str = DEFAULT_POLICY) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "cri.sock")
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "nodekeeper.log"
        config: dict[str, Any] = {
            "listen": self.socket,
            "containerd": {"address": containerd_address},
            "state_dir": str(workdir / "state"),
            "policy_file": str(workdir / "policy.yaml"),
            "log": {"level": "debug", "format": "json"},
            "shutdown_grace": "5s",
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.socket = str(config["listen"])
        self.config_path.write_text(yaml.safe_dump(config))
        self.policy_path = Path(config["policy_file"])
        self.policy_path.write_text(policy)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.started_at = 0.0

    def start(self, wait_ready: bool = True, timeout: float = 15.0) -> None:
        notify_path = self.workdir / "notify.sock"
        if notify_path.exists():
            notify_path.unlink()
        self.notify = NotifySocket(notify_path)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **self.env}
        env.pop("JOURNAL_STREAM", None)
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodekeeper", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, env=env,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> float:
        """Seconds from process start to READY=1."""
        assert self.notify is not None
        assert self.proc is not None
        try:
            ready = self.notify.wait_for("READY=1", timeout)
        except TimeoutError:
            raise RuntimeError(
                f"nodekeeper did not become ready (exit code {self.proc.poll()}); "
                f"log:\n{self.log_text()[-4000:]}"
            ) from None
        return ready - self.started_at

    def signal(self, number: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(number)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it will not go; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if self.notify is not None:
            self.notify.drain()
            self.notify.close()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
