"""Fixtures of the integration tier that only some modules need."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.apiserver import ApiServer


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real kube-apiserver and etcd for the module's tests; fails when either cannot
    start (they are started, never skipped)."""
    server = ApiServer(tmp_path_factory.mktemp("apiserver"))
    try:
        server.start()
        yield server
    finally:
        server.close()
