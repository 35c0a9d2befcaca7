"""Images and static pods for the kubelet tests: a pause image built from C here, and
application images around Debian's static busybox whose containers say which build they
run and exit when told to.

An application container appends its build (the image's seed) to ``<out>/starts`` when it
starts, then waits for ``<out>/exit`` to appear, removes it and exits with status 3: a crash
on demand, without signalling anything from outside. ``out`` is a hostPath volume.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.oci import Image, build_image

PAUSE_SOURCE = Path(__file__).resolve().parents[1] / "kubelet" / "pause.c"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static

_APP_SCRIPT = (
    "b=/bin/busybox; "
    'echo "$($b head -n 1 /etc/nodekeeper-test/layer0)" >> /out/starts; '
    'trap "exit 0" TERM; '
    "while [ ! -e /out/exit ]; do $b sleep 0.05; done; "
    "$b rm -f /out/exit; exit 3"
)


def pause_image(workdir: Path) -> Image:
    """A one-layer image whose /pause sleeps until SIGTERM or SIGINT (compiled here)."""
    binary = workdir / "pause"
    done = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
        capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"building the pause binary failed:\n{done.stderr}")
    return build_image({"pause": binary.read_bytes()}, seed="pause", cmd=["/pause"])


def app_image(seed: str) -> Image:
    """A busybox image whose container records ``seed=<seed>`` in ``/out/starts``."""
    return build_image({"bin/busybox": BUSYBOX.read_bytes()}, seed=seed,
                       cmd=["/bin/busybox", "sh", "-c", _APP_SCRIPT])


@dataclass(frozen=True)
class AppPod:
    """One static pod with one application container, and what its container reported."""

    name: str
    image: str
    out_dir: Path
    pull_policy: str = "Always"

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": "default"},
            "spec": {
                "hostNetwork": True,
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "app",
                    "image": self.image,
                    "imagePullPolicy": self.pull_policy,
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                }],
                "volumes": [{"name": "out",
                             "hostPath": {"path": str(self.out_dir), "type": "Directory"}}],
            },
        }

    def builds(self) -> list[str]:
        """The build (image seed) of every container start so far, oldest first."""
        try:
            lines = (self.out_dir / "starts").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.removeprefix("seed=") for line in lines]

    def crash(self) -> float:
        """Tell the running container to exit with an error; returns the time it was told."""
        (self.out_dir / "exit").touch()
        return time.monotonic()

    def wait_starts(self, count: int, timeout: float) -> float | None:
        """Seconds until the container has started ``count`` times, or None after
        ``timeout`` seconds."""
        started = time.monotonic()
        while len(self.builds()) < count:
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.05)
        return time.monotonic() - started
