"""Shared fixtures. Integration fixtures start real processes and stop every one of them;
when containerd or a registry cannot start, the test fails (it never skips)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Containerd, CriClient, Registry
from tests.harness.nodekeeper import Nodekeeper

MakeRegistry = Callable[..., Registry]
MakeNodekeeper = Callable[..., Nodekeeper]


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[MakeRegistry]:
    """Start registries on demand; every one is stopped at teardown."""
    started: list[Registry] = []

    def make(**kwargs: Any) -> Registry:
        reg = Registry(tmp_path / f"registry{len(started)}", **kwargs)
        started.append(reg)  # before start(): a half-started one is stopped too
        reg.start()
        return reg

    try:
        yield make
    finally:
        for reg in started:
            reg.close()


@pytest.fixture
def registry(make_registry: MakeRegistry) -> Registry:
    return make_registry()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    ctd = Containerd(tmp_path / "containerd")
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.close()


@pytest.fixture
def cri_client(containerd: Containerd) -> Iterator[CriClient]:
    with CriClient(containerd.address) as client:
        yield client


@pytest.fixture
def make_nodekeeper(tmp_path: Path) -> Iterator[MakeNodekeeper]:
    """Start nodekeeper subprocesses on demand (ready when returned); all stopped at teardown."""
    started: list[Nodekeeper] = []

    def make(containerd_address: str, *, start: bool = True, **kwargs: Any) -> Nodekeeper:
        daemon = Nodekeeper(tmp_path / f"nodekeeper{len(started)}", containerd_address, **kwargs)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    try:
        yield make
    finally:
        for daemon in started:
            daemon.stop()


@pytest.fixture
def nodekeeper(make_nodekeeper: MakeNodekeeper, containerd: Containerd) -> Nodekeeper:
    return make_nodekeeper(containerd.address)


@pytest.fixture
def via_nodekeeper(nodekeeper: Nodekeeper) -> Iterator[CriClient]:
    with CriClient(nodekeeper.socket) as client:
        yield client
