"""What `nodekeeper status` and `explain` read of the state database, as typed records.

With disk.py, the only code that speaks SQL: the commands get these records and never
see a table. The database is opened read-only beside a running daemon, one connection
per view, closed before the view is returned; the daemon's writer then waits at most its
busy timeout for it (disk.BUSY_TIMEOUT_MS). A table missing (a database written before
the daemon's last upgrade) reads as empty.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodekeeper.behind import Known, Latest
from nodekeeper.errors import StateUnreadable
from nodekeeper.pull.credentials import ANONYMOUS
from nodekeeper.pull.values import Check
from nodekeeper.state.disk import DB_NAME, Stale

# How long a view waits for the daemon's writer to finish a batch.
BUSY_TIMEOUT = 2.0


@dataclass(frozen=True, kw_only=True)
class Meta:
    """A note the daemon keeps for `status` (the backing registry's health): the value
    and when it was set."""

    value: str
    at: float


@dataclass(frozen=True, kw_only=True)
class Access:
    """Who was seen pulling a repository upstream successfully."""

    anonymous: bool  # an anonymous pull worked
    credentials: int  # how many credential fingerprints worked


@dataclass(frozen=True)
class Decided:
    """One recorded PullImage decision, as `status` lists it."""

    at: float
    image: str
    rule: str
    decision: str  # a decision.Decision's value, as stored (older daemons' too)
    reason: str
    local_digest: str
    upstream_digest: str
    duration_ms: float


@dataclass(frozen=True, kw_only=True)
class ReferenceView:
    """For `explain`: the last check of one reference, and its repository's access."""

    check: Check | None
    access: Access


@dataclass(frozen=True, kw_only=True)
class StatusView:
    """For `status`."""

    backing: Meta | None  # the backing registry's health, when a problem was recorded
    stale: dict[str, Stale]  # by reference, served stale the longest first
    decisions: list[Decided]  # newest first
    checks: dict[str, Check]  # by reference, in order


def reference(directory: str | Path, reference: str, repository: str) -> ReferenceView | None:
    """None when there is no database; StateUnreadable when it cannot be read."""
    with _open(directory) as db:
        if db is None:
            return None
        checks = _rows(db, "SELECT checked_at, result, ok_at, digest FROM checks "
                           "WHERE reference = ?", (reference,))
        fingerprints = [row[0] for row in _rows(
            db, "SELECT fingerprint FROM access WHERE repository = ?", (repository,))]
    return ReferenceView(
        check=Check(*checks[0]) if checks else None,
        access=Access(anonymous=ANONYMOUS in fingerprints,
                      credentials=sum(1 for f in fingerprints if f != ANONYMOUS)))


def status(directory: str | Path, *, decisions: int) -> StatusView | None:
    """The `decisions` most recent decisions, every stale reference and every check.
    None when there is no database; StateUnreadable when it cannot be read."""
    with _open(directory) as db:
        if db is None:
            return None
        backing = _rows(db, "SELECT value, at FROM meta WHERE key = 'backing'")
        stale = _rows(db, "SELECT reference, digest, kind, since, last FROM stale "
                          "ORDER BY since")
        recent = _rows(db, "SELECT at, image, rule, decision, reason, local_digest, "
                           "upstream_digest, duration_ms FROM decisions "
                           "ORDER BY id DESC LIMIT ?", (decisions,))
        checks = _rows(db, "SELECT reference, checked_at, result, ok_at, digest FROM checks "
                           "ORDER BY reference")
    return StatusView(
        backing=Meta(value=backing[0][0], at=backing[0][1]) if backing else None,
        stale={row[0]: Stale(*row[1:]) for row in stale},
        decisions=[Decided(*row) for row in recent],
        checks={row[0]: Check(*row[1:]) for row in checks})


def known(directory: str | Path) -> Known | None:
    """By reference, the last digest a check upstream confirmed, and since when nodekeeper
    knows it: the first decision that saw it upstream (the last check that confirmed it
    when no decision recorded it); by digest, the image of the newest decision that named
    it (the last KEEP_DECISIONS decisions). None when there is no database."""
    with _open(directory) as db:
        if db is None:
            return None
        checks = _rows(db, "SELECT reference, ok_at, digest FROM checks WHERE digest != ''")
        first = dict(_rows(db, "SELECT upstream_digest, MIN(at) FROM decisions "
                               "WHERE upstream_digest != '' GROUP BY upstream_digest"))
        named = _rows(db, "SELECT image, local_digest, upstream_digest FROM decisions "
                          "ORDER BY id")
    pulled_as = {}
    for image, *digests in named:  # oldest first: the newest decision wins
        pulled_as.update({digest: image for digest in digests if digest})
    return Known(latest={reference: Latest(digest=digest, since=first.get(digest, ok_at or 0.0))
                         for reference, ok_at, digest in checks},
                 pulled_as=pulled_as)


@contextlib.contextmanager
def _open(directory: str | Path) -> Iterator[sqlite3.Connection | None]:
    path = Path(directory) / DB_NAME
    if not path.exists():
        yield None
        return
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
    except sqlite3.Error as exc:
        raise StateUnreadable(f"{path}: {exc}") from None
    try:
        # No memory map, as the daemon (state/disk.py: a failing disk must not SIGBUS).
        db.execute("PRAGMA mmap_size=0")
        yield db
    except sqlite3.Error as exc:
        raise StateUnreadable(f"{path}: {exc}") from None
    finally:
        db.close()


def _rows(db: sqlite3.Connection, query: str, args: Sequence[object] = ()) -> list[Any]:
    try:
        return db.execute(query, args).fetchall()
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("no such table"):
            return []
        raise
