"""Shared fixtures. Integration fixtures start real processes and stop every one of them;
when containerd or a registry cannot start, the test fails (it never skips)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from tests.harness import Containerd, CriClient, Registry
from tests.harness.apiserver import ApiServer
from tests.harness.containerd import ContainerdRelease, selected_releases
from tests.harness.nodekeeper import Nodekeeper

MakeRegistry = Callable[..., Registry]
MakeNodekeeper = Callable[..., Nodekeeper]
MakeContainerd = Callable[..., Containerd]

# NODEKEEPER_CONTAINERD="1.6,2.3" narrows the matrix; every version by default.
RELEASES = selected_releases()

# Property tests: 30 examples each on every run ("quick"), with no per-example deadline
# (a time limit a busy machine fails). `--hypothesis-profile=thorough` tries many more.
hypothesis_settings.register_profile("quick", max_examples=30, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=1000, deadline=None)
hypothesis_settings.load_profile("quick")


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


@pytest.fixture(params=RELEASES, ids=lambda release: f"containerd-{release.name}")
def containerd_release(request: pytest.FixtureRequest) -> ContainerdRelease:
    """The containerd version under test: every test using containerd runs once per version."""
    release: ContainerdRelease = request.param
    return release


@pytest.fixture
def make_containerd(
    tmp_path: Path, containerd_release: ContainerdRelease
) -> Iterator[MakeContainerd]:
    """Start containerds of the version under test on demand; all closed at teardown."""
    started: list[Containerd] = []

    def make(name: str = "containerd", *, start: bool = True, **kwargs: Any) -> Containerd:
        ctd = Containerd(tmp_path / name, release=containerd_release, **kwargs)
        started.append(ctd)  # before start(): a half-started one is closed too
        if start:
            ctd.start()
        return ctd

    try:
        yield make
    finally:
        for ctd in started:
            ctd.close()


@pytest.fixture
def containerd(make_containerd: MakeContainerd) -> Containerd:
    return make_containerd()


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


# -- wall time per containerd version ---------------------------------------------------------

_SECONDS_BY_RELEASE: dict[str, float] = {}
_RELEASE_ID = re.compile(r"\[(?:.*-)?containerd-(\d+\.\d+)(?:-.*)?\]$")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    found = _RELEASE_ID.search(report.nodeid)
    if found is not None:
        name = found.group(1)
        _SECONDS_BY_RELEASE[name] = _SECONDS_BY_RELEASE.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SECONDS_BY_RELEASE:
        spent = ", ".join(f"{name}: {seconds:.0f} s"
                          for name, seconds in sorted(_SECONDS_BY_RELEASE.items()))
        terminalreporter.write_line(f"time in tests per containerd version: {spent}")


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
