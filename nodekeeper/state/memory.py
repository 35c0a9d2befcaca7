"""nodekeeper's memory across restarts, and what happens when the disk under it fails.

- checks:    per normalized reference, the last probe (time, result) and the last
             successful one (time, upstream digest). `interval` rules read it.
- access:    per repository, the keyed fingerprints of credentials (or `anonymous`) seen
             to work upstream. Fallbacks read it; it never holds a credential.
- decisions: the most recent PullImage decisions, for `nodekeeper status`.
- stale:     references answered with a copy upstream did not confirm (a fallback),
             until upstream confirms them again: what `status` lists and the
             nodekeeper_images_served_stale metric counts.
- meta:      the daemon's view of things `status` reports (the backing registry's health).

Reads come from memory, always. A write changes memory at once and returns; a writer
thread puts it on disk in batches (state/disk.py: SQLite, no memory-mapped files). When
the state directory cannot take writes (read-only, full, locked, deleted, replaced by
another kind of file), nothing fails: the daemon serves from memory, the writer logs
the failure once at error level, `health` says so (STATUS=, the
nodekeeper_state_persistent metric, `nodekeeper status`), retries with back-off, and
writes everything in memory back once it can. Losing the state costs some extra probes
and some refused fallbacks, never a pull.

The fingerprint key is settled once, at start. When the one on disk cannot be read (or
the directory does not answer within `open_wait`), a key made in memory stands in:
credentials recorded as working before do not match it, so each must succeed upstream
once more before the node's copy stands in for it (the safe side), and fingerprints made
with it reach the disk only if the key itself can be stored there.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodekeeper import logs, metrics
from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import ANONYMOUS
from nodekeeper.pull.values import Answer, Check
from nodekeeper.state import disk as statedisk
from nodekeeper.state.disk import (
    DB_NAME,
    KEEP_DECISIONS,
    SECRET_NAME,
    AccessKey,
    Identity,
    Records,
    Stale,
)

__all__ = [
    "DB_NAME",
    "KEEP_DECISIONS",
    "SECRET_NAME",
    "Health",
    "State",
]

# How long start waits for the state directory before going on with memory alone.
OPEN_WAIT = 3.0
# Writes arriving together (a burst of pulls) go to disk in one transaction.
FLUSH_DELAY = 0.1
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
CLOSE_WAIT = 5.0

_log = logs.get("state")


@dataclass(frozen=True)
class Health:
    """Whether state reaches the disk. `problem`: why writes do not (empty when they do);
    `key_problem`: why the fingerprint key in use is not one stored on disk."""

    persistent: bool
    problem: str = ""
    since: float = 0.0
    key_problem: str = ""
    pending: int = 0

    def summary(self) -> str:
        if self.persistent and not self.key_problem:
            return "state on disk"
        parts = []
        if not self.persistent:
            parts.append(f"state in memory only ({self.problem}), retrying")
        if self.key_problem:
            parts.append(f"fingerprint key in memory ({self.key_problem})")
        return "; ".join(parts)


class State:
    def __init__(self, directory: str | Path, on_health: Callable[[Health], None] | None = None,
                 *, open_wait: float = OPEN_WAIT, retry_first: float = RETRY_FIRST,
                 retry_max: float = RETRY_MAX) -> None:
        self.directory = Path(directory)
        self._on_health = on_health
        self._retry_first, self._retry_max = retry_first, retry_max
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Memory: everything known, and what the disk has not taken yet.
        self._checks: dict[str, Check] = {}
        self._access: dict[AccessKey, tuple[float, float]] = {}
        self._meta: dict[str, tuple[str, float]] = {}
        self._stale: dict[str, Stale] = {}
        self._recent: collections.deque[Answer] = collections.deque(maxlen=KEEP_DECISIONS)
        self._pending = _pending()
        self._everything = False  # the next batch writes all of memory
        # The writer's view of the disk.
        self._key: bytes | None = None
        self._key_on_disk = False
        self._key_problem = ""
        self._problem = "not opened yet"
        self._since = time.time()
        self._identity: Identity | None = None
        self._opened = threading.Event()
        self._closing = False
        self._hurry = False
        self._idle = False  # the writer sleeps until there is something to write
        self._writing = False  # a batch taken from memory, not yet on disk
        self._attempts = 0
        self._reported: Health | None = None
        self._writer = threading.Thread(target=self._run, name="state writer", daemon=True)
        self._writer.start()
        if not self._opened.wait(open_wait):
            with self._lock:
                self._problem = f"the state directory did not answer within {open_wait:g}s"
        with self._lock:
            if self._key is None:
                self._key = statedisk.new_key()
                self._key_problem = (self._key_problem
                                     or f"the state directory did not answer within "
                                        f"{open_wait:g}s")
            self.key: bytes = self._key
        self._report()

    # -- health ----------------------------------------------------------------------------

    @property
    def health(self) -> Health:
        with self._lock:
            return self._health()

    def _health(self) -> Health:
        pending = len(self._pending) + (
            len(self._checks) + len(self._access) + len(self._meta) + len(self._stale)
            if self._everything else 0)
        return Health(not self._problem, self._problem, self._since, self._key_problem, pending)

    def _report(self) -> None:
        """Log and announce a change of health (once per episode), outside the lock."""
        with self._lock:
            now = self._health()
            before, self._reported = self._reported, now
        if before is not None and (before.persistent, before.problem, before.key_problem) == (
                now.persistent, now.problem, now.key_problem):
            return
        where = str(self.directory)
        if now.key_problem and (before is None or before.key_problem != now.key_problem):
            _log.error("fingerprint key not usable; using one in memory: credentials "
                       "recorded before must succeed upstream once more before the node's "
                       "copy stands in for them", problem=now.key_problem, directory=where)
        if not now.persistent and (before is None or before.persistent):
            _log.error("state storage failed; serving with state in memory and retrying",
                       problem=now.problem, directory=where)
        elif now.persistent and before is not None and not before.persistent:
            _log.warning("state storage works again; memory written back",
                         directory=where, outage_s=round(time.time() - before.since, 1))
        if self._on_health is not None:
            self._on_health(now)

    # -- reads (memory) --------------------------------------------------------------------

    def check(self, reference: str) -> Check | None:
        with self._lock:
            return self._checks.get(reference)

    def seen_working(self, repository: str, fingerprint: str) -> bool:
        with self._lock:
            return (repository, fingerprint) in self._access

    def fingerprints(self, repository: str) -> set[str]:
        with self._lock:
            return {fp for repo, fp in self._access if repo == repository}

    def stale(self, reference: str) -> str:
        """The digest `reference` is answered with while upstream has not confirmed it."""
        with self._lock:
            found = self._stale.get(reference)
            return found.digest if found else ""

    def recent(self) -> list[Answer]:
        """The most recent PullImage answers recorded, oldest first."""
        with self._lock:
            return list(self._recent)

    # -- writes (memory now, disk soon) ----------------------------------------------------

    def _changed(self) -> None:
        """Called with the lock held after a write to memory. The writer is woken only
        from its idle sleep: while it gathers a batch (FLUSH_DELAY) it takes what arrives
        anyway, and waking it for each record made every PullImage pay a thread switch."""
        if self._idle:
            self._wake.notify_all()

    def record_check(self, reference: str, failure: Kind | None, digest: str = "",
                     now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._wake:
            previous = self._checks.get(reference)
            if failure is None:
                check = Check(now, "ok", now, digest)
            else:  # a failed probe leaves the last success standing
                check = Check(now, failure.value, previous.ok_at if previous else None,
                              previous.digest if previous else "")
            self._checks[reference] = self._pending.checks[reference] = check
            self._changed()

    def record_access(self, repository: str, fingerprint: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        key = (repository, fingerprint)
        with self._wake:
            first = self._access.get(key, (now, now))[0]
            self._access[key] = self._pending.access[key] = (min(first, now), now)
            self._changed()

    def record_decision(self, answer: Answer) -> None:
        with self._wake:
            self._recent.append(answer)
            self._pending.decisions.append(answer)
            self._changed()

    def mark_stale(self, reference: str, digest: str, kind: Kind,
                   now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._wake:
            previous = self._stale.get(reference)
            # `since` stays while the same copy keeps standing in.
            since = previous.since if previous and previous.digest == digest else now
            self._stale[reference] = self._pending.stale[reference] = Stale(
                digest, kind.value, since, now)
            count = len(self._stale)
            self._changed()
        metrics.IMAGES_STALE.set(count)

    def clear_stale(self, reference: str) -> None:
        with self._wake:
            if self._stale.pop(reference, None) is None:
                return
            self._pending.stale[reference] = None
            count = len(self._stale)
            self._changed()
        metrics.IMAGES_STALE.set(count)

    def set_meta(self, key: str, value: str) -> None:
        with self._wake:
            self._meta[key] = self._pending.meta[key] = (value, time.time())
            self._changed()

    # -- the writer thread -----------------------------------------------------------------

    def flush(self, timeout: float = CLOSE_WAIT) -> bool:
        """Write what is pending now, waiting up to `timeout`; True once it is on disk."""
        deadline = time.monotonic() + timeout
        with self._wake:
            if self._written():
                return True
            # A batch in progress may have been taken before the latest writes.
            target = self._attempts + 2
            self._hurry = True
            self._wake.notify_all()
            while self._attempts < target and (left := deadline - time.monotonic()) > 0:
                if self._written():
                    break
                self._wake.wait(left)
            return self._written()

    def close(self) -> None:
        """Write what is pending (waiting at most CLOSE_WAIT) and stop the writer."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._writer.join(CLOSE_WAIT)

    def _dirty(self) -> bool:
        return bool(len(self._pending) or self._everything)

    def _written(self) -> bool:
        return not self._dirty() and not self._writing and not self._problem

    def _run(self) -> None:
        self._open()
        delay = self._retry_first
        while True:
            with self._wake:
                self._idle = True
                while not (self._closing or self._hurry or self._dirty() or self._problem):
                    self._wake.wait()
                self._idle = False
                # Gather a burst into one batch; after a failure, back off.
                self._wake.wait_for(lambda: self._closing or self._hurry,
                                    delay if self._problem else FLUSH_DELAY)
                self._hurry = False
                closing = self._closing
            written = self._write()
            delay = self._retry_first if written else min(delay * 2, self._retry_max)
            with self._wake:
                self._attempts += 1
                self._writing = False
                self._wake.notify_all()
            self._report()
            if closing:
                return

    def _open(self) -> None:
        """The start: the key, and the records on disk, into memory."""
        key: bytes | None = None
        key_problem = problem = ""
        try:
            key = statedisk.read_key(self.directory)
            if key is None:
                key = statedisk.new_key()
                statedisk.write_key(self.directory, key)
        except OSError as exc:
            key = None
            key_problem = f"cannot read or store {self.directory / SECRET_NAME}: " \
                          f"{statedisk.describe(exc)}"
        try:
            read = statedisk.read(self.directory)
            found, problem, self._identity = read.records, read.unwritable, read.identity
        except (OSError, sqlite3.Error) as exc:
            found, problem = statedisk.Records(), statedisk.describe(exc)
        with self._wake:
            if self._key is None:  # start is still waiting for this
                if key is not None:
                    self._key, self._key_on_disk = key, True
                self._key_problem = key_problem
            for reference, check in found.checks.items():
                self._checks.setdefault(reference, check)
            for access, (first, last) in found.access.items():
                mine = self._access.get(access, (first, last))
                self._access[access] = (min(first, mine[0]), max(last, mine[1]))
            for reference, stale in found.stale.items():
                if stale is not None:
                    self._stale.setdefault(reference, stale)
            count = len(self._stale)
            self._problem = problem
            # What start could not read, the disk may still hold: merge into it later.
            self._everything = bool(problem)
        metrics.IMAGES_STALE.set(count)
        self._opened.set()

    def _write(self) -> bool:
        """One batch, in one session. On failure, memory keeps it all for the next."""
        batch = Records()
        try:
            with statedisk.session(self.directory) as (db, identity):
                everything = self._keep_key()
                # A new database (the old one deleted or replaced) has nothing of ours.
                new = self._identity is not None and identity != self._identity
                batch = self._take(everything or new, new)
                statedisk.write(db, batch)
                self._identity = identity
        except (OSError, sqlite3.Error) as exc:
            with self._wake:
                self._restore(batch)
                if not self._problem:
                    self._since = time.time()
                self._problem = statedisk.describe(exc)
            return False
        with self._wake:
            if self._problem:
                self._since = time.time()
            self._problem = ""
        return True

    def _keep_key(self) -> bool:
        """Store the key in use when the directory has none (made in memory at start, or
        deleted since). True when that makes fingerprints in memory worth writing."""
        with self._wake:
            key = self._key
        if key is None or statedisk.has_key(self.directory):
            return False
        statedisk.write_key(self.directory, key)
        with self._wake:
            newly = not self._key_on_disk
            self._key_on_disk, self._key_problem = True, ""
        return newly

    def _take(self, everything: bool, new: bool) -> Records:
        """The next batch: what is pending, or all of memory; with `new` (a database
        that is not the one written before), the recent decisions too."""
        with self._wake:
            everything = everything or self._everything
            source = (Records(dict(self._checks), dict(self._access), [], dict(self._meta),
                              dict(self._stale)) if everything else self._pending)
            access = source.access if self._key_on_disk else {
                key: times for key, times in source.access.items() if key[1] == ANONYMOUS}
            decisions = self._recent if new else self._pending.decisions
            batch = Records(dict(source.checks), access, list(decisions), dict(source.meta),
                            dict(source.stale))
            self._pending = _pending()
            self._everything = False
            self._writing = True
            return batch

    def _restore(self, batch: Records) -> None:
        """Put a failed batch's decisions back; the next batch writes all of memory."""
        decisions = collections.deque(batch.decisions, maxlen=KEEP_DECISIONS)
        decisions.extend(self._pending.decisions)
        self._pending.decisions = decisions
        self._everything = True


def _pending() -> Records:
    return Records(decisions=collections.deque(maxlen=KEEP_DECISIONS))

