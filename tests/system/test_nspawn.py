"""The .deb under a real systemd: a Debian 12 machine booted with systemd-nspawn, in a
network namespace of its own (loopback only), installs the package and is checked from
inside by machine/runner.sh."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MACHINE_FILES = Path(__file__).resolve().parent / "machine"
# Kept between runs: debootstrap is the slow part, and the root it makes never changes.
CACHE = Path(os.environ.get("NODEKEEPER_SYSTEST_CACHE", "/var/cache/nodekeeper-systest"))
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "systemd,systemd-sysv,dbus,containerd,docker-registry,python3,ca-certificates"
CHECKS = ("install", "monitoring_files", "containerd_active", "nodekeeper_active",
          "ready_status", "pull", "fallback_pull", "journal_fallback", "reload", "reload_applied",
          "upgrade_with_broken_config", "without_containerd", "missing_policy",
          "restart_after_sigkill",
          "remove_keeps_state", "purge_removes_state")

pytestmark = pytest.mark.integration


def run(*command: str, timeout: float = 900) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def debian_root() -> Path:
    root = CACHE / f"bookworm-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:12]}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        run("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
            str(root), MIRROR, timeout=1500)
        (root / ".complete").touch()
    return root


@pytest.fixture(scope="module")
def deb() -> Path:
    run("bash", str(REPO / "packaging" / "build.sh"))
    [package] = (REPO / "dist").glob("nodekeeper_*_amd64.deb")
    return package


def test_the_package_under_a_booted_systemd(debian_root: Path, deb: Path,
                                            tmp_path: Path) -> None:
    machine, out = tmp_path / "machine", tmp_path / "out"
    out.mkdir()
    run("cp", "-a", "--reflink=auto", str(debian_root), str(machine))
    systest = machine / "opt" / "systest"
    systest.mkdir(parents=True)
    shutil.copy(deb, systest / "nodekeeper.deb")
    for name in ("runner.sh", "client.py"):
        shutil.copy(MACHINE_FILES / name, systest / name)
    for name in ("cri.py", "oci.py"):
        shutil.copy(REPO / "tests" / "harness" / name, systest / name)
    units = machine / "etc" / "systemd" / "system"
    shutil.copy(MACHINE_FILES / "systest.service", units / "systest.service")
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants" / "systest.service").symlink_to(
        "/etc/systemd/system/systest.service")
    (machine / "out").mkdir()
    boot = subprocess.run(
        ["systemd-nspawn", "--quiet", f"--directory={machine}", "--private-network",
         "--register=no", "--keep-unit", f"--bind={out}:/out", "--console=pipe", "--boot"],
        capture_output=True, text=True, timeout=600)
    log = (out / "runner.log").read_text() if (out / "runner.log").exists() else ""
    assert (out / "done").exists(), (
        f"the machine did not finish (nspawn exit {boot.returncode}):\n"
        f"{boot.stdout[-3000:]}\n{boot.stderr[-3000:]}\n{log[-4000:]}")
    results = {}
    for line in (out / "results").read_text().splitlines():
        name, verdict, *detail = line.split(" ", 2)
        results[name] = (verdict, " ".join(detail))
    failed = {name: results.get(name, ("missing", "")) for name in CHECKS
              if results.get(name, ("missing",))[0] != "ok"}
    assert failed == {}, f"{failed}\n{log[-6000:]}"
