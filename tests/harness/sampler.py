"""ImageStatus calls at a steady pace, timed from a process of their own.

Timing from a thread of the test's own process would count the test's own work too: the
test parses logs and scrapes metrics meanwhile, and its threads share one interpreter
lock. A separate process measures only the daemon (and the machine).

    with Sampler(socket, image) as sampler:
        ...                      # whatever the daemon must survive
    sampler.latencies            # seconds, in the order sent
    sampler.errors               # gRPC status codes of calls that failed
    sampler.failures             # (seconds since the first call, code) of each failure
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from tests.harness._proc import Service
from tests.harness.cri import CriClient

_ROOT = Path(__file__).resolve().parents[2]


class Sampler(Service):
    def __init__(self, socket: str, image: str, pause: float = 0.01) -> None:
        self.socket, self.image, self.pause = socket, image, pause
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.failures: list[tuple[float, str]] = []
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.sampler", self.socket, self.image,
             str(self.pause)], cwd=_ROOT, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"sampler did not start: {line!r}")

    def close(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        out, _ = self._proc.communicate(timeout=30)
        found = json.loads(out)
        self.latencies = found["latencies"]
        self.failures = [(at, code) for at, code in found["failures"]]
        self.errors = [code for _, code in self.failures]
        self._proc = None


def _main(socket: str, image: str, pause: float) -> None:
    latencies: list[float] = []
    failures: list[tuple[float, str]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    with CriClient(socket) as client:
        client.status(image, timeout=10)  # connected before the first timed call
        print("ready", flush=True)
        first = time.perf_counter()
        while not stopping:
            started = time.perf_counter()
            try:
                client.status(image, timeout=10)
            except grpc.RpcError as exc:
                failures.append((round(started - first, 3), exc.code().name))
            latencies.append(time.perf_counter() - started)
            time.sleep(pause)
    print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
