"""What `status` and `explain` read of the state database: typed records, never SQL."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodekeeper.errors import StateUnreadable
from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import ANONYMOUS
from nodekeeper.pull.edges import Answer, Check, Decision
from nodekeeper.state import view
from nodekeeper.state.disk import DB_NAME, Stale
from nodekeeper.state.memory import State

REF = "docker.io/library/postgres:15"
REPO = "docker.io/library/postgres"
OTHER = "registry.test/app:v1"


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    opened = State(tmp_path / "state")
    try:
        yield opened
    finally:
        opened.close()


def decided(n: int) -> Answer:
    return Answer(at=float(n), image=f"img{n}", rule="defaults", decision=Decision.FRESH,
                  reason="digest unchanged", node_digest="sha256:a",
                  upstream_digest="sha256:a", duration_ms=1.5)


def shown_as(n: int) -> view.Decided:
    return view.Decided(float(n), f"img{n}", "defaults", "fresh", "digest unchanged",
                        "sha256:a", "sha256:a", 1.5)


def test_no_database_is_none_and_creates_nothing(tmp_path: Path) -> None:
    assert view.status(tmp_path / "state", decisions=5) is None
    assert view.reference(tmp_path / "state", REF, REPO) is None
    assert not (tmp_path / "state").exists()


def test_one_reference_and_who_pulled_its_repository(state: State) -> None:
    state.record_check(REF, None, "sha256:b", now=50.0)
    state.record_access(REPO, ANONYMOUS)
    state.record_access(REPO, "fp1")
    state.record_access(REPO, "fp2")
    state.record_access("docker.io/library/redis", "fp3")
    assert state.flush()
    shown = view.reference(state.directory, REF, REPO)
    assert shown == view.ReferenceView(check=Check(50.0, "ok", 50.0, "sha256:b"),
                                       access=view.Access(anonymous=True, credentials=2))
    never = view.reference(state.directory, OTHER, "registry.test/app")
    assert never == view.ReferenceView(check=None,
                                       access=view.Access(anonymous=False, credentials=0))


def test_status_newest_decisions_first_stale_longest_first_checks_in_order(
        state: State) -> None:
    for n in range(5):
        state.record_decision(decided(n))
    state.record_check(REF, None, "sha256:b", now=50.0)
    state.record_check(OTHER, Kind.TIMEOUT, now=60.0)
    state.mark_stale(OTHER, "sha256:c", Kind.TIMEOUT, now=300.0)
    state.mark_stale(REF, "sha256:b", Kind.UNREACHABLE, now=200.0)
    state.set_meta("backing", "down: refused")
    assert state.flush()
    shown = view.status(state.directory, decisions=3)
    assert shown is not None
    assert shown.decisions == [shown_as(4), shown_as(3), shown_as(2)]
    assert list(shown.stale.items()) == [
        (REF, Stale("sha256:b", "unreachable", 200.0, 200.0)),
        (OTHER, Stale("sha256:c", "timeout", 300.0, 300.0))]
    assert list(shown.checks) == [REF, OTHER]
    assert shown.checks[OTHER] == Check(60.0, "timeout", None, "")
    assert shown.backing is not None
    assert shown.backing.value == "down: refused"


def test_a_database_from_before_an_upgrade_reads_its_missing_tables_as_empty(
        tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / DB_NAME)) as db:
        db.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, at REAL, image TEXT, "
                   "rule TEXT, decision TEXT, reason TEXT, local_digest TEXT, "
                   "upstream_digest TEXT, duration_ms REAL)")
        db.commit()
    shown = view.status(tmp_path / "state", decisions=5)
    assert shown == view.StatusView(backing=None, stale={}, decisions=[], checks={})


def test_something_other_than_a_database_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "state" / DB_NAME).mkdir(parents=True)
    with pytest.raises(StateUnreadable, match=DB_NAME):
        view.status(tmp_path / "state", decisions=5)
    (tmp_path / "state" / DB_NAME).rmdir()
    (tmp_path / "state" / DB_NAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateUnreadable):
        view.reference(tmp_path / "state", REF, REPO)


def test_reading_writes_nothing(state: State) -> None:
    state.record_decision(decided(1))
    assert state.flush()
    before = sorted(p.name for p in state.directory.iterdir())
    data = (state.directory / DB_NAME).read_bytes()
    assert view.status(state.directory, decisions=5) is not None
    assert sorted(p.name for p in state.directory.iterdir()) == before
    assert (state.directory / DB_NAME).read_bytes() == data
