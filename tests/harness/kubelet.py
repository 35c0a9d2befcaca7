"""A real kubelet without an API server: static pods from a directory, hostNetwork only.

Only one kubelet can run on a machine at a time (its device-plugin socket is a fixed path),
so ``start()`` takes a machine-wide lock, waiting a bounded time for another test run's
kubelet to finish, and ``close()`` gives it back. A stopped kubelet leaves its pods running
and its root dir bind-mounted onto itself: ``close()`` removes the pods through CRI and
unmounts before deleting anything.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from tests.harness import nodebins
from tests.harness._proc import ManagedProcess, Service
from tests.harness.cri_runtime import RuntimeClient

KUBELETS_ENV = "NODEKEEPER_KUBELET"
LOCK_PATH = Path("/run/lock/nodekeeper-test-kubelet.lock")
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class KubeletError(RuntimeError):
    """The kubelet did not start, or another one held the machine for too long."""


@dataclass(frozen=True)
class KubeletRelease:
    """One kubelet version the tier runs: ``name`` ("1.32", "1.36") is what
    ``NODEKEEPER_KUBELET`` and the test ids use."""

    name: str

    @property
    def binary(self) -> Path:
        return nodebins.binary(nodebins.KUBELETS[self.name])

    def config(self) -> dict[str, Any]:
        """What this version needs in its KubeletConfiguration beyond the common part."""
        if self.name == "1.32":
            return {}
        # Since 1.35 it refuses to start on a cgroup v1 host unless told otherwise.
        return {"failCgroupV1": False}


KUBELET_RELEASES = {name: KubeletRelease(name) for name in nodebins.KUBELETS}


def selected_kubelets(value: str | None = None) -> list[KubeletRelease]:
    """The kubelets named in ``NODEKEEPER_KUBELET`` ("1.32,1.36"; unset or empty: all)."""
    return nodebins.selected(KUBELETS_ENV, KUBELET_RELEASES, "kubelet", value)


_LIVE: set[Kubelet] = set()


@atexit.register
def _close_all() -> None:
    # An interrupted run still removes its pods: their shims would outlive containerd.
    # Registered after the process reaper's own handler, so it runs before containerd ends.
    for kubelet in list(_LIVE):
        with contextlib.suppress(Exception):
            kubelet.close()


def _unix(path: str) -> str:
    return path if path.startswith("unix://") else f"unix://{path}"


def _mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # The mount point is the fifth field; spaces and the like are octal escapes.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            path = Path(point)
            if path == root or root in path.parents:
                found.append(path)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_pod_cgroups(uids: set[str]) -> None:
    """Remove the (now empty) cgroups the kubelet made for these pods, in every hierarchy:
    ``kubepods[/<qos>]/pod<uid>`` under the cgroupfs driver."""
    for uid in uids:
        for path in CGROUP_ROOT.glob(f"*/kubepods/**/pod{uid}"):
            for leaf in sorted((p for p in path.rglob("*") if p.is_dir()),
                               key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    leaf.rmdir()
            with contextlib.suppress(OSError):
                path.rmdir()  # a cgroup still in use stays: nothing is forced


def docker_config(auths: dict[str, tuple[str, str]]) -> str:
    """A config.json giving the kubelet node-wide credentials per registry host."""
    encoded = {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
               for host, (user, password) in auths.items()}
    return json.dumps({"auths": encoded})


class Kubelet(Service):
    """A kubelet of ``release`` with its config, root dir, static pod dir, pod logs and log
    file under ``base_dir``. ``image_endpoint`` is nodekeeper's socket, or containerd's to
    compare."""

    def __init__(
        self,
        base_dir: Path,
        *,
        runtime_endpoint: str,
        image_endpoint: str,
        release: KubeletRelease = KUBELET_RELEASES["1.32"],
        node_name: str = "nodekeeper-test",
        verbosity: int = 4,
        credentials: dict[str, tuple[str, str]] | None = None,
        feature_gates: dict[str, bool] | None = None,
        start_timeout: float = 60.0,
        lock_timeout: float = 900.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.root_dir = self.base_dir / "root"
        self.manifests = self.base_dir / "manifests"
        self.pod_logs = self.base_dir / "pod-logs"
        self.config_path = self.base_dir / "kubelet.yaml"
        self.log_path = self.base_dir / "kubelet.log"
        self.runtime_endpoint = runtime_endpoint.removeprefix("unix://")
        self.image_endpoint = image_endpoint.removeprefix("unix://")
        self.release = release
        self.node_name = node_name
        self.credentials = credentials
        self.feature_gates = feature_gates or {}
        self.start_timeout = start_timeout
        self.lock_timeout = lock_timeout
        self.stop_timeout = stop_timeout
        self._lock: IO[bytes] | None = None
        self._closed = False
        self._proc = ManagedProcess(
            [str(release.binary), "--config", str(self.config_path),
             "--root-dir", str(self.root_dir), "--hostname-override", node_name,
             f"--v={verbosity}"],
            self.log_path, cwd=self.base_dir)

    def render_config(self) -> dict[str, Any]:
        zero = "0%"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "containerRuntimeEndpoint": _unix(self.runtime_endpoint),
            "imageServiceEndpoint": _unix(self.image_endpoint),
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "enableServer": False,
            # No API server to ask (1.36 refuses to start with webhook authentication and
            # no client); nothing is served anyway.
            "authentication": {"webhook": {"enabled": False}, "anonymous": {"enabled": True}},
            "authorization": {"mode": "AlwaysAllow"},
            "readOnlyPort": 0,
            "healthzPort": 0,
            "resolvConf": "",
            "podLogsDir": str(self.pod_logs),
            # The machine's disk and memory are shared: never evict or collect images.
            "evictionHard": {"memory.available": zero, "nodefs.available": zero,
                             "nodefs.inodesFree": zero, "imagefs.available": zero},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False,
            **self.release.config(),
            **({"featureGates": self.feature_gates} if self.feature_gates else {}),
        }

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc.running

    def _acquire(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_PATH.open("ab")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise KubeletError(
                        f"another kubelet held {LOCK_PATH} for {self.lock_timeout:.0f}s"
                        " (one kubelet per machine: its device-plugin socket is a fixed path)"
                    ) from None
                time.sleep(0.5)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    def start(self) -> None:
        if self._closed:
            raise KubeletError("this kubelet was closed; make a new one")
        if self._lock is None:
            self._acquire()
        _LIVE.add(self)
        for d in (self.root_dir, self.manifests, self.pod_logs):
            d.mkdir(parents=True, exist_ok=True)
        # The kubelet makes its root dir a shared mount of itself when it is not one yet,
        # and 1.36 does so while it creates its pod-resources socket, whose rename then
        # fails now and then ("invalid cross-device link"). Made here, it is found done;
        # close() unmounts it with the rest.
        if self.root_dir not in _mounts_under(self.root_dir):
            for how in ("--bind", "--make-rshared"):
                subprocess.run(["mount", how, *([str(self.root_dir)] * (how == "--bind")),
                                str(self.root_dir)], check=True, capture_output=True)
        if self.credentials is not None:
            (self.root_dir / "config.json").write_text(docker_config(self.credentials))
        self.config_path.write_text(yaml.safe_dump(self.render_config()))
        self._proc.start()
        try:
            self.wait_for_log(re.compile("Started kubelet"), since=0,
                              timeout=self.start_timeout)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """The kubelet's process frozen (SIGSTOP) for the block and thawed (SIGCONT) after
        it: whatever changes meanwhile, it sees all at once, in its next relist."""
        pid = self._proc.pid
        if pid is None or not self.running:
            raise KubeletError("the kubelet is not running")
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the process only: its pods keep running (as a real kubelet's do)."""
        self._proc.stop(self.stop_timeout)

    def close(self) -> None:
        """Stop, remove every pod of the runtime through CRI, unmount, delete the root dir,
        and let the next kubelet have the machine. Safe to call twice: the second call does
        nothing (another kubelet may be using the runtime by then)."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        try:
            self._proc.stop(self.stop_timeout)
            self.remove_pods()
            for point in _mounts_under(self.root_dir):
                done = subprocess.run(["umount", str(point)], capture_output=True, check=False)
                if done.returncode != 0:
                    subprocess.run(["umount", "--lazy", str(point)], check=True,
                                   capture_output=True)
            shutil.rmtree(self.root_dir, ignore_errors=True)
            # Ours, and left behind by the kubelet: the next one creates its own.
            DEVICE_PLUGIN_SOCKET.unlink(missing_ok=True)
        finally:
            self._release()

    def remove_pods(self) -> None:
        """Stop and remove every pod sandbox of the runtime (a test's own containerd), then
        the pods' cgroups, which the stopped kubelet would have removed."""
        if not Path(self.runtime_endpoint).exists():
            return
        with RuntimeClient(self.runtime_endpoint, timeout=60) as runtime:
            sandboxes = runtime.sandboxes()
            for sandbox in sandboxes:
                runtime.remove_sandbox(sandbox.id)
        _remove_pod_cgroups({s.uid for s in sandboxes if s.uid})

    # -- static pods ---------------------------------------------------------------------

    def add_pod(self, manifest: dict[str, Any]) -> str:
        """Write a static pod manifest; returns the pod's name as the kubelet runs it."""
        name = str(manifest["metadata"]["name"])
        scratch = self.manifests / f".{name}.tmp"
        scratch.write_text(json.dumps(manifest, indent=1))
        # Renamed into place, so the kubelet never reads half a file.
        scratch.rename(self.manifests / f"{name}.json")
        return f"{name}-{self.node_name}"

    def remove_pod(self, name: str) -> None:
        (self.manifests / f"{name}.json").unlink(missing_ok=True)

    # -- its log -------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, pattern: re.Pattern[str], since: int = 0) -> Iterator[str]:
        for line in self.log_text(since).splitlines():
            if pattern.search(line):
                yield line

    def wait_for_log(self, pattern: re.Pattern[str], *, since: int, timeout: float) -> str:
        """The first line matching ``pattern`` written after offset ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            line = next(self.log_lines(pattern, since), None)
            if line is not None:
                return line
            if not self._proc.running:
                raise KubeletError(f"kubelet exited (status {self._proc.returncode});"
                                   f" log tail:\n{self._proc.tail()}")
            if time.monotonic() > deadline:
                raise KubeletError(f"no {pattern.pattern!r} in the kubelet log within"
                                   f" {timeout:.0f}s; log tail:\n{self._proc.tail()}")
            time.sleep(0.1)
