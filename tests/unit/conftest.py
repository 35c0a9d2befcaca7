"""Fixtures shared by the unit tests of the registry layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_probe import Handler, MakeProber, MockProber


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
