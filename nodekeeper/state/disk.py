"""The state directory on disk: the SQLite database and the fingerprint key.

Only State's writer thread calls this (state/memory.py), never the event loop: a disk that is
slow, full, locked or gone costs that thread time, not the kubelet.

Each batch of writes is one session: open the database by its path, write, commit,
close. Holding nothing open between batches means a database deleted or replaced is
noticed at the next batch (a new file is created and everything in memory written to
it), an administrator can remount or unmount the state file system, and no lock is
held while `nodekeeper status` reads.

No memory-mapped file, ever: SQLite's WAL mode maps its -shm file into memory, and a
mapped page whose file can no longer be read or written (a file system gone read-only or
away, a truncated file) kills the process with SIGBUS on the next access, instead of
failing a call. So the database uses a rollback journal (plain reads and writes, which
fail with an error) and mmap_size=0, and each session sets EXCLUSIVE locking before its
first access, so that even a database left in WAL mode by an earlier version is read
with SQLite's heap-memory index, then converted, without ever mapping its -shm file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass, field
from pathlib import Path

from nodekeeper import logs
from nodekeeper.errors import StateCorrupt
from nodekeeper.pull.values import Answer, Check

DB_NAME = "state.db"
SECRET_NAME = "fingerprint.key"
KEEP_DECISIONS = 1000
# A session waits this long for a lock held by another connection (`nodekeeper status`
# reading), then fails, and the batch is retried later.
BUSY_TIMEOUT_MS = 1000

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
CREATE TABLE IF NOT EXISTS identity (
    id TEXT NOT NULL
);
"""

_log = logs.get("state")

# Which database a session wrote to: a random id kept inside it. Not the file's device and
# inode: a file system hands a deleted file's inode to the next file, so a database
# deleted and made anew could pass for the one this run has written to.
Identity = str
AccessKey = tuple[str, str]  # (repository, fingerprint)


@dataclass(frozen=True)
class Stale:
    """A reference answered with a copy upstream did not confirm: which, why, since when
    (the same copy), and when it was last answered so."""

    digest: str
    kind: str
    since: float
    last: float


