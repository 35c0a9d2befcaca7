"""nodekeeper's memory: checks, access records, decisions, the key, and surviving damage."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodekeeper.failures import Kind
from nodekeeper.pull.edges import Answer, Check, Decision
from nodekeeper.state import view
from nodekeeper.state.disk import Stale
from nodekeeper.state.memory import (
    DB_NAME,
    KEEP_DECISIONS,
    SECRET_NAME,
    State,
)

REF = "docker.io/library/postgres:15"
REPO = "docker.io/library/postgres"


@pytest.fixture
def tmp_path(ram_path: Path) -> Path:
    """In memory: nothing here is about the disk (see tests/unit/conftest.py)."""
    return ram_path


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    opened = State(tmp_path / "state")
    try:
        yield opened
    finally:
        opened.close()


def reopen(state: State) -> State:
    state.close()
    return State(state.directory)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def decision(n: int) -> Answer:
    return Answer(at=float(n), image=f"img{n}", rule="defaults", decision=Decision.FRESH,
                  reason="digest unchanged", node_digest=f"sha256:{n:064x}",
                  upstream_digest=f"sha256:{n:064x}", duration_ms=1.5)


def decision_count(directory: Path) -> int:
    with contextlib.closing(sqlite3.connect(directory / DB_NAME)) as db:
        row = db.execute("SELECT COUNT(*) FROM decisions").fetchone()
    return int(row[0])


# -- checks ----------------------------------------------------------------------------------

def test_unknown_reference_has_no_check(state: State) -> None:
    assert state.check(REF) is None


def test_successful_check(state: State) -> None:
    state.record_check(REF, None, "sha256:a", now=100.0)
    assert state.check(REF) == Check(100.0, "ok", 100.0, "sha256:a")


def test_failed_check_keeps_the_last_success(state: State) -> None:
    state.record_check(REF, None, "sha256:a", now=100.0)
    state.record_check(REF, Kind.TIMEOUT, now=200.0)
    assert state.check(REF) == Check(200.0, "timeout", 100.0, "sha256:a")
    state.record_check(REF, Kind.UNREACHABLE, now=300.0)
    assert state.check(REF) == Check(300.0, "unreachable", 100.0, "sha256:a")
    state.record_check(REF, None, "sha256:b", now=400.0)
    assert state.check(REF) == Check(400.0, "ok", 400.0, "sha256:b")


def test_failure_without_any_success(state: State) -> None:
    state.record_check(REF, Kind.NOT_FOUND, "sha256:ignored", now=50.0)
    assert state.check(REF) == Check(50.0, "not_found", None, "")


def test_checks_are_per_reference(state: State) -> None:
    state.record_check(REF, None, "sha256:a", now=1.0)
    state.record_check(REF + "x", Kind.TIMEOUT, now=2.0)
    check = state.check(REF)
    assert check is not None
    assert check.result == "ok"
    other = state.check(REF + "x")
    assert other is not None
    assert other.ok_at is None


def test_record_check_defaults_to_the_wall_clock(state: State) -> None:
    before = time.time()
    state.record_check(REF, None, "sha256:a")
    after = time.time()
    check = state.check(REF)
    assert check is not None
    assert before <= check.checked_at <= after
    assert check.ok_at == check.checked_at


# -- access ----------------------------------------------------------------------------------

def test_access_records(state: State) -> None:
    assert not state.seen_working(REPO, "anonymous")
    assert state.fingerprints(REPO) == set()
    state.record_access(REPO, "fp1", now=1.0)
    state.record_access(REPO, "fp2", now=2.0)
    state.record_access(REPO, "fp1", now=3.0)
    state.record_access("ghcr.io/other", "fp3", now=4.0)
    assert state.seen_working(REPO, "fp1")
    assert not state.seen_working(REPO, "fp3")
    assert not state.seen_working("ghcr.io/other", "fp1")
    assert state.fingerprints(REPO) == {"fp1", "fp2"}


def test_access_times_are_kept(state: State) -> None:
    state.record_access(REPO, "fp1", now=1.0)
    state.record_access(REPO, "fp1", now=5.0)
    assert state.flush()
    with contextlib.closing(sqlite3.connect(state.directory / DB_NAME)) as db:
        rows = db.execute("SELECT first_ok, last_ok FROM access").fetchall()
    assert rows == [(1.0, 5.0)]


# -- persistence -----------------------------------------------------------------------------

def test_everything_survives_a_restart(tmp_path: Path) -> None:
    first = State(tmp_path)
    first.record_check(REF, None, "sha256:a", now=100.0)
    first.record_check(REF, Kind.SERVER_ERROR, now=150.0)
    first.record_access(REPO, "fp1", now=100.0)
    first.record_decision(decision(1))
    key = first.key
    second = reopen(first)
    try:
        assert second.check(REF) == Check(150.0, "server_error", 100.0, "sha256:a")
        assert second.seen_working(REPO, "fp1")
        assert second.key == key
    finally:
        second.close()
    assert decision_count(tmp_path) == 1


def test_the_view_beside_the_daemon_sees_decisions(state: State) -> None:
    state.record_decision(decision(7))
    assert state.flush()
    shown = view.status(state.directory, decisions=10)
    assert shown is not None
    (decided,) = shown.decisions
    recorded = decision(7)
    assert decided == view.Decided(recorded.at, recorded.image, recorded.rule,
                                   recorded.decision.value, recorded.reason,
                                   recorded.node_digest, recorded.upstream_digest,
                                   recorded.duration_ms)


def test_decisions_are_trimmed(state: State) -> None:
    total = KEEP_DECISIONS + 250
    for n in range(total):
        state.record_decision(decision(n))
        if n % 300 == 0:
            assert state.flush()
    assert state.flush()
    count = decision_count(state.directory)
    # Trimming runs every so often, never below KEEP_DECISIONS and never far above.
    assert KEEP_DECISIONS <= count < total
    with contextlib.closing(sqlite3.connect(state.directory / DB_NAME)) as db:
        newest = db.execute("SELECT image FROM decisions ORDER BY id DESC LIMIT 1").fetchone()
        oldest = db.execute("SELECT MIN(at) FROM decisions").fetchone()
    assert newest == (f"img{total - 1}",)
    assert oldest[0] == float(total - count)


# -- the key ---------------------------------------------------------------------------------

def test_key_is_made_private_and_reused(tmp_path: Path) -> None:
    first = State(tmp_path)
    key_path = tmp_path / SECRET_NAME
    assert len(first.key) == 32
    assert key_path.read_bytes() == first.key
    assert mode(key_path) == 0o600
    second = reopen(first)
    try:
        assert second.key == first.key
    finally:
        second.close()


def test_each_node_gets_its_own_key(tmp_path: Path) -> None:
    one, two = State(tmp_path / "a"), State(tmp_path / "b")
    try:
        assert one.key != two.key
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_the_wrong_size_is_replaced(tmp_path: Path, size: int) -> None:
    key_path = tmp_path / SECRET_NAME
    key_path.write_bytes(b"k" * size)
    key_path.chmod(0o644)
    opened = State(tmp_path)
    try:
        assert len(opened.key) == 32
        assert opened.key != b"k" * size
        assert key_path.read_bytes() == opened.key
        assert mode(key_path) == 0o600
    finally:
        opened.close()


def test_existing_key_of_the_right_size_is_kept(tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / SECRET_NAME).write_bytes(key)
    opened = State(tmp_path)
    try:
        assert opened.key == key
    finally:
        opened.close()


# -- files -----------------------------------------------------------------------------------

def test_directory_is_created(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "state"
    opened = State(directory)
    try:
        assert directory.is_dir()
        assert (directory / DB_NAME).is_file()
    finally:
        opened.close()


def test_database_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        opened = State(tmp_path)
    finally:
        os.umask(old)
    try:
        opened.record_check(REF, None, "sha256:a", now=1.0)
        assert opened.flush()
        assert mode(tmp_path / DB_NAME) == 0o600
    finally:
        opened.close()


@pytest.mark.parametrize(
    "garbage",
    [b"this is not a database" * 200, bytes(range(256)) * 16,
     b"SQLite format 3\x00" + b"\xff" * 4000],
)
def test_corrupt_database_is_moved_aside_and_rebuilt(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / DB_NAME).write_bytes(garbage)
    opened = State(tmp_path)
    try:
        aside = sorted(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
        assert len(aside) == 1
        assert aside[0].read_bytes() == garbage
        assert opened.check(REF) is None
        opened.record_check(REF, None, "sha256:a", now=1.0)
        opened.record_access(REPO, "fp", now=1.0)
    finally:
        opened.close()
    again = State(tmp_path)
    try:
        assert again.check(REF) == Check(1.0, "ok", 1.0, "sha256:a")
        assert again.seen_working(REPO, "fp")
        assert len(list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))) == 1
    finally:
        again.close()
    assert mode(tmp_path / DB_NAME) == 0o600


def test_stale_references_survive_a_restart_until_cleared(state: State) -> None:
    digest = "sha256:" + "a" * 64
    state.mark_stale(REF, digest, Kind.UNREACHABLE, now=100.0)
    state.mark_stale(REF, digest, Kind.TIMEOUT, now=200.0)
    assert state.flush()
    shown = view.status(state.directory, decisions=0)
    assert shown is not None
    # `since` stays while the same copy stands in.
    assert shown.stale == {REF: Stale(digest, "timeout", 100.0, 200.0)}
    state = reopen(state)
    assert state.stale(REF) == digest
    state.clear_stale(REF)
    state = reopen(state)
    assert state.stale(REF) == ""
    state.close()
