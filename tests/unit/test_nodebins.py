"""Finding and unpacking the node binaries: once, verified, never into the checkout."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import nodebins

FILES = {"containerd-9.9.9/containerd": b"#!/bin/sh\necho 9.9.9\n", "kubelet-1.0.0/kubelet": b"k"}


def sums_text(files: dict[str, bytes]) -> str:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())


def make_source(directory: Path, files: dict[str, bytes], sums: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    (directory / nodebins.ARCHIVE_NAME).write_bytes(buf.getvalue())
    (directory / nodebins.SUMS_NAME).write_text(sums if sums is not None else sums_text(FILES))
    return directory


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(nodebins.NODE_BINARIES_ENV, str(tmp_path / "source"))
    monkeypatch.setenv(nodebins.CACHE_ENV, str(tmp_path / "cache"))
    nodebins.node_binaries.cache_clear()
    yield tmp_path
    nodebins.node_binaries.cache_clear()


def test_unpacks_once_into_the_cache_and_reuses_it(env: Path) -> None:
    source = make_source(env / "source", FILES)
    found = nodebins.node_binaries()
    assert found.parent == env / "cache" / "node-binaries"
    assert found.name == hashlib.sha256((source / nodebins.ARCHIVE_NAME).read_bytes()).hexdigest()
    assert nodebins.binary("containerd-9.9.9/containerd").read_bytes() == FILES[
        "containerd-9.9.9/containerd"]
    marker = found / "containerd-9.9.9" / "containerd"
    stamp = marker.stat().st_mtime_ns
    nodebins.node_binaries.cache_clear()
    assert nodebins.node_binaries() == found
    assert marker.stat().st_mtime_ns == stamp  # not unpacked again
    assert [p.name for p in found.parent.iterdir()] == [found.name]  # no scratch dirs left


def test_a_run_that_lost_the_race_uses_the_winners_directory(env: Path) -> None:
    source = make_source(env / "source", FILES)
    final = env / "cache" / "winner"
    nodebins._unpack(source / nodebins.ARCHIVE_NAME, sums_text(FILES), final)
    nodebins._unpack(source / nodebins.ARCHIVE_NAME, sums_text(FILES), final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["winner"]
    assert (final / "kubelet-1.0.0" / "kubelet").read_bytes() == b"k"


def test_a_wrong_checksum_leaves_no_cache_behind(env: Path) -> None:
    bad = sums_text({**FILES, "kubelet-1.0.0/kubelet": b"something else"})
    make_source(env / "source", FILES, sums=bad)
    wrong = re.escape("kubelet-1.0.0/kubelet: sha256")
    with pytest.raises(nodebins.NodeBinariesError, match=wrong):
        nodebins.node_binaries()
    assert list((env / "cache" / "node-binaries").iterdir()) == []


def test_missing_binaries_say_where_they_come_from(env: Path) -> None:
    with pytest.raises(nodebins.NodeBinariesError) as missing:
        nodebins.node_binaries()
    message = str(missing.value)
    assert str(env / "source") in message
    assert nodebins.NODE_BINARIES_ENV in message
    assert "upstream release archives" in message


def test_an_unpacked_layout_is_used_in_place(env: Path) -> None:
    source = env / "source"
    for name, data in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
        (source / name).chmod(0o755)
    (source / nodebins.SUMS_NAME).write_text(sums_text(FILES))
    assert nodebins.binary("kubelet-1.0.0/kubelet") == source / "kubelet-1.0.0" / "kubelet"
    with pytest.raises(nodebins.NodeBinariesError, match="not an executable file"):
        nodebins.binary("containerd-2.0.0/containerd")


@pytest.mark.parametrize("line", ["abc  file", f"{'0' * 64} file", f"{'0' * 64}  ../up",
                                  f"{'0' * 64}  /abs"])
def test_malformed_sums_are_refused(line: str) -> None:
    with pytest.raises(nodebins.NodeBinariesError, match="line 1"):
        nodebins.parse_sums(line + "\n")
