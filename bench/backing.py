"""The cluster-wide backing registry: what it saves a node, what it costs when it is down,
and how fast nodekeeper copies to it, in one run.

    .venv/bin/python bench/backing.py [--quick] [--no-copy] [--keep]

Starts an upstream and a backing registry (tests/harness, loopback) and then:

  cold pull     A multi-layer image of random bytes (4 x 10 MB; quick: 4 x 2 MB) is pushed
                upstream; node A (containerd + nodekeeper with backing) pulls it, and the
                run waits until the background copy is in backing. Then, alternating, a new
                node B (fresh containerd root and state, fresh nodekeeper) pulls it once:
                with backing configured (decision `backing`) or without (`pulled`). Every
                pull is on a node that never held any of its content, so it is cold by
                construction. The registries' access logs give the blob and manifest
                requests each pull sent upstream and to backing.
  backing down  One node holding an image under a tag that moves: before every pull a new
                image is pushed under it (untimed), so every pull needs one. An episode is
                a fresh nodekeeper and `pulls` pulls, 0.3 s apart, all within backing's
                30 s down period; episodes alternate between no backing configured, backing
                healthy, and backing SIGSTOPped (Registry.freeze(): connections accepted,
                never answered) with `timeout: 1s`. The first pull of a black-holed episode
                waits for the timeout; the later ones skip backing.
  copy          bench/registry_copy.py as a subprocess (nodekeeper's Copier beside
                `skopeo copy`), its output included as is.

Pulls are timed by a gRPC client on nodekeeper's socket whose connection was made before
(an ImageFsInfo call), as the kubelet's is. Prints markdown tables. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    PULL_SPACING_S,
    RawClient,
    load_average,
    machine_info,
    markdown_table,
    percentile,
    verdict,
    work_directory,
)
from registry_copy import random_image

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.registry.backing import DOWN_SECONDS
from tests.harness import Containerd, CriClient, Image, Registry, image_ref, push, push_new
from tests.harness.nodekeeper import Nodekeeper
from tests.harness.registry import HARNESS_USER_AGENT

BENCH = Path(__file__).resolve().parent
COLD_REPO, COLD_TAG = "bench/app", "v1"
MOVING_REPO, MOVING_TAG = "bench/moving", "latest"
BACKING_TIMEOUT_S = 1.0
BACKING_PREFIX = "cache"
PULL_TIMEOUT_S = 120.0
# Every pull of a black-holed episode must come within backing's down period, which starts
# at the first pull's timeout; leave a margin for that pull and the last one.
EPISODE_LIMIT_S = DOWN_SECONDS - 5.0
SOURCES = ("upstream", "backing")
STATES = ("none", "healthy", "black-holed")

# Targets from the brief.
FIRST_PULL_SLACK_S = 0.1       # first pull of a black-holed episode: <= timeout + this
LATER_PULL_ADDED_S = 0.010     # later pulls of the episode: "about nothing", p50
COPY_THROUGHPUT_RATIO = 0.8    # Copier MB/s >= this x skopeo's
COPY_RSS_GROWTH_MB = 50.0


@dataclass(frozen=True)
class Sizes:
    cold_runs: int      # cold pulls per source, each on a new node
    layers: int
    layer_mb: int
    episodes: int       # per backing state
    pulls: int          # pulls per episode: the first, then the later ones
    copy_args: tuple[str, ...]
    budget_s: float     # per benchmark: no new run or episode starts past it


FULL = Sizes(cold_runs=10, layers=4, layer_mb=10, episodes=5, pulls=8,
             copy_args=("--runs", "3"), budget_s=300.0)
QUICK = Sizes(cold_runs=3, layers=4, layer_mb=2, episodes=2, pulls=4,
              copy_args=("--runs", "1", "--layer-mb", "10"), budget_s=120.0)


# -- what the registries saw -------------------------------------------------------------

# The tail of distribution's access line: "METHOD URI PROTO" STATUS SIZE "REFERER" "AGENT"
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>[^ ?"]+)\S* [^"]*" (?P<status>\d{3}) '
                     r'(?P<size>\d+|-) "[^"]*" "(?P<agent>[^"]*)"$')


@dataclass(frozen=True)
class Traffic:
    """Requests one registry answered, without the harness's own (pushes, resolves)."""

    blob_gets: int = 0
    blob_bytes: int = 0
    manifest_heads: int = 0
    manifest_gets: int = 0

    @property
    def requests(self) -> int:
        return self.blob_gets + self.manifest_heads + self.manifest_gets


