"""The node binaries no Debian package ships (containerd 1.7 and 2.3, kubelets 1.32 and 1.36),
found through ``NODEKEEPER_NODE_BINARIES`` and unpacked once into a cache outside the checkout.

The directory named by the variable (default: ``../shared/node-binaries`` from the repository
root) holds either ``node-binaries-<arch>.tar.xz`` with a ``SHA256SUMS`` beside it, or the
unpacked layout itself (``containerd-2.3.4/containerd``, ``kubelet-1.32.10/kubelet``,
``kubelet-1.36.2/kubelet``, ...): upstream release binaries laid out so work as well. An
archive is unpacked into ``<cache>/node-binaries/<sha256 of the archive>``; the unpacked
files are checked against SHA256SUMS before the directory gets its final name, so a
directory under that name is always complete and verified, and two test runs unpacking at
once both end up using one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

NODE_BINARIES_ENV = "NODEKEEPER_NODE_BINARIES"
CACHE_ENV = "NODEKEEPER_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/nodekeeper-test")
ARCHIVE_NAME = "node-binaries-amd64.tar.xz"
SUMS_NAME = "SHA256SUMS"
# The kubelets in the layout, by the name NODEKEEPER_KUBELET and the test ids use.
_T = TypeVar("_T")

KUBELETS = {
    "1.32": "kubelet-1.32.10/kubelet",
    "1.36": "kubelet-1.36.2/kubelet",
}

_REPO_ROOT = Path(__file__).resolve().parents[2]
_WHERE_FROM = (
    "containerd 1.7/2.3 and the kubelets 1.32/1.36 come from the upstream release archives of"
    " containerd and Kubernetes"
)


class NodeBinariesError(RuntimeError):
    """The node binaries are missing, incomplete or do not match SHA256SUMS."""


def source_dir() -> Path:
    """Where the binaries come from: ``$NODEKEEPER_NODE_BINARIES`` or the default."""
    named = os.environ.get(NODE_BINARIES_ENV)
    if named:
        return Path(named).expanduser().resolve()
    return (_REPO_ROOT.parent / "shared" / "node-binaries").resolve()


def cache_root() -> Path:
    named = os.environ.get(CACHE_ENV)
    return Path(named).expanduser().resolve() if named else DEFAULT_CACHE


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parse_sums(text: str) -> dict[str, str]:
    """``sha256sum`` output as {relative path: hex digest}; malformed lines are an error."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.removeprefix("*").removeprefix("./")
        if (not sep or len(digest) != 64 or not name or name.startswith("/")
                or ".." in Path(name).parts):
            raise NodeBinariesError(f"{SUMS_NAME} line {number} is not '<sha256>  <path>'")
        sums[name] = digest.lower()
    if not sums:
        raise NodeBinariesError(f"{SUMS_NAME} lists no files")
    return sums


def verify(directory: Path, sums: dict[str, str]) -> None:
    """Every file SHA256SUMS names exists under ``directory`` with that digest."""
    for name, want in sums.items():
        path = directory / name
        if not path.is_file():
            raise NodeBinariesError(f"{path} is missing (listed in {SUMS_NAME})")
        got = _file_sha256(path)
        if got != want:
            raise NodeBinariesError(f"{path}: sha256 {got}, {SUMS_NAME} says {want}")


def _missing(source: Path) -> NodeBinariesError:
    return NodeBinariesError(
        f"no node binaries at {source}; set"
        f" {NODE_BINARIES_ENV} to a directory holding them. The integration tier on"
        f" containerd 1.7 and 2.3 and the kubelet tier need them; {_WHERE_FROM}."
    )


def _unpack(archive: Path, sums_text: str, final: Path) -> None:
    sums = parse_sums(sums_text)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(scratch, filter="data")
        verify(scratch, sums)
        (scratch / SUMS_NAME).write_text(sums_text)
        try:
            scratch.rename(final)
        except OSError:
            # Another run finished first: its directory is just as complete and verified.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def node_binaries() -> Path:
    """The directory with the unpacked, verified binaries (unpacking on first use)."""
    source = source_dir()
    archive = source / ARCHIVE_NAME
    sums_path = source / SUMS_NAME
    if archive.is_file():
        if not sums_path.is_file():
            raise NodeBinariesError(f"{archive} has no {SUMS_NAME} beside it")
        sums_text = sums_path.read_text()
        final = cache_root() / "node-binaries" / _file_sha256(archive)
        if final.is_dir():
            # Verified when it was unpacked; a changed SHA256SUMS means a different set.
            with contextlib.suppress(FileNotFoundError):
                if (final / SUMS_NAME).read_text() == sums_text:
                    return final
            raise NodeBinariesError(
                f"{final} was unpacked against another {SUMS_NAME}; remove it to unpack again")
        _unpack(archive, sums_text, final)
        return final
    if not source.is_dir():
        raise _missing(source)
    if sums_path.is_file():
        verify(source, parse_sums(sums_path.read_text()))
    return source


def binary(relative: str) -> Path:
    """One binary by its path in the layout, e.g. ``kubelet-1.32.10/kubelet``."""
    path = node_binaries() / relative
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise NodeBinariesError(
            f"{path} is not an executable file (node binaries from {source_dir()});"
            f" {_WHERE_FROM}")
    return path


def selected(env: str, known: Mapping[str, _T], what: str, value: str | None = None
             ) -> list[_T]:
    """The entries of `known` that `env` names ("1.6,2.3"; unset or empty: all), or
    `value` in its place; each once, in the order named."""
    text = os.environ.get(env, "") if value is None else value
    names = [n.strip() for n in text.split(",") if n.strip()] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{env}: unknown {what} {', '.join(unknown)};"
                         f" known: {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]
