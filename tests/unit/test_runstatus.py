"""The running daemon's view for `status`: a typed record, read back whatever version
wrote it, and only while its writer lives."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nodekeeper.failures import Kind
from nodekeeper.host import runstatus
from nodekeeper.host.looplag import Lag
from nodekeeper.host.runstatus import RunStatus
from nodekeeper.registry.outage import Outage
from nodekeeper.state.memory import Health

FULL = RunStatus(pid=os.getpid(), written_at=1700000000.5,
                 state=Health(persistent=False, problem="No space left on device: x",
                              since=1699999000.0, key_problem="", pending=3),
                 loop_lag=Lag(worst_s=0.25, worst_at=1699999500.0, last_minute_s=0.01),
                 outages=(Outage("mirror.test:5000", 1699999900.0, Kind.TIMEOUT,
                                 "no answer within probe_timeout 2s", answered=12),
                          Outage("registry.test", 1699999950.0, Kind.UNREACHABLE,
                                 "connection refused")))


def test_written_and_read_back_as_it_was(tmp_path: Path) -> None:
    path = runstatus.path_for(str(tmp_path / "cri.sock"))
    assert path == tmp_path / "cri.status"
    assert runstatus.read(path) is None
    runstatus.write(path, FULL)
    assert runstatus.read(path) == FULL
    assert [p.name for p in tmp_path.iterdir()] == ["cri.status"]
    runstatus.remove(path)
    runstatus.remove(path)
    assert not path.exists()


def test_none_once_its_writer_is_gone_or_the_file_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "cri.status"
    runstatus.write(path, RunStatus(pid=2**22 + 12345))  # above pid_max: no one
    assert runstatus.read(path) is None
    for text in ("{not json", "[]", '{"state": null}', '{"pid": "1"}', '{"pid": true}'):
        path.write_text(text)
        assert runstatus.read(path) is None, text
    path.write_bytes(b"\xff\xfe")
    assert runstatus.read(path) is None


def test_missing_unknown_and_mistyped_keys_take_the_defaults() -> None:
    older = json.dumps({"pid": 7, "state": {"persistent": True, "pending": "many"},
                        "loop_lag": {"worst_s": 1}, "outages": [{"registry": "x"}]})
    assert RunStatus.from_json(older) == RunStatus(
        pid=7, state=Health(persistent=True), loop_lag=None)
    integers = json.dumps({"pid": 7, "written_at": 5,
                           "loop_lag": {"worst_s": 1, "worst_at": 2, "last_minute_s": 0}})
    read = RunStatus.from_json(integers)
    assert read is not None
    assert read.loop_lag == Lag(1.0, 2.0, 0.0)
    assert read.written_at == 5.0


def test_outages_read_back_as_kinds_and_bad_entries_are_left_out() -> None:
    text = json.dumps({"pid": 7, "outages": [
        {"endpoint": "a.test", "since": 1, "kind": "timeout", "detail": "d", "answered": 2},
        {"endpoint": "b.test", "since": 1, "kind": "no-such-kind", "detail": "d"},
        "not a record"]})
    read = RunStatus.from_json(text)
    assert read is not None
    assert read.outages == (Outage("a.test", 1.0, Kind.TIMEOUT, "d", 2),)
