"""nodekeeper's memory across restarts: an SQLite database in state_dir.

- checks:    per normalized reference, the last probe (time, result) and the last
             successful one (time, upstream digest). `interval` rules read it.
- access:    per repository, the keyed fingerprints of credentials (or `anonymous`) seen
             to work upstream. Fallbacks read it; it never holds a credential.
- decisions: the most recent PullImage decisions, for `nodekeeper status`.
- stale:     references answered with a copy upstream did not confirm (a fallback),
             until upstream confirms them again: what `status` lists and the
             nodekeeper_images_served_stale metric counts.
- meta:      the daemon's view of things `status` reports (the backing registry's health).

Reads come from memory (loaded at start); writes go through to SQLite in WAL mode, one
transaction each. A database that cannot be opened or is corrupt is moved aside and
rebuilt: losing it costs some extra probes and some refused fallbacks, never a pull.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from nodekeeper import logs, metrics

DB_NAME = "state.db"
SECRET_NAME = "fingerprint.key"
KEEP_DECISIONS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checks (
    reference  TEXT PRIMARY KEY,
    checked_at REAL NOT NULL,
    result     TEXT NOT NULL,
    ok_at      REAL,
    digest     TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS access (
    repository  TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    first_ok    REAL NOT NULL,
    last_ok     REAL NOT NULL,
    PRIMARY KEY (repository, fingerprint)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stale (
    reference TEXT PRIMARY KEY,
    digest    TEXT NOT NULL,
    kind      TEXT NOT NULL,
    since     REAL NOT NULL,
    last      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL NOT NULL,
    image           TEXT NOT NULL,
    rule            TEXT NOT NULL,
    decision        TEXT NOT NULL,
    reason          TEXT NOT NULL,
    local_digest    TEXT NOT NULL,
    upstream_digest TEXT NOT NULL,
    duration_ms     REAL NOT NULL
);
"""

_log = logs.get("state")


@dataclass(frozen=True)
class Check:
    checked_at: float
    result: str
    ok_at: float | None
    digest: str


@dataclass(frozen=True)
class PullRecord:
    at: float
    image: str
    rule: str
    decision: str
    reason: str
    local_digest: str
    upstream_digest: str
    duration_ms: float


class State:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key = _load_key(self.directory / SECRET_NAME)
        self._db = _open(self.directory / DB_NAME)
        self._checks: dict[str, Check] = {
            row[0]: Check(*row[1:])
            for row in self._db.execute(
                "SELECT reference, checked_at, result, ok_at, digest FROM checks")
        }
        self._access: set[tuple[str, str]] = {
            (row[0], row[1])
            for row in self._db.execute("SELECT repository, fingerprint FROM access")
        }
        self._stale: dict[str, str] = dict(
            self._db.execute("SELECT reference, digest FROM stale"))
        metrics.IMAGES_STALE.set(len(self._stale))
        self._since_trim = 0

    def close(self) -> None:
        self._db.close()

    # -- reads (memory) ------------------------------------------------------------------

    def check(self, reference: str) -> Check | None:
        return self._checks.get(reference)

    def seen_working(self, repository: str, fingerprint: str) -> bool:
        return (repository, fingerprint) in self._access

    def fingerprints(self, repository: str) -> set[str]:
        return {fp for repo, fp in self._access if repo == repository}

    # -- writes (memory, then SQLite) ----------------------------------------------------

    def record_check(self, reference: str, result: str, digest: str = "",
                     now: float | None = None) -> None:
        now = time.time() if now is None else now
        previous = self._checks.get(reference)
        if result == "ok":
            check = Check(now, result, now, digest)
        else:  # a failed probe leaves the last success standing
            check = Check(now, result, previous.ok_at if previous else None,
                          previous.digest if previous else "")
        self._checks[reference] = check
        self._write(
            "INSERT INTO checks (reference, checked_at, result, ok_at, digest) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(reference) DO UPDATE SET "
            "checked_at = excluded.checked_at, result = excluded.result, "
            "ok_at = excluded.ok_at, digest = excluded.digest",
            (reference, check.checked_at, check.result, check.ok_at, check.digest),
        )

    def record_access(self, repository: str, fingerprint: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._access.add((repository, fingerprint))
        self._write(
            "INSERT INTO access (repository, fingerprint, first_ok, last_ok) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(repository, fingerprint) DO UPDATE SET last_ok = excluded.last_ok",
            (repository, fingerprint, now, now),
        )

    def record_decision(self, decision: PullRecord) -> None:
        self._write(
            "INSERT INTO decisions (at, image, rule, decision, reason, local_digest, "
            "upstream_digest, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (decision.at, decision.image, decision.rule, decision.decision, decision.reason,
             decision.local_digest, decision.upstream_digest, decision.duration_ms),
        )
        self._since_trim += 1
        if self._since_trim >= 100:
            self._since_trim = 0
            self._write("DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?",
                        (KEEP_DECISIONS,))

    def mark_stale(self, reference: str, digest: str, kind: str,
                   now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._stale[reference] = digest
        metrics.IMAGES_STALE.set(len(self._stale))
        # `since` stays while the same copy keeps standing in.
        self._write(
            "INSERT INTO stale (reference, digest, kind, since, last) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(reference) DO UPDATE SET kind = excluded.kind, last = excluded.last, "
            "since = CASE WHEN stale.digest = excluded.digest THEN stale.since "
            "ELSE excluded.since END, digest = excluded.digest",
            (reference, digest, kind, now, now))

    def clear_stale(self, reference: str) -> None:
        if self._stale.pop(reference, None) is None:
            return
        metrics.IMAGES_STALE.set(len(self._stale))
        self._write("DELETE FROM stale WHERE reference = ?", (reference,))

    def stale(self, reference: str) -> str:
        """The digest `reference` is answered with while upstream has not confirmed it."""
        return self._stale.get(reference, "")

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta (key, value, at) VALUES (?, ?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = excluded.value, at = excluded.at",
                    (key, value, time.time()))

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            with self._db:
                self._db.execute(sql, params)
        except sqlite3.Error as exc:
            # The decision in memory stands; only its persistence is lost.
            _log.error("state database write failed", error=str(exc),
                       database=str(self.directory / DB_NAME))


def _open(path: Path) -> sqlite3.Connection:
    try:
        return _connect(path)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{aside}{suffix}")
        _log.warning("state database unreadable; moved aside and rebuilt",
                     error=str(exc), moved_to=str(aside))
        return _connect(path)


def _connect(path: Path) -> sqlite3.Connection:
    # Created 0600 before SQLite opens it: the -wal and -shm files take its permissions.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.isolation_level = "DEFERRED"  # transactions via `with db:`
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=2000")
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError:
        db.close()
        raise
    os.chmod(path, 0o600)
    return db


def _load_key(path: Path) -> bytes:
    """The node-local HMAC key; made on first start, readable by root only."""
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        _log.warning("fingerprint key has the wrong size; making a new one", path=str(path))
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return key


def read_only(directory: str | Path) -> sqlite3.Connection:
    """For `nodekeeper status`: the database, opened read-only beside a running daemon."""
    path = Path(directory) / DB_NAME
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