@dataclass
class Records:
    """Rows to write, or rows read: checks by reference, access times (first_ok,
    last_ok) by (repository, fingerprint), decisions oldest first, meta (value, at),
    stale references (None: no longer stale, to delete)."""

    checks: dict[str, Check] = field(default_factory=dict)
    access: dict[AccessKey, tuple[float, float]] = field(default_factory=dict)
    decisions: MutableSequence[Answer] = field(default_factory=list)
    meta: dict[str, tuple[str, float]] = field(default_factory=dict)
    stale: dict[str, Stale | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return (len(self.checks) + len(self.access) + len(self.decisions) + len(self.meta)
                + len(self.stale))


def _is_corrupt(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")  # Python 3.11 and later
    if name:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _move_aside(path: Path, why: str) -> None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-journal", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if os.path.lexists(source):
            source.rename(f"{aside}{suffix}")
    _log.warning("state database unusable; moved aside and rebuilt", error=why,
                 moved_to=str(aside))


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        # Before the first access: a database still in WAL mode is then opened without
        # its shared-memory file (see the module docstring).
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA mmap_size=0")
        mode = db.execute("PRAGMA journal_mode=DELETE").fetchone()
        if mode is None or str(mode[0]).lower() != "delete":
            raise sqlite3.OperationalError(f"cannot leave journal mode {mode}")
        db.executescript(_SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


@contextlib.contextmanager
def session(directory: Path, check: bool = False) -> Iterator[tuple[sqlite3.Connection,
                                                                      Identity]]:
    """The database, open for one batch, and which file it is; closed afterwards.

    Creates the directory and the database when missing. A database that is damaged, or
    something other than a file in its place, is moved aside and a new one made
    (`check` runs SQLite's quick_check first, for the first session of a run)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / DB_NAME
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        _move_aside(path, "not a regular file")
        info = None
    if info is None:
        # Created 0600 before SQLite opens it: its journal takes its permissions.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    try:
        db = _connect(path)
        try:
            if check:
                row = db.execute("PRAGMA quick_check").fetchone()
                if row is None or row[0] != "ok":
                    raise StateCorrupt(f"quick_check: {row[0] if row else 'no answer'}")
        except (sqlite3.Error, StateCorrupt):
            db.close()
            raise
    except (sqlite3.Error, StateCorrupt) as exc:
        if not (isinstance(exc, StateCorrupt) or _is_corrupt(exc)):
            raise
        _move_aside(path, str(exc))
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        db = _connect(path)
    try:
        os.chmod(path, 0o600)
        yield db, _identity(db)
    finally:
        db.close()


@dataclass
class Found:
    """What start reads: the records, which file they came from, and, when the database
    could only be read, why it cannot be written."""

    records: Records
    identity: Identity | None
    unwritable: str = ""


def read(directory: Path) -> Found:
    """Everything a run starts from. When the directory cannot be written, the database
    is read as it is (immutable: no lock, no journal, nothing written or mapped)."""
    try:
        with session(directory, check=True) as (db, identity):
            return Found(_rows(db), identity)
    except (OSError, sqlite3.Error) as exc:
        path = directory / DB_NAME
        if not path.is_file():
            raise
        view = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            view.execute("PRAGMA mmap_size=0")
            return Found(_rows(view), _identity(view, writable=False), describe(exc))
        finally:
            view.close()


def _identity(db: sqlite3.Connection, writable: bool = True) -> Identity:
    """The database's id; a new one is stored in a database that has none yet."""
    try:
        row = db.execute("SELECT id FROM identity LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # an older database, read as it is
        row = None
    if row is not None:
        return str(row[0])
    made = secrets.token_hex(16)
    if writable:
        db.execute("INSERT INTO identity (id) VALUES (?)", (made,))
    return made


def describe(exc: BaseException) -> str:
    """A failure as one line: what the operating system or SQLite said."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _rows(db: sqlite3.Connection) -> Records:
    found = Records()
    for reference, checked_at, result, ok_at, digest in db.execute(
            "SELECT reference, checked_at, result, ok_at, digest FROM checks"):
        found.checks[reference] = Check(checked_at, result, ok_at, digest)
    for repository, fingerprint, first_ok, last_ok in db.execute(
            "SELECT repository, fingerprint, first_ok, last_ok FROM access"):
        found.access[(repository, fingerprint)] = (first_ok, last_ok)
    for reference, digest, kind, since, last in db.execute(
            "SELECT reference, digest, kind, since, last FROM stale"):
        found.stale[reference] = Stale(digest, kind, since, last)
    return found


def write(db: sqlite3.Connection, records: Records) -> None:
    """One transaction: every record, then decisions beyond KEEP_DECISIONS trimmed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(
            "INSERT INTO checks (reference, checked_at, result, ok_at, digest) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(reference) DO UPDATE SET "
            "checked_at = excluded.checked_at, result = excluded.result, "
            "ok_at = excluded.ok_at, digest = excluded.digest",
            [(reference, c.checked_at, c.result, c.ok_at, c.digest)
             for reference, c in records.checks.items()])
        db.executemany(
            "INSERT INTO access (repository, fingerprint, first_ok, last_ok) "
            "VALUES (?, ?, ?, ?) ON CONFLICT(repository, fingerprint) DO UPDATE SET "
            "first_ok = min(first_ok, excluded.first_ok), "
            "last_ok = max(last_ok, excluded.last_ok)",
            [(repository, fingerprint, first, last)
             for (repository, fingerprint), (first, last) in records.access.items()])
        db.executemany(
            "INSERT INTO decisions (at, image, rule, decision, reason, local_digest, "
            "upstream_digest, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(d.at, d.image, d.rule, d.decision.value, d.reason, d.node_digest,
              d.upstream_digest, d.duration_ms) for d in records.decisions])
        db.executemany(
            "INSERT INTO meta (key, value, at) VALUES (?, ?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value = excluded.value, at = excluded.at",
            [(key, value, at) for key, (value, at) in records.meta.items()])
        db.executemany(
            "INSERT INTO stale (reference, digest, kind, since, last) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(reference) DO UPDATE SET digest = excluded.digest, "
            "kind = excluded.kind, since = excluded.since, last = excluded.last",
            [(reference, s.digest, s.kind, s.since, s.last)
             for reference, s in records.stale.items() if s is not None])
        db.executemany("DELETE FROM stale WHERE reference = ?",
                       [(reference,) for reference, s in records.stale.items() if s is None])
        if records.decisions:
            db.execute("DELETE FROM decisions WHERE id <= "
                       "(SELECT MAX(id) FROM decisions) - ?", (KEEP_DECISIONS,))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


# -- the fingerprint key ---------------------------------------------------------------------

def read_key(directory: Path) -> bytes | None:
    """The node-local HMAC key; None when there is none yet (or one of the wrong size,
    which is replaced). OSError when it cannot be read."""
    path = directory / SECRET_NAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(key) == 32:
        return key
    _log.warning("fingerprint key has the wrong size; making a new one", path=str(path))
    return None


def write_key(directory: Path, key: bytes) -> None:
    """Store the key, readable by root only, replacing the file in one rename."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / SECRET_NAME
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def new_key() -> bytes:
    return secrets.token_bytes(32)


def has_key(directory: Path) -> bool:
    return os.path.lexists(directory / SECRET_NAME)
