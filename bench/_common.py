"""What the benchmarks in bench/ share: the same raw-bytes client for every target, rounds
of sequential timed calls, nearest-rank percentiles, machine information and the work
directory. Importing this module puts the checkout's root on sys.path, so that the test
harness (tests/harness, which is not installed) can be imported after it."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the harness lives in tests/, which is not installed
    sys.path.insert(0, str(ROOT))

from tests.harness._proc import ManagedProcess  # noqa: E402
from tests.harness.nodekeeper import NotifySocket  # noqa: E402

BARE_PROXY = Path(__file__).resolve().parent / "bare_proxy.py"
CRI = "/runtime.v1.ImageService"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Pause before each call of a spaced PullImage run, so that each call finds the server,
# its threads and containerd idle, as a kubelet's pulls of one image usually do.
PULL_SPACING_S = 0.3


# -- small helpers -----------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# -- machine information -----------------------------------------------------------------


def containerd_version() -> str:
    done = subprocess.run(["/usr/bin/containerd", "--version"], capture_output=True, text=True,
                          timeout=10, check=False)
    parts = done.stdout.split()
    return parts[2] if len(parts) >= 3 else done.stdout.strip() or "unknown"


def source_revision() -> str:
    """Which nodekeeper the daemon runs: the git commit of the checkout its package is in
    (this one, or another one given with PYTHONPATH), and whether it has local changes."""
    found = subprocess.run(
        [sys.executable, "-c", "import nodekeeper; print(nodekeeper.__file__)"],
        capture_output=True, text=True, timeout=30, check=False)
    package = Path(found.stdout.strip()).parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(package), *args], capture_output=True,
                              text=True, timeout=10, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no git commit"
    dirty = " with uncommitted changes in nodekeeper/" if git("status", "--porcelain", ".") else ""
    where = "" if package == ROOT / "nodekeeper" else f" (from {package})"
    return f"{commit}{dirty}{where}"


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the checkout when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def machine_info(load: str, containerd: str = "") -> list[str]:
    """The run's context; `containerd`: the version under test, when not Debian's own."""
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), "
        f"load average at start: {load}",
        f"- kernel: {platform.release()}",
        f"- python: {platform.python_version()} ({_shown(Path(sys.executable))})",
        f"- grpcio: {grpc.__version__}",
        f"- containerd: {containerd or containerd_version()}",
        f"- nodekeeper source: {source_revision()}",
    ]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# -- timing ------------------------------------------------------------------------------


class RawClient:
    """Raw-bytes unary calls on one unix socket: the same client for every target."""

    def __init__(self, socket_path: str) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket_path}", options=CLIENT_OPTIONS)
        self._methods: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def call(self, method: str, request: bytes, timeout: float) -> bytes:
        callable_ = self._methods.get(method)
        if callable_ is None:
            callable_ = self._channel.unary_unary(f"{CRI}/{method}")
            self._methods[method] = callable_
        answer: bytes = callable_(request, timeout=timeout)
        return answer

    def close(self) -> None:
        self._channel.close()


@dataclass
class Latencies:
    """Per-target latencies of one benchmark, in milliseconds."""

    name: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    rounds: int = 0
    cut_short: bool = False

    def p(self, target: str, q: float) -> float:
        return percentile(self.samples[target], q)

    def count(self, target: str) -> int:
        return len(self.samples[target])


class Caller(Protocol):
    def call(self, method: str, request: bytes, timeout: float) -> bytes: ...


def measure(name: str, clients: Mapping[str, Caller], method: str, request: bytes,
            calls: int, warmup: int, rounds: int, budget_s: float,
            timeout: float = 30.0, pause_s: float = 0.0,
            before: Callable[[str], None] | None = None) -> Latencies:
    """`calls` sequential calls per target after `warmup` untimed ones, in `rounds` rounds;
    round r starts with target r mod len(targets). No new round starts past the budget;
    a round in progress stops at twice the budget (both are reported as cut short).
    With `pause_s`, each timed call comes that long after the previous answer.
    With `before`, before(target) runs ahead of every timed call, untimed (after the pause)."""
    result = Latencies(name, {target: [] for target in clients})
    targets = list(clients)
    deadline = time.monotonic() + budget_s
    for target in targets:
        for _ in range(warmup):
            if time.monotonic() > deadline:
                break
            clients[target].call(method, request, timeout)
    deadline = time.monotonic() + budget_s
    hard_deadline_ns = time.perf_counter_ns() + int(2 * budget_s * 1e9)
    rounds = result.rounds = max(1, min(rounds, calls))
    per_round = max(1, calls // rounds)
    clock = time.perf_counter_ns
    for r in range(rounds):
        if time.monotonic() > deadline:
            result.cut_short = True
            break
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for target in order:
            call = clients[target].call
            out = result.samples[target]
            for _ in range(per_round):
                if pause_s:
                    time.sleep(pause_s)
                if before is not None:
                    before(target)
                started = clock()
                if started > hard_deadline_ns:
                    result.cut_short = True
                    break
                call(method, request, timeout)
                out.append((clock() - started) / 1e6)
    return result


def same_answers(clients: dict[str, RawClient], method: str, request: bytes,
                 normalize: Callable[[bytes], object] = bytes) -> None:
    """Every target answers the request as containerd does (the proxies really forward)."""
    answers = {target: normalize(client.call(method, request, 30.0))
               for target, client in clients.items()}
    reference = answers["containerd"]
    for target, answer in answers.items():
        if answer != reference:
            raise RuntimeError(f"{method}: {target} answered differently from containerd")


# -- the work directory ------------------------------------------------------------------


@contextlib.contextmanager
def work_directory(keep: bool) -> Iterator[Path]:
    # Short, under /tmp: unix socket paths are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="nk-bench-", dir="/tmp"))
    try:
        yield path
    finally:
        if keep:
            print(f"work directory kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- the floor as a subprocess -----------------------------------------------------------


class BareProxy:
    """bench/bare_proxy.py run as a child process, ready when start() returns.

    With `answer_pull`, it answers every PullImage at once with that image ID: the floor for
    a PullImage answered without asking anyone. With `libraries`, it imports nodekeeper's
    runtime libraries too: the memory floor of anything built from them."""

    def __init__(self, workdir: Path, containerd_address: str, answer_pull: str = "",
                 libraries: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.socket = str(workdir / "bare.sock")
        self._notify_path = workdir / "notify.sock"
        extra = ["--answer-pull", answer_pull] if answer_pull else []
        extra += ["--with-libraries"] if libraries else []
        # env(1) execs the interpreter, so the PID stays the proxy's own.
        self._proc = ManagedProcess(
            ["/usr/bin/env", f"NOTIFY_SOCKET={self._notify_path}", sys.executable,
             str(BARE_PROXY), "--listen", self.socket, "--containerd", containerd_address,
             *extra],
            workdir / "bare_proxy.log",
        )

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> float:
        """Start it; return seconds from start to READY=1."""
        self._notify_path.unlink(missing_ok=True)
        notify = NotifySocket(self._notify_path)
        try:
            started = time.monotonic()
            self._proc.start()
            try:
                return notify.wait_for("READY=1", timeout) - started
            except TimeoutError:
                raise RuntimeError(f"bare proxy not ready:\n{self._proc.tail()}") from None
        finally:
            notify.close()

    def stop(self) -> None:
        self._proc.stop(10.0)
