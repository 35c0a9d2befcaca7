"""The running daemon's own view, for `nodekeeper status`: a small JSON file by the socket.

What the daemon knows only in memory (whether its state reaches the disk, how late its
event loop has run) cannot go into the state database, which may be the very thing
failing. The socket's directory is the daemon's own runtime directory (/run/nodekeeper,
a tmpfs); the file is replaced in one rename, so a reader never sees half of it.

The daemon writes a `RunStatus`; `status` reads one back. Reading is tolerant in both
directions, as the two may come from different versions during an upgrade: a key the
reader does not know is ignored, and a key missing or of the wrong type takes its
field's default. A new field therefore needs a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nodekeeper.host.looplag import Lag
from nodekeeper.registry.outage import Outage
from nodekeeper.state.memory import Health

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    pid: int
    written_at: float = 0.0  # wall clock
    state: Health | None = None  # None until state reported its health
    loop_lag: Lag | None = None
    outages: tuple[Outage, ...] = ()  # registry endpoints in an outage episode, oldest first

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunStatus | None:
        """The record in `text`; None when it is not one (not JSON, no pid)."""
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        pid = raw.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return None
        return cls(pid=pid, written_at=_number(raw.get("written_at")),
                   state=_record(Health, raw.get("state")),
                   loop_lag=_record(Lag, raw.get("loop_lag")),
                   outages=_records(Outage, raw.get("outages")))


def path_for(listen: str) -> Path:
    """/run/nodekeeper/cri.sock -> /run/nodekeeper/cri.status"""
    return Path(listen).with_suffix(".status")


def write(path: Path, status: RunStatus) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(status.to_json(), encoding="utf-8")
    os.replace(temporary, path)


def read(path: Path) -> RunStatus | None:
    """What a running daemon wrote; None when there is none, or its writer is gone."""
    try:
        status = RunStatus.from_json(path.read_text(encoding="utf-8"))
        if status is None:
            return None
        os.kill(status.pid, 0)
    except (OSError, UnicodeDecodeError, OverflowError):
        return None
    return status


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _number(value: object, default: float = 0.0) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def _records(cls: type[R], raw: object) -> tuple[R, ...]:
    if not isinstance(raw, list):
        return ()
    found = (_record(cls, item) for item in raw)
    return tuple(record for record in found if record is not None)


def _record(cls: type[R], raw: object) -> R | None:
    """A flat record (fields of str, int, float or bool) from a JSON object; None when a
    field without a default is missing or of the wrong type."""
    if not isinstance(raw, dict):
        return None
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind, value = hints[field.name], raw.get(field.name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = kind(value)
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            values[field.name] = value
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            return None
    return cls(**values)