class AccessLog:
    """A registry's access log from mark() on."""

    def __init__(self, registry: Registry) -> None:
        self._path = registry.log_path
        self._offset = 0

    def mark(self) -> None:
        self._offset = self._path.stat().st_size

    def traffic(self) -> Traffic:
        with self._path.open("rb") as log:
            log.seek(self._offset)
            text = log.read().decode("utf-8", errors="replace")
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            found = _ACCESS.search(line)
            if found is None or found["agent"].startswith(HARNESS_USER_AGENT):
                continue
            kind = ("blobs" if "/blobs/" in found["path"]
                    else "manifests" if "/manifests/" in found["path"] else "")
            if kind:
                counts[f"{found['method']} {kind}"] += 1
            if kind == "blobs" and found["method"] == "GET" and found["size"] != "-":
                counts["blob bytes"] += int(found["size"])
        return Traffic(counts["GET blobs"], counts["blob bytes"], counts["HEAD manifests"],
                       counts["GET manifests"])

    def settled(self, settle_s: float = 0.3, limit_s: float = 5.0) -> Traffic:
        """traffic() once it has not changed for settle_s (a line is written as its answer
        goes out), or at limit_s."""
        deadline = time.monotonic() + limit_s
        last, since = self.traffic(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.traffic()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                break
        return last


# -- nodes -------------------------------------------------------------------------------


def settings(backing_url: str) -> dict[str, object]:
    found: dict[str, object] = {"log": {"level": "info", "format": "json"},
                                "metrics_address": ""}
    if backing_url:
        found["backing"] = {"url": backing_url, "timeout": f"{BACKING_TIMEOUT_S:g}s"}
    return found


def connect(daemon: Nodekeeper, stack: contextlib.ExitStack) -> RawClient:
    """A client whose connection is up, as the kubelet's is when it pulls."""
    client = RawClient(daemon.socket)
    stack.callback(client.close)
    client.call("ImageFsInfo", b"", 30.0)
    return client


@contextlib.contextmanager
def new_node(path: Path, backing_url: str) -> Iterator[tuple[Nodekeeper, RawClient]]:
    """A node that never held anything: its own containerd root and state, and nodekeeper.
    Its files are removed when it stops (a cold pull unpacks the image once more)."""
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, path / "containerd", True)  # keeps nodekeeper's log
        containerd = Containerd(path / "containerd")
        stack.callback(containerd.close)
        containerd.start()
        daemon = Nodekeeper(path / "nk", containerd.address, settings=settings(backing_url))
        stack.callback(daemon.stop)
        daemon.start()
        yield daemon, connect(daemon, stack)


def pull_request(ref: str) -> bytes:
    return cri.PullImageRequest(image=cri.ImageSpec(image=ref)).SerializeToString()


def timed_pull(client: RawClient, request: bytes) -> tuple[float, str]:
    """(seconds, image_ref) of one PullImage."""
    started = time.perf_counter()
    answer = client.call("PullImage", request, PULL_TIMEOUT_S)
    seconds = time.perf_counter() - started
    return seconds, cri.PullImageResponse.FromString(answer).image_ref


def pull_decisions(daemon: Nodekeeper) -> list[str]:
    time.sleep(0.1)  # a line is written as its answer goes out
    return [str(e.get("decision", f"error {e.get('code')}")) for e in daemon.events()
            if e.get("rpc") == "PullImage"]


