"""nodekeeper's shim cost, side by side with containerd and with the floor, in one run.

    .venv/bin/python bench/shim.py [--quick]

Starts a private containerd and registry (tests/harness), pushes and pulls one small image,
then times the same raw-bytes calls, from the same kind of synchronous gRPC client, against

  containerd   its own socket (direct);
  floor        bench/bare_proxy.py: a grpc.aio proxy that only forwards bytes;
  nodekeeper   `python -m nodekeeper serve`, log level info (the default), metrics off.

Each latency is p50/p99 over sequential calls after a warm-up, taken in rounds that rotate
the order of the targets, so that noise on a shared machine spreads over all of them.
It also times process start to READY=1 and reads idle RSS, beside that of the floor with
nodekeeper's runtime libraries imported (bare_proxy.py --with-libraries). ListImages lists
500 distinct images pulled through CRI. Prints a markdown table.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    PULL_SPACING_S,
    BareProxy,
    Latencies,
    RawClient,
    load_average,
    machine_info,
    markdown_table,
    measure,
    same_answers,
    verdict,
    wait_until,
    work_directory,
)

from nodekeeper._proto import cri_image_pb2 as cri
from tests.harness import (
    Containerd,
    CriClient,
    Registry,
    free_port,
    image_ref,
    push_new,
)
from tests.harness.nodekeeper import Nodekeeper

TARGETS = ("containerd", "floor", "nodekeeper")

# Targets from the brief.
STATUS_OVERHEAD_MS = 0.5
STATUS_OVERHEAD_VS_FLOOR = 1.25
LIST_RATIO = 1.2
READY_S = 1.0
RSS_MB = 45.0
# Calls of each kind the floor-with-libraries gets before its RSS is read.
LIBRARY_CALLS = 200


@dataclass(frozen=True)
class Sizes:
    """How many calls each target gets per benchmark (plus the warm-up), and in how many
    rounds they are spread; every benchmark also has a wall-clock budget."""

    status: int
    listing: int
    pull: int
    spaced_pull: int
    warmup: int
    rounds: int
    starts: int
    images: int = 500
    budget_s: float = 60.0


FULL = Sizes(status=4000, listing=1500, pull=200, spaced_pull=24, warmup=200, rounds=10,
             starts=5)
QUICK = Sizes(status=400, listing=150, pull=30, spaced_pull=6, warmup=50, rounds=4, starts=3,
              budget_s=15.0)


# -- small helpers -----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listed_names(answer: bytes) -> list[tuple[str, list[str]]]:
    """A ListImages answer without its order, which containerd does not keep."""
    images = cri.ListImagesResponse.FromString(answer).images
    return sorted((image.id, sorted(image.repo_tags)) for image in images)


def start_times(workdir: Path, containerd_address: str, count: int,
                settings: Callable[[], dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Seconds from process start to READY=1, `count` times each for nodekeeper and the
    floor, alternating; each process is stopped before the next starts."""
    nodekeeper: list[float] = []
    floor: list[float] = []
    for i in range(count):
        daemon = Nodekeeper(workdir / f"start-nk{i}", containerd_address, settings=settings())
        try:
            daemon.start(wait_ready=False)
            nodekeeper.append(daemon.wait_ready(15.0))
        finally:
            daemon.stop()
        bare = BareProxy(workdir / f"start-bare{i}", containerd_address)
        try:
            floor.append(bare.start())
        finally:
            bare.stop()
    return nodekeeper, floor


# -- the run -----------------------------------------------------------------------------


@dataclass
class Results:
    status: Latencies
    listing: Latencies
    pull: Latencies
    spaced_pull: Latencies
    list_tags: int
    list_images: int
    list_bytes: int
    ready_nk: list[float]
    ready_floor: list[float]
    rss_nk: float
    rss_floor: float
    rss_libraries: float
    load_at_start: str = ""
    elapsed_s: float = 0.0


