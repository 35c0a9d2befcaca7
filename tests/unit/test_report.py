"""`nodekeeper status` shows what only the running daemon knows, from its status file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nodekeeper.commands import report
from nodekeeper.config import Config
from nodekeeper.failures import Kind
from nodekeeper.host import runstatus
from nodekeeper.host.looplag import Lag
from nodekeeper.registry.outage import Outage
from nodekeeper.state.memory import Health


def config(tmp_path: Path) -> Config:
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    return Config(listen=str(tmp_path / "cri.sock"), state_dir=str(tmp_path / "state"),
                  policy_file=str(tmp_path / "policy.yaml"))


def publish(tmp_path: Path, state: Health | None, outages: tuple[Outage, ...] = ()) -> None:
    runstatus.write(runstatus.path_for(str(tmp_path / "cri.sock")), runstatus.RunStatus(
        pid=os.getpid(), written_at=time.time(), state=state,
        loop_lag=Lag(worst_s=0.0123, worst_at=time.time() - 120, last_minute_s=0.002),
        outages=outages))


def test_no_daemon(tmp_path: Path) -> None:
    shown = report.status(config(tmp_path))
    assert "daemon:  not running" in shown
    assert f"state:   no database in {tmp_path / 'state'}" in shown


def test_state_in_memory_and_the_loop(tmp_path: Path) -> None:
    publish(tmp_path, Health(persistent=False, problem="Read-only file system: x",
                             since=time.time() - 300, pending=7))
    shown = report.status(config(tmp_path))
    assert (f"daemon:  pid {os.getpid()}; state IN MEMORY ONLY since 5.0m ago: Read-only "
            "file system: x; retrying, 7 records waiting") in shown
    assert "loop:    worst lag 12.3 ms (2.0m ago), last minute 2.0 ms" in shown


def test_state_on_disk_with_a_key_in_memory(tmp_path: Path) -> None:
    publish(tmp_path, Health(persistent=True, since=time.time(),
                             key_problem="cannot read it"))
    assert "; state fingerprint key in memory: cannot read it" in report.status(
        config(tmp_path))


def test_state_not_reported_yet(tmp_path: Path) -> None:
    publish(tmp_path, None)
    assert "; state not reported yet" in report.status(config(tmp_path))


def test_an_unreadable_database_is_not_called_missing(tmp_path: Path) -> None:
    (tmp_path / "state" / "state.db").mkdir(parents=True)
    assert "state:   database unreadable in" in report.status(config(tmp_path))


def test_a_status_file_from_an_older_daemon_still_shows(tmp_path: Path) -> None:
    # Written before the record had written_at and loop_lag, with a key it no longer has.
    runstatus.path_for(str(tmp_path / "cri.sock")).write_text(json.dumps(
        {"pid": os.getpid(), "state": {"persistent": True}, "gone": 1}))
    shown = report.status(config(tmp_path))
    assert f"daemon:  pid {os.getpid()}; state on disk" in shown
    assert "loop:    not reported yet" in shown


def test_open_outages_are_listed(tmp_path: Path) -> None:
    publish(tmp_path, Health(persistent=True, since=time.time()))
    assert "outages: none" in report.status(config(tmp_path))
    publish(tmp_path, Health(persistent=True, since=time.time()), outages=(
        Outage("registry.test:5000", time.time() - 90, Kind.TIMEOUT,
               "no answer within probe_timeout 2s", answered=9),))
    shown = report.status(config(tmp_path))
    assert "outages: 1 (registry endpoints that did not answer" in shown
    assert ("  registry.test:5000: timeout since 1.5m ago, 9 pulls answered without it "
            "(no answer within probe_timeout 2s)") in shown


def test_status_as_json_carries_the_schema_and_what_the_daemon_reported(
        tmp_path: Path) -> None:
    publish(tmp_path, Health(persistent=False, problem="disk full", since=1000.0, pending=3))
    shown = json.loads(json.dumps(report.render_json(report.gather(config(tmp_path)))))
    assert shown["schema"] == "nodekeeper.status/v1"
    assert shown["policy"] == {"file": str(tmp_path / "policy.yaml"), "valid": True,
                               "rules": 0, "error": None}
    assert shown["daemon"]["pid"] == os.getpid()
    assert shown["daemon"]["state"] == {"persistent": False, "problem": "disk full",
                                        "since": 1000.0, "pending": 3, "key_problem": None}
    assert shown["daemon"]["loop_lag"]["worst_seconds"] == 0.0123
    assert shown["state"] == {"directory": str(tmp_path / "state"), "database": False,
                              "error": None}
    assert shown["stale"] == shown["decisions"] == shown["checks"] == []
    assert shown["behind_tag"] == []


def test_an_invalid_policy_shows_in_json(tmp_path: Path) -> None:
    settings = config(tmp_path)
    (tmp_path / "policy.yaml").write_text("rules: [\n")
    shown = report.render_json(report.gather(settings))
    assert shown["policy"]["valid"] is False
    assert shown["policy"]["rules"] is None
    assert shown["policy"]["error"]
