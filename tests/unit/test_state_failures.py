"""State storage that fails is never fatal: read-only, full, locked, deleted, replaced,
at start or while running. The daemon keeps its state in memory, says so once per
episode, retries, and writes everything back once the disk takes it again."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nodekeeper.pull.credentials import ANONYMOUS
from nodekeeper.pull.edges import Answer, Check, Decision
from nodekeeper.state import disk as statedisk
from nodekeeper.state import memory as statememory
from nodekeeper.state.memory import DB_NAME, SECRET_NAME, Health, State
from tests.harness.mounts import Tmpfs

REF = "docker.io/library/postgres:15"
REPO = "docker.io/library/postgres"
FAST = {"retry_first": 0.005, "retry_max": 0.02}


def decision(n: int) -> Answer:
    return Answer(at=float(n), image=f"img{n}", rule="defaults", decision=Decision.FRESH,
                  reason="digest unchanged", node_digest=f"sha256:{n:064x}",
                  upstream_digest=f"sha256:{n:064x}", duration_ms=1.5)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


def rows(directory: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro",
                                            uri=True)) as db:
        return db.execute(sql).fetchall()


def record_some(state: State, n: int = 0) -> None:
    state.record_check(f"{REF}{n}", None, f"sha256:{n}", now=100.0 + n)
    state.record_access(REPO, ANONYMOUS, now=100.0 + n)
    state.record_access(REPO, f"fp{n}", now=100.0 + n)
    state.record_decision(decision(n))
    state.set_meta("backing", f"down {n}")


def assert_all_on_disk(directory: Path, numbers: range, keyed: bool = True) -> None:
    checks = {r[0] for r in rows(directory, "SELECT reference FROM checks")}
    assert checks == {f"{REF}{n}" for n in numbers}
    access = {r[0] for r in rows(directory, "SELECT fingerprint FROM access")}
    assert access == {ANONYMOUS} | ({f"fp{n}" for n in numbers} if keyed else set())
    images = {r[0] for r in rows(directory, "SELECT image FROM decisions")}
    assert {f"img{n}" for n in numbers} <= images
    assert rows(directory, "SELECT value FROM meta") == [(f"down {numbers[-1]}",)]


class Healths:
    def __init__(self) -> None:
        self.seen: list[Health] = []

    def __call__(self, health: Health) -> None:
        self.seen.append(health)

    @property
    def last(self) -> Health:
        return self.seen[-1]


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short waits where nothing here depends on their length: for a lock held elsewhere,
    and for more writes to join a batch."""
    monkeypatch.setattr(statedisk, "BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr(statememory, "FLUSH_DELAY", 0.005)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Tmpfs]:
    with Tmpfs(tmp_path / "disk", size=4 << 20) as mounted:
        yield mounted


@pytest.fixture
def states() -> Iterator[Callable[..., State]]:
    opened: list[State] = []

    def make(directory: Path, **kwargs: object) -> State:
        state = State(directory, **{**FAST, **kwargs})  # type: ignore[arg-type]
        opened.append(state)
        return state

    yield make
    for state in opened:
        state.close()


class Sessions:
    """Counts the writer's sessions with the disk (its attempts to write), and tells when
    one has begun and when one has ended."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ended = 0
        self.entered, self.left = threading.Event(), threading.Event()
        real = statedisk.session

        @contextlib.contextmanager
        def counted(directory: Path, check: bool = False) -> Iterator[object]:
            self.entered.set()
            try:
                with real(directory, check) as opened:
                    yield opened
            finally:
                self.ended += 1
                self.left.set()

        monkeypatch.setattr(statedisk, "session", counted)

    def wait_for(self, more: int) -> None:
        """Until `more` sessions beyond those ended so far have ended."""
        target = self.ended + more
        eventually(lambda: self.ended >= target)


# -- while running ---------------------------------------------------------------------------

def test_a_locked_database_never_makes_a_caller_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        states: Callable[..., State]) -> None:
    # The writer waits up to a minute for the lock: a caller waiting for it would too.
    monkeypatch.setattr(statedisk, "BUSY_TIMEOUT_MS", 60_000)
    healths = Healths()
    state = states(tmp_path / "s", on_health=healths)
    record_some(state, 0)
    assert state.flush()
    sessions = Sessions(monkeypatch)
    holder = sqlite3.connect(tmp_path / "s" / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        record_some(state, 1)
        assert sessions.entered.wait(30)  # the writer is at the lock now
        for n in range(2, 50):
            record_some(state, n)
        assert state.check(f"{REF}49") == Check(149.0, "ok", 149.0, "sha256:49")
        assert not sessions.left.is_set()  # every record above was made while it waited
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert state.flush()
    assert_all_on_disk(tmp_path / "s", range(50))
    assert [h.persistent for h in healths.seen] == [True]


def test_a_locked_database_is_reported_once_and_written_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        states: Callable[..., State]) -> None:
    healths = Healths()
    state = states(tmp_path / "s", on_health=healths)
    record_some(state, 0)
    assert state.flush()
    sessions = Sessions(monkeypatch)
    holder = sqlite3.connect(tmp_path / "s" / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for n in range(1, 50):
            record_some(state, n)
        assert not state.flush(timeout=30)
        eventually(lambda: not state.health.persistent)
        assert "locked" in state.health.problem
        sessions.wait_for(3)  # retried, failing each time
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    eventually(lambda: state.health.persistent)
    assert state.flush()
    assert_all_on_disk(tmp_path / "s", range(50))
    assert [h.persistent for h in healths.seen] == [True, False, True]


def test_a_file_system_going_read_only_and_back(disk: Tmpfs, monkeypatch: pytest.MonkeyPatch,
                                                states: Callable[..., State]) -> None:
    state = states(disk.path / "s")
    record_some(state, 0)
    assert state.flush()
    sessions = Sessions(monkeypatch)
    disk.read_only()
    with capture_logs() as logs:
        for n in range(1, 30):
            record_some(state, n)
            if n % 5 == 0:  # writes between failing attempts, not only before them
                sessions.wait_for(1)
        eventually(lambda: not state.health.persistent)
        assert "Read-only file system" in state.health.problem
        assert state.health.pending > 0
        sessions.wait_for(5)  # several retries, all failing
        disk.writable()
        eventually(lambda: state.health.persistent)
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1  # once per episode, however many writes and retries
    assert errors[0]["event"].startswith("state storage failed")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "state storage works again; memory written back"]
    assert state.flush()
    assert_all_on_disk(disk.path / "s", range(30))


def test_a_full_file_system_and_space_again(disk: Tmpfs,
                                            states: Callable[..., State]) -> None:
    state = states(disk.path / "s")
    record_some(state, 0)
    assert state.flush()
    filler = disk.fill()
    for n in range(1, 200):
        record_some(state, n)
        state.record_check(f"{REF}{n}", None, "sha256:" + "f" * 2000, now=100.0 + n)
    assert not state.flush(timeout=2)
    assert not state.health.persistent
    assert "full" in state.health.problem or "No space" in state.health.problem
    filler.unlink()
    eventually(lambda: state.health.persistent)
    assert state.flush()
    assert_all_on_disk(disk.path / "s", range(200))


def test_the_directory_deleted_while_running(tmp_path: Path,
                                             states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    state = states(directory)
    record_some(state, 0)
    assert state.flush()
    key = (directory / SECRET_NAME).read_bytes()
    shutil.rmtree(directory)
    record_some(state, 1)
    assert state.flush()
    # A new database, holding everything in memory, not just what came after.
    assert_all_on_disk(directory, range(2))
    assert (directory / SECRET_NAME).read_bytes() == key == state.key


def test_the_database_replaced_by_a_directory(tmp_path: Path,
                                              states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    state = states(directory)
    record_some(state, 0)
    assert state.flush()
    (directory / DB_NAME).unlink()
    (directory / DB_NAME).mkdir()
    record_some(state, 1)
    assert state.flush()
    assert_all_on_disk(directory, range(2))
    assert len(list(directory.glob(f"{DB_NAME}.corrupt-*"))) == 1


def test_the_database_replaced_by_another_database(tmp_path: Path,
                                                   states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    state = states(directory)
    record_some(state, 0)
    assert state.flush()
    replacement = tmp_path / "other.db"
    sqlite3.connect(replacement).close()
    os.replace(replacement, directory / DB_NAME)
    record_some(state, 1)
    assert state.flush()
    assert_all_on_disk(directory, range(2))


# -- at start --------------------------------------------------------------------------------

def test_starts_on_an_empty_read_only_directory_and_writes_back_later(
        disk: Tmpfs, states: Callable[..., State]) -> None:
    disk.read_only()
    healths = Healths()
    with capture_logs() as logs:
        state = states(disk.path, on_health=healths)
    assert not healths.last.persistent
    assert "Read-only file system" in healths.last.problem
    assert "fingerprint key in memory" in healths.last.summary()
    assert len(state.key) == 32
    assert {e["event"].split(";")[0] for e in logs if e["log_level"] == "error"} == {
        "fingerprint key not usable", "state storage failed"}
    record_some(state, 0)
    assert state.seen_working(REPO, "fp0")
    disk.writable()
    eventually(lambda: state.health.persistent and not state.health.key_problem)
    assert state.flush()
    # The key made in memory is stored now, so fingerprints made with it are kept too.
    assert (disk.path / SECRET_NAME).read_bytes() == state.key
    assert_all_on_disk(disk.path, range(1))


def test_starts_on_a_read_only_directory_with_state_and_reads_it(
        disk: Tmpfs, states: Callable[..., State]) -> None:
    first = State(disk.path)
    record_some(first, 0)
    first.close()
    disk.read_only()
    state = states(disk.path)
    assert state.check(f"{REF}0") == Check(100.0, "ok", 100.0, "sha256:0")
    assert state.seen_working(REPO, "fp0")
    assert state.key == (disk.path / SECRET_NAME).read_bytes()
    assert state.health.key_problem == ""
    assert not state.health.persistent
    record_some(state, 1)
    disk.writable()
    eventually(lambda: state.health.persistent)
    assert state.flush()
    assert_all_on_disk(disk.path, range(2))


def test_starts_with_a_file_in_place_of_the_directory(tmp_path: Path,
                                                      states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    directory.write_text("not a directory")
    state = states(directory)
    assert not state.health.persistent
    record_some(state, 0)
    assert state.check(f"{REF}0") is not None
    directory.unlink()
    eventually(lambda: state.health.persistent)
    assert state.flush()
    assert_all_on_disk(directory, range(1))


def test_starts_under_a_file_in_place_of_a_parent(tmp_path: Path,
                                                  states: Callable[..., State]) -> None:
    (tmp_path / "parent").write_text("")
    state = states(tmp_path / "parent" / "s")
    assert not state.health.persistent
    assert "Not a directory" in state.health.problem or "exists" in state.health.problem


def test_an_unreadable_key_is_replaced_in_memory_and_keyed_records_stay_there(
        tmp_path: Path, states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    (directory / SECRET_NAME).mkdir(parents=True)
    with capture_logs() as logs:
        state = states(directory)
    assert len(state.key) == 32
    assert "Is a directory" in state.health.key_problem
    assert state.health.persistent
    assert "fingerprint key not usable" in logs[0]["event"]
    record_some(state, 0)
    assert state.seen_working(REPO, "fp0")
    assert state.flush()
    # Only the anonymous record means anything to the next run, with another key.
    assert_all_on_disk(directory, range(1), keyed=False)


def test_a_directory_that_does_not_answer_delays_start_only_briefly(
        tmp_path: Path) -> None:
    directory = tmp_path / "s"
    directory.mkdir()
    os.mkfifo(directory / SECRET_NAME)  # reading it waits for a writer: a hung disk
    started = time.monotonic()
    state = State(directory, open_wait=0.05, **FAST)  # type: ignore[arg-type]
    try:
        assert time.monotonic() - started < 30  # not for as long as the disk hangs
        assert "did not answer within 0.05s" in state.health.key_problem
        assert not state.health.persistent
        key = state.key
        with (directory / SECRET_NAME).open("wb") as writer:  # the disk answers at last
            writer.write(b"k" * 32)
        eventually(lambda: state.health.persistent)
        assert state.key == key  # settled at start, for the whole run
        assert state.health.key_problem
    finally:
        state.close()


# -- no memory-mapped files ------------------------------------------------------------------

def mapped_state_files(directory: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(directory) in line]


def test_a_session_maps_no_file(tmp_path: Path) -> None:
    with statedisk.session(tmp_path) as (db, _):
        statedisk.write(db, statedisk.Records(checks={REF: Check(1.0, "ok", 1.0, "d")}))
        assert mapped_state_files(tmp_path) == []
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "delete"
        assert db.execute("PRAGMA mmap_size").fetchone()[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


def test_a_wal_database_of_an_earlier_version_is_converted_without_mapping_it(
        tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / DB_NAME)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(statedisk._SCHEMA)
    old.execute("INSERT INTO checks VALUES (?, 1.0, 'ok', 1.0, 'd')", (REF,))
    old.commit()
    old.close()
    # Where its shared-memory file would go, something that cannot be opened as one: the
    # session must never try.
    (tmp_path / f"{DB_NAME}-shm").mkdir()
    with statedisk.session(tmp_path) as (db, _):
        assert mapped_state_files(tmp_path) == []
        assert db.execute("SELECT reference FROM checks").fetchall() == [(REF,)]
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as after:
        assert after.execute("PRAGMA journal_mode").fetchone()[0].lower() == "delete"


def test_a_problem_that_changes_within_an_episode_is_logged_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        states: Callable[..., State]) -> None:
    state = states(tmp_path / "s")
    problems = iter([OSError(30, "Read-only file system"),
                     sqlite3.OperationalError("database is locked")] * 3)
    real = statedisk.session

    @contextlib.contextmanager
    def failing(directory: Path, check: bool = False) -> Iterator[object]:
        problem = next(problems, None)
        if problem is not None:
            raise problem
        with real(directory, check) as opened:
            yield opened

    monkeypatch.setattr(statedisk, "session", failing)
    with capture_logs() as logs:
        record_some(state, 0)
        eventually(lambda: state.health.persistent and state.flush())
    assert [e["log_level"] for e in logs] == ["error", "warning"]


def test_a_state_shared_by_threads_stays_consistent(tmp_path: Path,
                                                    states: Callable[..., State]) -> None:
    state = states(tmp_path / "s")

    def writer(n: int) -> None:
        for i in range(200):
            state.record_check(f"{REF}-{n}-{i}", None, "d", now=float(i))
            state.record_access(REPO, f"fp{n}-{i}", now=float(i))
            state.fingerprints(REPO)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert state.flush()
    assert len(rows(tmp_path / "s", "SELECT reference FROM checks")) == 800
    assert len(state.fingerprints(REPO)) == 800


def test_no_file_is_mapped_even_where_sqlite_maps_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sqlite3.connect

    def mapping_by_default(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = real(*args, **kwargs)  # type: ignore[arg-type]
        db.execute("PRAGMA mmap_size=268435456")  # a build with SQLITE_DEFAULT_MMAP_SIZE
        return db

    monkeypatch.setattr(statedisk.sqlite3, "connect", mapping_by_default)
    with statedisk.session(tmp_path) as (db, _):
        statedisk.write(db, statedisk.Records(checks={REF: Check(1.0, "ok", 1.0, "d")}))
        db.execute("SELECT * FROM checks").fetchall()
        assert mapped_state_files(tmp_path) == []


def test_a_database_locked_at_start_is_waited_for_not_moved_aside(
        tmp_path: Path, states: Callable[..., State]) -> None:
    directory = tmp_path / "s"
    first = State(directory)
    record_some(first, 0)
    first.close()
    holder = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        state = states(directory)
        assert not state.health.persistent
        assert "locked" in state.health.problem
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    eventually(lambda: state.health.persistent)
    assert list(directory.glob(f"{DB_NAME}.corrupt-*")) == []
    record_some(state, 1)
    assert state.flush()
    assert_all_on_disk(directory, range(2))
