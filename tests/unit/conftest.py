"""Fixtures shared by the unit tests."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness.mounts import Tmpfs
from tests.unit.test_probe import Handler, MakeProber, MockProber


@pytest.fixture(scope="session")
def ram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs for the unit tests that keep state in SQLite only to read it back: its
    fsyncs on the machine's disk, busy with other work, were most of their time. Tests
    about the disk itself (test_state_failures.py) stay on it."""
    with Tmpfs(tmp_path_factory.mktemp("ram"), size=256 << 20) as mounted:
        yield mounted.path


@pytest.fixture
def ram_path(ram: Path) -> Path:
    """A directory of the test's own on `ram`."""
    return Path(tempfile.mkdtemp(dir=ram))


@pytest.fixture
async def make_prober(tmp_path: Path) -> AsyncIterator[MakeProber]:
    made: list[MockProber] = []

    def make(handler: Handler, **kwargs: object) -> MockProber:
        prober = MockProber(str(tmp_path / "hosts"), handler, **kwargs)  # type: ignore[arg-type]
        made.append(prober)
        return prober

    try:
        yield make
    finally:
        for prober in made:
            await prober.close()
