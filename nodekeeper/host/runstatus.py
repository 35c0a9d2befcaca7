"""The running daemon's own view, for `nodekeeper status`: a small JSON file by the socket.

What the daemon knows only in memory (whether its state reaches the disk, how late its
event loop has run) cannot go into the state database, which may be the very thing
failing. The socket's directory is the daemon's own runtime directory (/run/nodekeeper,
a tmpfs); the file is replaced in one rename, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def path_for(listen: str) -> Path:
    """/run/nodekeeper/cri.sock -> /run/nodekeeper/cri.status"""
    return Path(listen).with_suffix(".status")


def write(path: Path, view: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(view, handle)
    os.replace(temporary, path)


def read(path: Path) -> dict[str, Any] | None:
    """The view a running daemon wrote; None when there is none, or its writer is gone."""
    try:
        view = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(view["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return view if isinstance(view, dict) else None