def events_named(daemon: Nodekeeper, prefix: str) -> int:
    return sum(1 for e in daemon.events() if str(e.get("event", "")).startswith(prefix))


def wait_for_event(daemon: Nodekeeper, prefix: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not events_named(daemon, prefix):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodekeeper logged no {prefix!r} within {timeout}s; log tail:\n"
                               f"{daemon.log_text()[-3000:]}")
        time.sleep(0.1)


# -- 1. a cold pull: from backing or from upstream ---------------------------------------


@dataclass(frozen=True)
class ColdPull:
    source: str
    seconds: float
    decisions: tuple[str, ...]
    upstream: Traffic
    backing: Traffic


@dataclass
class Cold:
    image_bytes: int = 0
    layers: int = 0
    copy_s: float = 0.0
    pulls: list[ColdPull] = field(default_factory=list)
    cut_short: bool = False

    def of(self, source: str) -> list[ColdPull]:
        return [p for p in self.pulls if p.source == source]

    def seconds(self, source: str) -> list[float]:
        return [p.seconds for p in self.of(source)]


def seed_backing(workdir: Path, upstream: Registry, backing: Registry, ref: str,
                 image: Image) -> float:
    """Node A pulls `ref` through nodekeeper; return the seconds until its background copy
    to backing was logged as done."""
    path = workdir / "node-a"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, path / "containerd", True)
        containerd = stack.enter_context(Containerd(path / "containerd"))
        daemon = Nodekeeper(path / "nk", containerd.address, settings=settings(backing.url))
        stack.callback(daemon.stop)
        daemon.start()
        with CriClient(daemon.socket) as kubelet:
            started = time.monotonic()
            if kubelet.pull(ref, timeout=PULL_TIMEOUT_S) != image.config_digest:
                raise RuntimeError(f"node A: {ref} did not pull as {image.config_digest}")
        wait_for_event(daemon, "copied to backing", 120.0)
        return time.monotonic() - started


def cold_pulls(sizes: Sizes, workdir: Path, upstream: Registry, backing: Registry) -> Cold:
    image = random_image(sizes.layers, sizes.layer_mb * 1024 * 1024)
    push(upstream.url, COLD_REPO, COLD_TAG, image)
    ref = image_ref(upstream.host, COLD_REPO, COLD_TAG)
    result = Cold(image_bytes=sum(len(b) for b in image.blobs.values()), layers=sizes.layers)
    result.copy_s = seed_backing(workdir, upstream, backing, ref, image)
    request = pull_request(ref)
    logs = {"upstream": AccessLog(upstream), "backing": AccessLog(backing)}
    deadline = time.monotonic() + sizes.budget_s
    for run in range(sizes.cold_runs):
        if time.monotonic() > deadline:
            result.cut_short = True
            break
        for source in SOURCES if run % 2 == 0 else SOURCES[::-1]:
            url = backing.url if source == "backing" else ""
            with new_node(workdir / f"cold-{source}-{run}", url) as (daemon, client):
                for log in logs.values():
                    log.mark()
                seconds, answer = timed_pull(client, request)
                if answer != image.config_digest:
                    raise RuntimeError(f"{source}: PullImage answered {answer}, "
                                       f"not {image.config_digest}")
                seen = {name: log.settled() for name, log in logs.items()}
                result.pulls.append(ColdPull(source, seconds, tuple(pull_decisions(daemon)),
                                             seen["upstream"], seen["backing"]))
    return result


# -- 2. pulls while backing is down ------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    state: str
    seconds: tuple[float, ...]
    decisions: tuple[str, ...]
    down_logged: int
    cut_short: bool


