"""Reading a settings file costs bounded time and memory, whatever the file holds."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from nodekeeper import config, settings
from nodekeeper.errors import SettingsError
from nodekeeper.pull import policy
from nodekeeper.settings import MAX_DEPTH, Document, format_size


def read(tmp_path: Path, text: str | bytes, limit: int = 1 << 20) -> Document:
    path = tmp_path / "file.yaml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return Document.read(path, limit)


def refused(tmp_path: Path, text: str | bytes, limit: int = 1 << 20) -> str:
    with pytest.raises(SettingsError) as info:
        read(tmp_path, text, limit)
    return str(info.value)


def billion_laughs(levels: int) -> str:
    """Each level's list names the previous level ten times: 10**levels values in all."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for n in range(1, levels):
        lines.append(f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


# -- size ------------------------------------------------------------------------------------

def test_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    text = "a: b\n# " + "x" * 90 + "\n"
    assert read(tmp_path, text, limit=len(text)).value == {"a": "b"}


def test_a_file_over_the_limit_is_refused_naming_file_and_limit(tmp_path: Path) -> None:
    text = "a: b\n# " + "x" * 90 + "\n"
    message = refused(tmp_path, text, limit=len(text) - 1)
    assert message.startswith(f"{tmp_path / 'file.yaml'}: larger than ")
    assert f"{len(text) - 1} bytes" in message


def test_policy_and_config_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * policy.MAX_POLICY_BYTES + "\n")
    with pytest.raises(SettingsError, match=f"{big}: larger than 1 MiB"):
        policy.load(big)
    big.write_text("# " + "x" * config.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(SettingsError, match=f"{big}: larger than 256 KiB"):
        config.load(str(big))


def test_format_size() -> None:
    assert format_size(1 << 20) == "1 MiB"
    assert format_size(256 << 10) == "256 KiB"
    assert format_size(1000) == "1000 bytes"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    refusals: list[str] = []

    def read() -> None:
        with pytest.raises(SettingsError, match="not a regular file") as info:
            Document.read(fifo, 1 << 20)
        refusals.append(str(info.value))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    waiting = reader.is_alive()
    if waiting:  # a writer at last, so that the reader ends
        with fifo.open("wb"):
            pass
    assert not waiting, "the reader waited for a writer"
    assert len(refusals) == 1


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        Document.read(tmp_path, 1 << 20)


def test_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    assert "not UTF-8" in refused(tmp_path, b"a: \xff\xfe\n")


# -- anchors and aliases ---------------------------------------------------------------------

def test_nested_aliases_are_refused_at_once_naming_the_line(tmp_path: Path) -> None:
    text = billion_laughs(9)  # a billion values expanded; a few hundred bytes written
    assert len(text) < 600
    message = refused(tmp_path, text)
    # Refused at the first anchor, on line 1: nothing was expanded.
    assert message.startswith(f"{tmp_path / 'file.yaml'}:1: not valid YAML: anchors and ")


def test_an_alias_alone_is_refused_at_its_line(tmp_path: Path) -> None:
    text = "defaults: {update: always}\nrules:\n  - match: a/b\n  - *x\n"
    message = refused(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'file.yaml'}:4: ")
    assert "aliases" in message


def test_merge_keys_need_aliases_and_are_refused(tmp_path: Path) -> None:
    text = "base: &base {update: always}\nrules:\n  - <<: *base\n    match: a/b\n"
    assert "anchors and aliases" in refused(tmp_path, text)


# -- shape -----------------------------------------------------------------------------------

def test_nesting_at_the_limit_is_read(tmp_path: Path) -> None:
    read(tmp_path, "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")


def test_deeper_nesting_is_refused(tmp_path: Path) -> None:
    text = "a: b\nc: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n"
    message = refused(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'file.yaml'}:2: ")
    assert f"deeper than {MAX_DEPTH}" in message


def test_very_deep_nesting_is_refused_without_recursion_error(tmp_path: Path) -> None:
    assert "not valid YAML" in refused(tmp_path, "[" * 100_000)


def test_values_over_the_count_are_refused(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A smaller count, the same bound: composing 50,000 values takes most of a second.
    count = 2000
    monkeypatch.setattr(settings, "MAX_NODES", count)
    ok = "x: [" + ", ".join(["a"] * (count - 3)) + "]\n"  # document, key, list
    assert len(read(tmp_path, ok).value["x"]) == count - 3
    message = refused(tmp_path, "x:\n" + "  - a\n" * 150_000)
    assert f"more than {count} values" in message
    # Refused where the count ran out (document, key, list, then one item a line), not
    # after composing the 150,000 values that follow.
    assert message.startswith(f"{tmp_path / 'file.yaml'}:{count - 1}: ")


def test_a_number_python_will_not_convert_is_refused(tmp_path: Path) -> None:
    # Python refuses to turn more than 4300 digits into an int (CVE-2020-10735).
    message = refused(tmp_path, "a: " + "9" * 5000 + "\n")
    assert message.startswith(f"{tmp_path / 'file.yaml'}: not valid YAML: ")
