"""The kubelet's socket: stale sockets are replaced, live ones are never taken over."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from nodekeeper.errors import StartupError
from nodekeeper.host import listener


def test_creates_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nodekeeper" / "cri.sock"
    listener.prepare(str(path))
    assert path.parent.is_dir()


def test_replaces_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "cri.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # bound, never listening: what a crash leaves behind
    listener.prepare(str(path))
    assert not path.exists()


def test_refuses_live_socket(tmp_path: Path) -> None:
    path = tmp_path / "cri.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(StartupError, match="already answers"):
            listener.prepare(str(path))
        assert path.exists()
    finally:
        live.close()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "cri.sock"
    path.write_text("precious")
    with pytest.raises(StartupError, match="not a socket"):
        listener.prepare(str(path))
    assert path.read_text() == "precious"


def test_secure_and_remove_only_our_socket(tmp_path: Path) -> None:
    path = tmp_path / "cri.sock"
    ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.bind(str(path))
    identity = listener.secure(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    ours.close()
    path.unlink()
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.bind(str(path))
    try:
        listener.remove(str(path), identity)
        assert path.exists()
        listener.remove(str(path), listener.secure(str(path)))
        assert not path.exists()
    finally:
        theirs.close()
