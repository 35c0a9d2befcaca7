"""A real containerd with everything (root, state, sockets, registry hosts dir) under a temp dir."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from tests.harness._proc import ManagedProcess, Service
from tests.harness.cri import CriClient

CONTAINERD_BIN = "/usr/bin/containerd"

# Unix socket paths are limited to 108 bytes; leave room for containerd's ".ttrpc" suffix.
_MAX_SOCKET_PATH = 90

_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.internal.v1.opt",
    "io.containerd.tracing.processor.v1.otlp",
)


class ContainerdError(RuntimeError):
    """containerd did not start (or stop) as expected; the message carries its log tail."""


def _toml_str(value: str | Path) -> str:
    # A JSON string literal is a valid TOML basic string for the paths used here.
    return json.dumps(str(value))


def plain_http_hosts_toml(host: str) -> str:
    """hosts.toml sending pulls for ``host`` ("127.0.0.1:PORT") over plain HTTP only."""
    return (
        f'server = "http://{host}"\n\n'
        f'[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def tls_hosts_toml(host: str, ca_file: str | Path) -> str:
    """hosts.toml for an HTTPS registry at ``host`` whose certificate ``ca_file`` signed."""
    return (
        f'server = "https://{host}"\n\n'
        f'[host."https://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f"  ca = {_toml_str(ca_file)}\n"
    )


class Containerd(Service):
    """One containerd daemon private to a test.

    ``start()`` returns once the CRI plugin answers ImageFsInfo; ``stop()`` ends the daemon
    by PID (SIGTERM, then SIGKILL); ``restart()`` keeps root, state and socket.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        binary: str = CONTAINERD_BIN,
        log_level: str = "info",
        extra_config: str = "",
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.hosts_dir = self.base_dir / "certs.d"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = binary
        self.log_level = log_level
        self.extra_config = extra_config
        self._short_dir: Path | None = None
        socket = self.base_dir / "containerd.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            self._short_dir = Path(tempfile.mkdtemp(prefix="nk-ctd-", dir="/tmp"))
            socket = self._short_dir / "containerd.sock"
        self.address = str(socket)
        self._proc = ManagedProcess(
            [self.binary, "--config", str(self.config_path)], self.log_path, cwd=self.base_dir
        )

    # -- configuration -------------------------------------------------------------------

    def render_config(self) -> str:
        cni_dir = self.base_dir / "cni"
        disabled = ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS)
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        lines = [
            "version = 2",
            f"root = {_toml_str(self.root)}",
            f"state = {_toml_str(self.state)}",
            f"disabled_plugins = [{disabled}]",
            "",
            "[grpc]",
            f"  address = {_toml_str(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {_toml_str(self.address + '.ttrpc')}",
            "",
            "[debug]",
            '  address = ""',
            f"  level = {_toml_str(self.log_level)}",
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.gc.v1.scheduler"]',
            '  startup_delay = "0s"',
            "",
            cri,
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "",
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            '  snapshotter = "native"',
            "",
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f"  bin_dir = {_toml_str(cni_dir / 'bin')}",
            f"  conf_dir = {_toml_str(cni_dir / 'net.d')}",
            "",
            '[plugins."io.containerd.grpc.v1.cri".registry]',
            f"  config_path = {_toml_str(self.hosts_dir)}",
            "",
        ]
        text = "\n".join(lines)
        if self.extra_config:
            text += "\n" + self.extra_config.strip() + "\n"
        return text

    def write_hosts_toml(self, host: str, text: str) -> Path:
        """Write ``<hosts_dir>/<host>/hosts.toml`` (host as in an image name, "127.0.0.1:PORT").

        containerd reads it at every pull, so no restart is needed.
        """
        path = self.hosts_dir / host / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def remove_hosts_toml(self, host: str) -> None:
        shutil.rmtree(self.hosts_dir / host, ignore_errors=True)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        for d in (self.root, self.state, self.hosts_dir, Path(self.address).parent):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())
        # A socket file left by a killed daemon would make the readiness probe lie.
        Path(self.address).unlink(missing_ok=True)
        self._proc.start()
        try:
            self._wait_ready()
        except BaseException:
            self._proc.stop(self.stop_timeout)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "socket not created"
        with CriClient(self.address) as client:
            while True:
                code = self._proc.returncode
                if code is not None:
                    raise ContainerdError(
                        f"containerd exited with status {code} during start;"
                        f" log tail:\n{self._proc.tail()}"
                    )
                if Path(self.address).exists():
                    try:
                        client.fsinfo(timeout=1.0)
                        return
                    except grpc.RpcError as e:
                        last_error = f"ImageFsInfo: {e.code()} {e.details()}"
                if time.monotonic() > deadline:
                    raise ContainerdError(
                        f"containerd not ready after {self.start_timeout}s ({last_error});"
                        f" log tail:\n{self._proc.tail()}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout``; returns once the process is gone."""
        self._proc.stop(self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL (a crash, no graceful shutdown)."""
        self._proc.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, and remove the short socket dir if one was needed. Safe to call twice."""
        try:
            self.stop()
        finally:
            if self._short_dir is not None:
                shutil.rmtree(self._short_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 6000) -> str:
        return self._proc.tail(max_bytes)

    def cri(self) -> CriClient:
        """A new CRI client on this daemon's socket (close it, or use ``with``)."""
        return CriClient(self.address)