def episode(state: str, path: Path, containerd: Containerd, upstream: Registry,
            backing: Registry, pulls: int, seeds: Iterator[int]) -> Episode:
    """A fresh nodekeeper, then `pulls` pulls of a tag moved before each one."""
    request = pull_request(image_ref(upstream.host, MOVING_REPO, MOVING_TAG))
    seconds: list[float] = []
    cut_short = False
    with contextlib.ExitStack() as stack:
        if state == "black-holed":
            backing.freeze()
            stack.callback(backing.thaw)
        daemon = Nodekeeper(path, containerd.address,
                            settings=settings("" if state == "none" else backing.url))
        stack.callback(daemon.stop)
        daemon.start()
        client = connect(daemon, stack)
        first_at = 0.0
        for _ in range(pulls):
            if first_at and time.monotonic() - first_at > EPISODE_LIMIT_S:
                cut_short = True
                break
            time.sleep(PULL_SPACING_S)
            image = push_new(upstream.url, MOVING_REPO, MOVING_TAG,
                             seed=f"nodekeeper-backing-bench-{next(seeds)}")
            took, answer = timed_pull(client, request)
            if answer != image.config_digest:
                raise RuntimeError(f"{state}: PullImage answered {answer}, "
                                   f"not {image.config_digest}")
            first_at = first_at or time.monotonic()
            seconds.append(took)
        decisions = pull_decisions(daemon)
        down = events_named(daemon, "backing registry unavailable")
    return Episode(state, tuple(seconds), tuple(decisions), down, cut_short)


@dataclass
class Down:
    episodes: list[Episode] = field(default_factory=list)
    cut_short: bool = False

    def of(self, state: str) -> list[Episode]:
        return [e for e in self.episodes if e.state == state]

    def first(self, state: str) -> list[float]:
        return [e.seconds[0] for e in self.of(state) if e.seconds]

    def later(self, state: str) -> list[float]:
        return [s for e in self.of(state) for s in e.seconds[1:]]


def backing_down(sizes: Sizes, workdir: Path, upstream: Registry, backing: Registry) -> Down:
    result = Down()
    path = workdir / "node-moving"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, path / "containerd", True)
        containerd = stack.enter_context(Containerd(path / "containerd"))
        push_new(upstream.url, MOVING_REPO, MOVING_TAG, seed="nodekeeper-backing-bench-0")
        with CriClient(containerd.address) as direct:  # the node holds the tag's first image
            direct.pull(image_ref(upstream.host, MOVING_REPO, MOVING_TAG))
        seeds = itertools.count(1)
        deadline = time.monotonic() + sizes.budget_s
        for n in range(sizes.episodes):
            if time.monotonic() > deadline:
                result.cut_short = True
                break
            order = STATES[n % len(STATES):] + STATES[:n % len(STATES)]
            for state in order:
                result.episodes.append(episode(state, path / f"nk-{state}-{n}", containerd,
                                               upstream, backing, sizes.pulls, seeds))
    return result


# -- 3. bench/registry_copy.py -----------------------------------------------------------


@dataclass(frozen=True)
class CopyRun:
    argv: tuple[str, ...]
    output: str
    rows: dict[str, list[str]]  # tool -> cells: copy s, MB/s, process s, peak RSS, growth


