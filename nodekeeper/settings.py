"""Typed reading of YAML settings files, with errors that point at the line.

Config and policy files are both read through `Section`: each value is fetched with the
type it must have, and `Section.finish()` refuses keys nobody asked for. Every error
names the file, the line and the dotted key, and says what was expected.

Reading a file costs a bounded time and memory, whatever it holds: a file above its
limit is refused, and so are anchors and aliases (nested aliases expand exponentially:
a few hundred bytes can stand for gigabytes), nesting deeper than MAX_DEPTH and more
than MAX_NODES values.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml._yaml import CParser
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from nodekeeper.errors import SettingsError

Key = tuple[str | int, ...]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Policy and config files nest four levels at most; YAML's composer recurses per level.
MAX_DEPTH = 20
# Each value costs about 500 bytes and 12 us to compose: 50,000 stay under 30 MB and a
# second. A policy of 1000 rules with six settings each has about 15,000.
MAX_NODES = 50_000


def parse_duration(text: str) -> float:
    """'30s', '15m', '1h', '1d', '500ms' (or a plain number of seconds) -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"expected a duration such as 500ms, 30s, 15m, 1h or 1d, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_key(key: Key) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def format_size(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


class _Refused(yaml.MarkedYAMLError):
    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(Composer, CParser, SafeConstructor, Resolver):
    """libyaml's parser (a pure-Python one is 8 times slower) under PyYAML's own composer,
    which is where anchors, aliases, depth and the node count are refused."""

    def __init__(self, text: str) -> None:
        CParser.__init__(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        assert event is not None  # the composer asks only while events remain
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, "anchors and aliases (&name, *name) are not "
                                             "accepted; write each value out")
        if self._depth == MAX_DEPTH:
            raise _Refused(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(event.start_mark, f"more than {MAX_NODES} values (keys, values "
                                             "and list items)")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class Document:
    """One parsed YAML file: its plain value and the line of every key in it."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self._lines: dict[Key, int] = {}
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            self.value: Any = None if node is None else loader.construct_document(node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(exc, "problem", None) or str(exc)
            raise SettingsError(f"{where}: not valid YAML: {problem}") from None
        except ValueError as exc:  # a scalar Python cannot convert (an int of 5000 digits)
            raise SettingsError(f"{path}: not valid YAML: {exc}") from None
        finally:
            loader.dispose()
        if node is not None:
            self._index(node, ())

    @classmethod
    def read(cls, path: str | Path, limit: int) -> Document:
        """Read and parse the file at `path`, refusing it when over `limit` bytes."""
        try:
            # Not blocking: a FIFO in the file's place must not hang the reader.
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(descriptor, "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise SettingsError(f"{path}: cannot read: not a regular file")
                data = handle.read(limit + 1)
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read: {exc}") from None
        if len(data) > limit:
            raise SettingsError(f"{path}: larger than {format_size(limit)}, the limit for "
                                "this file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SettingsError(f"{path}: cannot read: not UTF-8 text ({exc})") from None
        return cls(str(path), text)

    def _index(self, node: yaml.Node, key: Key, line: int | None = None) -> None:
        # A mapping value is located at its key's line, not where the value starts.
        self._lines[key] = line or node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                name = str(key_node.value)
                if name in seen:
                    line = key_node.start_mark.line + 1
                    raise SettingsError(
                        f"{self.path}:{line}: {format_key((*key, name))}: key given twice"
                    )
                seen.add(name)
                self._index(value_node, (*key, name), key_node.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._index(item, (*key, index))

    def error(self, key: Key, message: str) -> SettingsError:
        """An error about `key`, located at its line (or its nearest parent's)."""
        probe = key
        while probe and probe not in self._lines:
            probe = probe[:-1]
        line = self._lines.get(probe)
        where = f"{self.path}:{line}" if line else self.path
        return SettingsError(f"{where}: {format_key(key)}: {message}")

    def root(self) -> Section:
        if self.value is None:
            return Section(self, (), {})
        if not isinstance(self.value, dict):
            raise self.error((), f"expected a mapping of settings, got {_kind(self.value)}")
        return Section(self, (), self.value)


class Section:
    """A mapping inside a Document, read one typed key at a time."""

    def __init__(self, doc: Document, key: Key, values: dict[Any, Any]) -> None:
        self.doc = doc
        self.key = key
        self._values = values
        self._read: set[str] = set()

    def error(self, name: str | int, message: str) -> SettingsError:
        return self.doc.error((*self.key, name), message)

    def has(self, name: str) -> bool:
        return name in self._values

    def raw(self, name: str, default: Any = None) -> Any:
        self._read.add(name)
        return self._values.get(name, default)

    def string(self, name: str, default: str) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_kind(value)}")
        return value

    def choice(self, name: str, options: Sequence[str], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            raise self.error(name, f"expected one of {', '.join(options)}, got {value!r}")
        return value

    def duration(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.error(name, f"expected a duration such as 30s, got {_kind(value)}")
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise self.error(name, str(exc)) from None
        if value < 0:
            raise self.error(name, f"expected a duration of 0 or more, got {value}")
        return float(value)

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected a whole number, got {_kind(value)}")
        if value < minimum:
            raise self.error(name, f"expected at least {minimum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_kind(value)}")
        return value

    def strings(self, name: str, default: Sequence[str] = ()) -> list[str]:
        value = self.raw(name, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of strings, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.doc.error(
                    (*self.key, name, index), f"expected a string, got {_kind(item)}"
                )
        return value

    def section(self, name: str) -> Section:
        value = self.raw(name, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a mapping, got {_kind(value)}")
        return Section(self.doc, (*self.key, name), value)

    def sections(self, name: str) -> Iterator[Section]:
        """Each mapping in the list under `name`."""
        value = self.raw(name, [])
        if value is None:
            value = []
        if not isinstance(value, list):
            raise self.error(name, f"expected a list, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.doc.error(
                    (*self.key, name, index), f"expected a mapping, got {_kind(item)}"
                )
            yield Section(self.doc, (*self.key, name, index), item)

    def finish(self) -> None:
        """Refuse keys that no reader asked for: they are typos or unsupported settings."""
        for name in self._values:
            if name not in self._read:
                known = ", ".join(sorted(self._read)) or "none"
                raise self.error(str(name), f"unknown key (known keys here: {known})")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"[:120]
