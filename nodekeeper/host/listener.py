"""The unix socket the kubelet connects to: making its path free to bind, and securing it."""

from __future__ import annotations

import os
import socket
import stat

from nodekeeper import logs
from nodekeeper.errors import StartupError

SOCKET_MODE = 0o660

_log = logs.get("listener")


def prepare(path: str) -> None:
    """Make `path` ready to bind: create its directory, and replace a socket left behind
    by a crash. A socket that still answers belongs to a live process: refuse to start
    rather than take it over."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        _log.info("removed stale socket", path=path)
        return
    except OSError as exc:
        raise StartupError(
            f"cannot tell whether {path} is in use ({exc}); refusing to start"
        ) from None
    finally:
        probe.close()
    raise StartupError(
        f"another process already answers on {path} (a running nodekeeper?); "
        "stop it first or choose another --listen"
    )


Identity = tuple[int, int, int]


def _identity(path: str) -> Identity:
    # Inode numbers are reused at once on tmpfs; the change time tells two sockets apart.
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_ctime_ns


def secure(path: str) -> Identity:
    """Restrict the bound socket to its owner and group; return its identity for `remove`."""
    os.chmod(path, SOCKET_MODE)
    return _identity(path)


def remove(path: str, identity: Identity) -> None:
    """Remove our socket, but not one that a newer process has bound in the meantime."""
    try:
        if _identity(path) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
