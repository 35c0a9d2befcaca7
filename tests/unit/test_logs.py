"""Log output: priority prefixes under journald, and no credentials at any level."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from nodekeeper import logs


def journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> io.TextIOWrapper:
    stream = (tmp_path / "journal").open("w+")
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    return stream


def test_journald_lines_carry_syslog_priority(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    stream = journal_stream(tmp_path, monkeypatch)
    logs.setup("debug", "auto", stream)
    log = logs.get("test")
    log.debug("d")
    log.info("i")
    log.warning("w", image="x")
    log.error("e")
    stream.seek(0)
    lines = stream.read().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    warning = json.loads(lines[2][3:])
    assert warning["event"] == "w"
    assert warning["image"] == "x"
    assert "timestamp" not in warning  # journald stamps lines itself


def test_journal_stream_of_another_file_is_ignored(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    journal_stream(tmp_path, monkeypatch)
    other = io.StringIO()
    assert not logs.under_journald(other)
    logs.setup("info", "json", other)
    logs.get("test").info("plain")
    assert json.loads(other.getvalue())["event"] == "plain"


def test_level_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    logs.setup("warning", "json", out)
    logs.get("test").info("hidden")
    logs.get("test").warning("shown")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]


def test_credential_fields_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    logs.setup("debug", "json", out)
    logs.get("test").info("oops", password="hunter2", auth="dXNlcjpodW50ZXIy", user="u")
    assert "hunter2" not in out.getvalue()
    assert "dXNlcjpodW50ZXIy" not in out.getvalue()
    assert json.loads(out.getvalue())["user"] == "u"
