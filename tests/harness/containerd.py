"""A real containerd with everything (root, state, sockets, registry hosts dir) under a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.harness import nodebins
from tests.harness._proc import ManagedProcess, Service
from tests.harness.cri import CriClient

# Unix socket paths are limited to 108 bytes; leave room for containerd's ".ttrpc" suffix.
_MAX_SOCKET_PATH = 90

# Plugins that cannot work here (no such filesystem, no collector) and only add start-up
# noise; unknown names are ignored, so one list serves every version.
_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.internal.v1.opt",
    "io.containerd.tracing.processor.v1.otlp",
)

RELEASES_ENV = "NODEKEEPER_CONTAINERD"


@dataclass(frozen=True)
class ContainerdRelease:
    """One containerd version the tests run against, and how to start it.

    ``name`` ("1.6", "2.3") is what ``NODEKEEPER_CONTAINERD`` and the test ids use.
    ``shim_dir`` goes first on PATH: containerd finds containerd-shim-runc-v2 there, and a
    2.x daemon must never start 1.6's shim.
    """

    name: str
    version: str
    config_version: int
    layout_dir: str | None  # under the node binaries; None: Debian's package

    @property
    def shim_dir(self) -> Path:
        if self.layout_dir is None:
            return Path("/usr/bin")
        return nodebins.node_binaries() / self.layout_dir

    @property
    def binary(self) -> Path:
        if self.layout_dir is None:
            return self.shim_dir / "containerd"
        return nodebins.binary(f"{self.layout_dir}/containerd")


DEBIAN_1_6 = ContainerdRelease("1.6", "1.6.20", 2, None)
RELEASES = {
    r.name: r
    for r in (
        DEBIAN_1_6,
        ContainerdRelease("1.7", "1.7.34", 2, "containerd-1.7.34"),
        ContainerdRelease("2.3", "2.3.4", 3, "containerd-2.3.4"),
    )
}


def selected_releases(value: str | None = None) -> list[ContainerdRelease]:
    """The releases named in ``NODEKEEPER_CONTAINERD`` ("1.6,2.3"; unset or empty: all)."""
    return nodebins.selected(RELEASES_ENV, RELEASES, "containerd", value)


class ContainerdError(RuntimeError):
    """containerd did not start (or stop) as expected; the message carries its log tail."""


def _toml_str(value: str | Path) -> str:
    # A JSON string literal is a valid TOML basic string for the paths used here.
    return json.dumps(str(value))


# hosts.toml names the registry once, as ``server``: a ``[host]`` entry for the same URL
# would have containerd (and nodekeeper, which follows it) ask that endpoint twice before
# failing. The empty ``[host]`` table is for 1.6.20, which rejects a file without one
# ("invalid `host` tree") and then ignores the file altogether.


def plain_http_hosts_toml(host: str) -> str:
    """hosts.toml sending pulls for ``host`` ("127.0.0.1:PORT") over plain HTTP only."""
    return f'server = "http://{host}"\n\n[host]\n'


def tls_hosts_toml(host: str, ca_file: str | Path) -> str:
    """hosts.toml for an HTTPS registry at ``host`` whose certificate ``ca_file`` signed."""
    return f'server = "https://{host}"\nca = {_toml_str(ca_file)}\n\n[host]\n'


class Containerd(Service):
    """One containerd daemon private to a test, of the given ``release``.

    ``start()`` returns once the CRI plugin answers ImageFsInfo; ``stop()`` ends the daemon
    by PID (SIGTERM, then SIGKILL); ``restart()`` keeps root, state and socket. The config
    also lets it run containers (runc, cgroupfs, no NRI, CNI dirs of its own): only
    ``hostNetwork`` pods, since there is no pod network.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        release: ContainerdRelease = DEBIAN_1_6,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        log_level: str = "info",
        sandbox_image: str | None = None,
        extra_config: str = "",
    ) -> None:
        self.release = release
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.root = self.base_dir / "root"
        self.state = self.base_dir / "state"
        self.hosts_dir = self.base_dir / "certs.d"
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.sandbox_image = sandbox_image
        self.extra_config = extra_config
        self._short_dir: Path | None = None
        socket = self.base_dir / "containerd.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            self._short_dir = Path(tempfile.mkdtemp(prefix="nk-ctd-", dir="/tmp"))
            socket = self._short_dir / "containerd.sock"
        self.address = str(socket)
        path = os.pathsep.join([str(release.shim_dir), os.environ.get("PATH", os.defpath)])
        self._proc = ManagedProcess(
            [str(release.binary), "--config", str(self.config_path)], self.log_path,
            cwd=self.base_dir, env={**os.environ, "PATH": path},
        )

    # -- configuration -------------------------------------------------------------------

    def render_config(self) -> str:
        disabled = ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS)
        lines = [
            f"version = {self.release.config_version}",
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
        ]
        if self.release.config_version == 2:
            lines += self._cri_v2()
        else:
            lines += self._cri_v3()
        if self.release.name != "1.6":
            # NRI would listen on a fixed socket shared by every instance on the machine.
            lines += ['[plugins."io.containerd.nri.v1.nri"]', "  disable = true", ""]
        text = "\n".join(lines)
        if self.extra_config:
            text += "\n" + self.extra_config.strip() + "\n"
        return text

    def _runc(self, runtime_plugin: str) -> list[str]:
        runc = f"{runtime_plugin}.containerd.runtimes.runc"
        cni = self.base_dir / "cni"
        return [
            f"{runtime_plugin}.containerd]",
            '  default_runtime_name = "runc"',
            *(['  snapshotter = "native"'] if self.release.config_version == 2 else []),
            "",
            f"{runc}]",
            '  runtime_type = "io.containerd.runc.v2"',
            "",
            f"{runc}.options]",
            # PID 1 here is not systemd; runc's state stays inside this instance.
            "  SystemdCgroup = false",
            f"  Root = {_toml_str(self.state / 'runc')}",
            "",
            f"{runtime_plugin}.cni]",
            # 2.x takes a list and warns about the single directory of 1.x.
            (f"  bin_dir = {_toml_str(cni / 'bin')}" if self.release.config_version == 2
             else f"  bin_dirs = [{_toml_str(cni / 'bin')}]"),
            f"  conf_dir = {_toml_str(cni / 'net.d')}",
            "",
        ]

    def _sandbox_line(self, key: str) -> list[str]:
        return [] if self.sandbox_image is None else [f"  {key} = {_toml_str(self.sandbox_image)}"]

    def _cri_v2(self) -> list[str]:
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        return [
            f"{cri}]",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
            "  restrict_oom_score_adj = true",
            *self._sandbox_line("sandbox_image"),
            "",
            *self._runc(cri),
            f"{cri}.registry]",
            f"  config_path = {_toml_str(self.hosts_dir)}",
            "",
        ]

    def _cri_v3(self) -> list[str]:
        images = "[plugins.'io.containerd.cri.v1.images'"
        runtime = "[plugins.'io.containerd.cri.v1.runtime'"
        return [
            "[plugins.'io.containerd.grpc.v1.cri']",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "",
            f"{images}]",
            '  snapshotter = "native"',
            "",
            f"{images}.registry]",
            f"  config_path = {_toml_str(self.hosts_dir)}",
            "",
            *([f"{images}.pinned_images]", *self._sandbox_line("sandbox"), ""]
              if self.sandbox_image is not None else []),
            f"{runtime}]",
            "  restrict_oom_score_adj = true",
            "",
            *self._runc(runtime),
            # The CRI pulls through the transfer service, which unpacks only for the
            # snapshotters listed here (overlayfs by default).
            "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
            '  platform = "linux/amd64"',
            '  snapshotter = "native"',
            "",
        ]

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