def registry_copy(args: Sequence[str], timeout_s: float = 1200.0) -> CopyRun:
    """Run bench/registry_copy.py; on timeout, interrupt it (its registries stop with it)."""
    argv = (sys.executable, str(BENCH / "registry_copy.py"), *args)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        output, errors = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise RuntimeError(f"registry_copy.py took longer than {timeout_s:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"registry_copy.py failed ({proc.returncode}):\n{errors[-2000:]}")
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in ("nodekeeper", "skopeo") and len(cells) == 6:
            rows[cells[0]] = cells[1:]
    if "nodekeeper" not in rows:
        raise RuntimeError(f"registry_copy.py printed no nodekeeper row:\n{output}")
    return CopyRun(tuple(args), output.strip(), rows)


# -- the run -----------------------------------------------------------------------------


@dataclass
class Results:
    cold: Cold
    down: Down
    copy: CopyRun | None
    load_at_start: str = ""
    elapsed_s: float = 0.0


def run(sizes: Sizes, workdir: Path, copy: bool) -> Results:
    started = time.monotonic()
    load = load_average()
    with Registry(workdir / "upstream") as upstream, Registry(workdir / "backing") as backing:
        cold = cold_pulls(sizes, workdir, upstream, backing)
        down = backing_down(sizes, workdir, upstream, backing)
    copied = registry_copy(sizes.copy_args) if copy else None
    return Results(cold, down, copied, load, time.monotonic() - started)


# -- the report --------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mb(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def cold_table(cold: Cold) -> list[str]:
    up, back = cold.seconds("upstream"), cold.seconds("backing")
    rows: list[list[str]] = []
    for name, q in (("p50", 50), ("max", 100)):
        u, b = percentile(up, q), percentile(back, q)
        rows.append([f"cold PullImage on a new node, {name}", ms(u), ms(b), f"{b / u:.2f}x",
                     "(none)", ""])

    def per_pull(where: str, what: str, target: str = "", ok: bool | None = None) -> None:
        shown = []
        for source in SOURCES:
            found = sorted({getattr(getattr(p, where), what) for p in cold.of(source)})
            shown.append(", ".join(mb(n) if what == "blob_bytes" else str(n) for n in found))
        rows.append([f"{where}: {what.replace('_', ' ')} per pull", *shown, "", target,
                     "" if ok is None else verdict(ok)])

    no_blobs = all(p.upstream.blob_gets == 0 for p in cold.of("backing"))
    per_pull("upstream", "blob_gets", "0 from backing", no_blobs)
    per_pull("upstream", "blob_bytes")
    per_pull("upstream", "manifest_heads")
    per_pull("upstream", "manifest_gets")
    per_pull("backing", "blob_gets")
    per_pull("backing", "blob_bytes")
    per_pull("backing", "manifest_heads")
    per_pull("backing", "manifest_gets")
    return markdown_table(("metric", "from upstream (no backing)", "from backing", "ratio",
                           "target", "result"), rows)


def down_table(down: Down) -> list[str]:
    """Added latency: black-holed minus no backing, at the same statistic; the worst first
    pull is also compared with the typical one without backing (the target's row)."""
    first_limit = BACKING_TIMEOUT_S + FIRST_PULL_SLACK_S
    firsts = len(down.first("none"))
    rows: list[list[str]] = []

    def row(name: str, values: dict[str, float], added: float, target: str = "",
            ok: bool | None = None) -> None:
        rows.append([name, *(ms(values[s]) for s in STATES), f"{added * 1000:+.1f} ms",
                     target, "" if ok is None else verdict(ok)])

    median = {state: percentile(down.first(state), 50) for state in STATES}
    worst = {state: max(down.first(state)) for state in STATES}
    row(f"first pull of an episode, median of {firsts}", median,
        median["black-holed"] - median["none"])
    row(f"first pull of an episode, max of {firsts}", worst,
        worst["black-holed"] - worst["none"])
    worst_added = worst["black-holed"] - median["none"]
    row("first pull, worst added: max black-holed - median no backing", worst, worst_added,
        f"<= {first_limit:.1f} s (timeout + {FIRST_PULL_SLACK_S * 1000:.0f} ms)",
        worst_added <= first_limit)
    later = len(down.later("none"))
    for q in (50, 90):
        values = {state: percentile(down.later(state), q) for state in STATES}
        added = values["black-holed"] - values["none"]
        ok = added <= LATER_PULL_ADDED_S  # faster than without backing is noise, not cost
        row(f"later pulls of the episode, p{q} of {later}", values, added,
            f"~0 (<= +{LATER_PULL_ADDED_S * 1000:.0f} ms)" if q == 50 else "",
            ok if q == 50 else None)
    return markdown_table(("metric", "no backing", "backing healthy", "backing black-holed",
                           "added (black-holed - no backing)", "target", "result"), rows)


def copy_table(copied: CopyRun) -> list[str]:
    nk, sk = copied.rows["nodekeeper"], copied.rows.get("skopeo")
    rows: list[list[str]] = []
    if sk is not None:
        ratio = float(nk[1]) / float(sk[1])
        rows.append(["copy throughput, nodekeeper / skopeo (MB/s, median)",
                     f"{nk[1]} / {sk[1]} MB/s", f"{ratio:.2f}x",
                     f">= {COPY_THROUGHPUT_RATIO}x", verdict(ratio >= COPY_THROUGHPUT_RATIO)])
        process = float(sk[2]) / float(nk[2])
        rows.append(["whole-process time, nodekeeper / skopeo (ratio: skopeo s / nodekeeper s)",
                     f"{nk[2]} / {sk[2]} s", f"{process:.2f}x", "(none)", ""])
    else:
        rows.append(["copy throughput vs skopeo", "skopeo missing", "", "", "FAIL"])
    growth = float(nk[4])
    rows.append(["nodekeeper RSS growth during the copy (largest)", f"{growth:.1f} MB", "",
                 f"< {COPY_RSS_GROWTH_MB:.0f} MB", verdict(growth < COPY_RSS_GROWTH_MB)])
    return markdown_table(("metric", "value", "ratio", "target", "result"), rows)


def counted(items: Sequence[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(Counter(items).items())) or "none"


def report(res: Results, sizes: Sizes, args: argparse.Namespace) -> str:
    cold, down = res.cold, res.down

    def decided(source: str) -> str:
        return counted([d for p in cold.of(source) for d in p.decisions])

    def episodes(state: str) -> str:
        found = down.of(state)
        decisions = counted([d for e in found for d in e.decisions])
        logged = sum(e.down_logged for e in found)
        short = " (an episode cut short)" if any(e.cut_short for e in found) else ""
        return (f"{state}: {len(found)} episodes, decisions {decisions}, "
                f"'backing registry unavailable' logged {logged}{short}")

    short = " (cut short by the time budget)"
    def listed(values: Sequence[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    lines = [
        "## nodekeeper backing registry benchmark", "", *machine_info(res.load_at_start),
        "- nodekeeper: log level info, format json, metrics off; policy `update: always`; "
        f"backing `timeout: {BACKING_TIMEOUT_S:g}s` (down period {DOWN_SECONDS:g} s); "
        "upstream and backing: docker-registry on 127.0.0.1, filesystem storage",
        f"- mode: {'quick' if args.quick else 'full'}; cold pulls per source: "
        f"{len(cold.seconds('upstream'))}{short if cold.cut_short else ''}; "
        f"episodes per backing state: {len(down.of('none'))} of {sizes.pulls} pulls, "
        f"{PULL_SPACING_S} s apart{short if down.cut_short else ''}",
        f"- cold image: {cold.layers} layers of random bytes, {mb(cold.image_bytes)} of blobs; "
        f"node A's pull until its copy to backing was logged: {cold.copy_s:.2f} s",
        "- cold pulls (s): upstream " + listed(cold.seconds("upstream"))
        + "; backing " + listed(cold.seconds("backing")),
        f"- cold pulls, decisions: upstream: {decided('upstream')}; backing: {decided('backing')}",
        "- backing down, first pulls (s): "
        + "; ".join(f"{s} {listed(down.first(s))}" for s in STATES),
        "- backing down: " + "; ".join(episodes(s) for s in STATES),
        f"- run time: {res.elapsed_s:.0f} s", "",
        "### 1. A node pulls an image it does not have", "", *cold_table(cold), "",
        "### 2. Pulls that need a pull, backing healthy or black-holed", "",
        *down_table(down), "",
    ]
    if res.copy is not None:
        lines += ["### 3. Registry-to-registry copy: bench/registry_copy.py "
                  + " ".join(res.copy.argv), "", *copy_table(res.copy), "",
                  "Its own output:", "", "```", res.copy.output, "```", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nodekeeper's backing registry")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller pulls (smoke run)")
    parser.add_argument("--no-copy", action="store_true", help="skip bench/registry_copy.py")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    with work_directory(args.keep) as workdir:
        results = run(sizes, workdir, copy=not args.no_copy)
    print(report(results, sizes, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
