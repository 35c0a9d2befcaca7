"""The Kubernetes node binaries no Debian package ships (kube-apiserver, kubelet, newer
containerd), found in a directory named by an environment variable.

The directory holds either the binaries themselves in the release layout
(``kube-apiserver-1.36.2/kube-apiserver``, ...) or the archive
``node-binaries-<arch>.tar.xz``, together with a ``SHA256SUMS`` listing every file. An
archive is extracted once into a cache directory outside the checkout, keyed by the
content of ``SHA256SUMS``, and every file is checked against it before the cache is used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

ENV = "NODEKEEPER_NODE_BINARIES"
CACHE_ENV = "NODEKEEPER_NODE_BINARIES_CACHE"
_REPO = Path(__file__).resolve().parents[2]
_DEFAULT_DIR = _REPO.parent / "shared" / "node-binaries"
_DEFAULT_CACHE = Path("/var/cache/nodekeeper-node-binaries")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

_ready: dict[Path, Path] = {}


class NodeBinariesError(RuntimeError):
    """The binaries are missing, or do not match their SHA256SUMS."""


def source_dir() -> Path:
    return Path(os.environ.get(ENV) or _DEFAULT_DIR).resolve()


def _sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, _, name = line.strip().partition("  ")
            sums[name.lstrip("*")] = digest
    return sums


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        path = root / name
        if not path.is_file():
            raise NodeBinariesError(f"{path}: missing (listed in SHA256SUMS)")
        if _sha256(path) != digest:
            raise NodeBinariesError(f"{path}: SHA256 does not match SHA256SUMS")


def _extracted(source: Path, sums_path: Path) -> Path:
    """The archive's content in the cache, extracting and verifying it the first time."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    archive = source / f"node-binaries-{arch}.tar.xz"
    if not archive.is_file():
        raise NodeBinariesError(
            f"{source}: neither the binaries nor {archive.name}; set {ENV} to a directory "
            "holding them and their SHA256SUMS")
    key = hashlib.sha256(sums_path.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE)
    target = cache / f"{arch}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    # Test runs in parallel (several checkouts on one machine) extract only once.
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
        scratch.chmod(0o755)
        try:
            done = subprocess.run(["tar", "-xJf", str(archive), "-C", str(scratch)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise NodeBinariesError(f"extracting {archive} failed: {done.stderr.strip()}")
            _verify(scratch, _sums(sums_path))
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def node_binary(relative_path: str) -> Path:
    """The verified file at ``relative_path`` (e.g. ``kube-apiserver-1.36.2/kube-apiserver``)."""
    source = source_dir()
    sums_path = source / "SHA256SUMS"
    if not sums_path.is_file():
        raise NodeBinariesError(f"{sums_path}: missing; set {ENV} to the node binaries")
    sums = _sums(sums_path)
    if relative_path not in sums:
        raise NodeBinariesError(f"{relative_path} is not listed in {sums_path}")
    if source not in _ready:
        if all((source / name).is_file() for name in sums):
            _verify(source, sums)
            _ready[source] = source
        else:
            _ready[source] = _extracted(source, sums_path)
    return _ready[source] / relative_path