def add_images(address: str, registry_url: str, host: str, count: int) -> None:
    """`count` distinct images (each its own config, so its own CRI image), pushed and
    pulled through containerd's CRI, a few at a time."""

    def add(i: int) -> None:
        push_new(registry_url, f"bench/img-{i}", "v1", seed=f"nodekeeper-bench-{i}")
        with CriClient(address) as client:
            client.pull(image_ref(host, f"bench/img-{i}", "v1"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(add, range(count)))


def tags_listed(client: CriClient) -> int:
    return sum(len(image.repo_tags) for image in client.list().images)


def run(sizes: Sizes, workdir: Path, log_level: str, metrics: bool) -> Results:
    started = time.monotonic()
    load = load_average()

    def settings() -> dict[str, Any]:
        # A port of its own for each daemon: the start-time runs overlap the main one.
        return {"log": {"level": log_level, "format": "json"},
                "metrics_address": f"127.0.0.1:{free_port()}" if metrics else ""}

    with contextlib.ExitStack() as stack:
        containerd = Containerd(workdir / "containerd")
        stack.callback(containerd.close)
        containerd.start()
        registry = Registry(workdir / "registry")
        stack.callback(registry.close)
        registry.start()

        push_new(registry.url, "bench/app", "v1", seed="nodekeeper-bench")
        ref = image_ref(registry.host, "bench/app", "v1")
        direct = stack.enter_context(CriClient(containerd.address))
        direct.pull(ref)

        bare = BareProxy(workdir / "bare", containerd.address)
        stack.callback(bare.stop)
        bare.start()
        daemon = Nodekeeper(workdir / "nk", containerd.address, settings=settings())
        stack.callback(daemon.stop)
        daemon.start()

        sockets = {"containerd": containerd.address, "floor": bare.socket,
                   "nodekeeper": daemon.socket}
        clients = {target: RawClient(sockets[target]) for target in TARGETS}
        for client in clients.values():
            stack.callback(client.close)

        status_request = cri.ImageStatusRequest(image=cri.ImageSpec(image=ref))
        same_answers(clients, "ImageStatus", status_request.SerializeToString())
        status = measure("ImageStatus", clients, "ImageStatus",
                         status_request.SerializeToString(), sizes.status, sizes.warmup,
                         sizes.rounds, sizes.budget_s)

        pull_request = cri.PullImageRequest(image=cri.ImageSpec(image=ref)).SerializeToString()
        same_answers(clients, "PullImage", pull_request)
        pull = measure("PullImage back to back", clients, "PullImage", pull_request,
                       sizes.pull, max(3, sizes.warmup // 20), sizes.rounds, sizes.budget_s)
        spaced_pull = measure(f"PullImage {PULL_SPACING_S} s apart", clients, "PullImage",
                              pull_request, sizes.spaced_pull, 1, sizes.rounds,
                              sizes.budget_s, pause_s=PULL_SPACING_S)

        add_images(containerd.address, registry.url, registry.host, sizes.images)
        wait_until(lambda: tags_listed(direct) > sizes.images, 30.0,
                   f"CRI ListImages showing {sizes.images + 1} images")
        list_request = cri.ListImagesRequest().SerializeToString()
        answer = clients["containerd"].call("ListImages", list_request, 30.0)
        listed = cri.ListImagesResponse.FromString(answer)
        same_answers(clients, "ListImages", list_request, listed_names)
        listing = measure(f"ListImages, {sizes.images + 1} images", clients, "ListImages",
                          list_request, sizes.listing, max(10, sizes.warmup // 4), sizes.rounds,
                          sizes.budget_s)

        # The floor with nodekeeper's libraries imported, given the same kinds of calls.
        libraries = BareProxy(workdir / "bare-libraries", containerd.address, libraries=True)
        stack.callback(libraries.stop)
        libraries.start()
        with_libraries = RawClient(libraries.socket)
        stack.callback(with_libraries.close)
        for method, request in (("ImageStatus", status_request.SerializeToString()),
                                ("PullImage", pull_request), ("ListImages", list_request)):
            for _ in range(LIBRARY_CALLS):
                with_libraries.call(method, request, 30.0)

        time.sleep(2.0)  # idle, after the warm-up and all of the above
        assert daemon.proc is not None
        rss_nk, rss_floor = rss_mb(daemon.proc.pid), rss_mb(bare.pid)
        rss_libraries = rss_mb(libraries.pid)

        ready_nk, ready_floor = start_times(workdir, containerd.address, sizes.starts, settings)

        return Results(
            status=status, listing=listing, pull=pull, spaced_pull=spaced_pull,
            list_tags=sum(len(i.repo_tags) for i in listed.images),
            list_images=len(listed.images), list_bytes=len(answer),
            ready_nk=ready_nk, ready_floor=ready_floor, rss_nk=rss_nk, rss_floor=rss_floor,
            rss_libraries=rss_libraries,
            load_at_start=load, elapsed_s=time.monotonic() - started,
        )


# -- the report --------------------------------------------------------------------------


def table(res: Results) -> list[str]:
    rows: list[tuple[str, str, str, str, str, str, str]] = []

    def ms(value: float) -> str:
        return f"{value:.3f} ms"

    def latency_rows(lat: Latencies, q: float) -> tuple[float, float, float]:
        return lat.p("containerd", q), lat.p("floor", q), lat.p("nodekeeper", q)

    st = res.status
    d50, f50, n50 = latency_rows(st, 50)
    d99, f99, n99 = latency_rows(st, 99)
    floor_over, nk_over = f50 - d50, n50 - d50
    over_ratio = nk_over / floor_over if floor_over > 0 else math.inf
    rows += [
        ("ImageStatus p50", ms(d50), ms(f50), ms(n50),
         f"overhead: floor {floor_over:+.3f} ms, nodekeeper {nk_over:+.3f} ms",
         f"nodekeeper overhead < {STATUS_OVERHEAD_MS} ms",
         verdict(nk_over < STATUS_OVERHEAD_MS)),
        ("ImageStatus overhead vs floor", "", "", "",
         f"{over_ratio:.2f}x (nodekeeper overhead / floor overhead)",
         f"<= {STATUS_OVERHEAD_VS_FLOOR}x (ideally)",
         verdict(over_ratio <= STATUS_OVERHEAD_VS_FLOOR)),
        ("ImageStatus p99", ms(d99), ms(f99), ms(n99),
         f"overhead: floor {f99 - d99:+.3f} ms, nodekeeper {n99 - d99:+.3f} ms", "", ""),
    ]

    def ratio_rows(lat: Latencies, target: str, ok: Callable[[float], bool] | None) -> None:
        d50, f50, n50 = latency_rows(lat, 50)
        d99, f99, n99 = latency_rows(lat, 99)
        rows.extend([
            (f"{lat.name} p50", ms(d50), ms(f50), ms(n50),
             f"nodekeeper/containerd {n50 / d50:.2f}x (floor {f50 / d50:.2f}x)",
             target, "" if ok is None else verdict(ok(n50 / d50))),
            (f"{lat.name} p99", ms(d99), ms(f99), ms(n99),
             f"nodekeeper/containerd {n99 / d99:.2f}x (floor {f99 / d99:.2f}x)", "", ""),
        ])

    ratio_rows(res.listing, f"<= {LIST_RATIO}x", lambda ratio: ratio <= LIST_RATIO)
    list_vs_floor = res.listing.p("nodekeeper", 50) / res.listing.p("floor", 50)
    rows.append((f"{res.listing.name} p50, nodekeeper / floor", "", "", "",
                 f"{list_vs_floor:.2f}x", f"<= {STATUS_OVERHEAD_VS_FLOOR}x (ideally)",
                 verdict(list_vs_floor <= STATUS_OVERHEAD_VS_FLOOR)))
    ratio_rows(res.pull, "(none)", None)
    ratio_rows(res.spaced_pull, "(none)", None)

    nk_med, nk_max = statistics.median(res.ready_nk), max(res.ready_nk)
    fl_med, fl_max = statistics.median(res.ready_floor), max(res.ready_floor)
    ready_result = verdict(nk_med <= READY_S)
    if nk_med <= READY_S < nk_max:
        ready_result = "PASS (median); max over"
    rows += [
        (f"start to READY=1, median of {len(res.ready_nk)}", "", f"{fl_med:.3f} s",
         f"{nk_med:.3f} s", f"nodekeeper - floor {nk_med - fl_med:+.3f} s",
         f"<= {READY_S:.0f} s", ready_result),
        (f"start to READY=1, max of {len(res.ready_nk)}", "", f"{fl_max:.3f} s",
         f"{nk_max:.3f} s", "", f"<= {READY_S:.0f} s", verdict(nk_max <= READY_S)),
        ("idle RSS (VmRSS)", "", f"{res.rss_floor:.1f} MB", f"{res.rss_nk:.1f} MB",
         f"nodekeeper - floor {res.rss_nk - res.rss_floor:+.1f} MB", f"<= {RSS_MB:.0f} MB",
         verdict(res.rss_nk <= RSS_MB)),
        ("idle RSS of the floor with nodekeeper's libraries imported", "",
         f"{res.rss_libraries:.1f} MB", "",
         f"floor + libraries - floor {res.rss_libraries - res.rss_floor:+.1f} MB; "
         f"nodekeeper - it {res.rss_nk - res.rss_libraries:+.1f} MB", "", ""),
    ]

    header = ("metric", "containerd", "floor (bare proxy)", "nodekeeper", "ratio / overhead",
              "target", "result")
    return markdown_table(header, rows)


def seconds(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def report(res: Results, sizes: Sizes, args: argparse.Namespace) -> str:
    def counts(lat: Latencies) -> str:
        n = lat.count("nodekeeper")
        note = " (cut short by the time budget)" if lat.cut_short else ""
        return f"{lat.name} {n} in {lat.rounds} rounds{note}"

    lines = ["## nodekeeper shim benchmark", "", *machine_info(res.load_at_start),
             f"- nodekeeper: log level {args.log_level}, format json, metrics "
             f"{'on' if args.metrics else 'off'}",
             f"- mode: {'quick' if args.quick else 'full'}; timed calls per target, after "
             f"a warm-up: {counts(res.status)}; {counts(res.pull)}; "
             f"{counts(res.spaced_pull)}; {counts(res.listing)}",
             f"- ListImages answer: {res.list_images} CRI image(s) carrying {res.list_tags} "
             f"names, {res.list_bytes} bytes",
             f"- start to READY=1 (s): nodekeeper {seconds(res.ready_nk)}; "
             f"floor {seconds(res.ready_floor)}",
             f"- run time: {res.elapsed_s:.0f} s", "", *table(res), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nodekeeper vs containerd vs a bare proxy")
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="nodekeeper's log level (default: info, the production default)")
    parser.add_argument("--metrics", action="store_true",
                        help="serve nodekeeper's /metrics on a loopback port (default: off)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    with work_directory(args.keep) as workdir:
        results = run(sizes, workdir, args.log_level, args.metrics)
    print(report(results, sizes, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
