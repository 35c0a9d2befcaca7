"""A node's worth of pulls during a registry outage: nodekeeper beside containerd alone.

    .venv/bin/python bench/outage.py [--quick]

Starts a private containerd and registry (tests/harness), the registry behind a fault
proxy (tests/harness/faults.py) that containerd is told speaks plain HTTP, pushes N
distinct images and puts each on the node. Then, for each N (10 and 30) and each fault:

  black-holed   the proxy takes every request and never answers;
  refused       the proxy stops listening (the registry is down, or a firewall rejects);

it pulls the N images one after another, each as soon as the previous one was answered,
as a kubelet with serializeImagePulls does when N pods start, through

  nodekeeper    a fresh daemon (policy: update always, probe_timeout 2s; outage_wait the
                default 200 ms) that has pulled the N images once while the registry
                answered, so the node's copy may stand in;
  containerd    its own CRI socket: refused, every pull is timed; black-holed, a pull
                hangs, so only a few are sent, each with a client deadline.

It reports the seconds until the last of the N pulls is answered, against N x
probe_timeout (what the same pulls cost before outage episodes: each waited its own
probe_timeout), each pull's cost during the episode (every pull after the first), p50 and
p99, and the probes the registry was sent. Prints a markdown table. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from _common import (
    RawClient,
    load_average,
    machine_info,
    markdown_table,
    percentile,
    verdict,
    work_directory,
)

from nodekeeper._proto import cri_image_pb2 as cri
from tests.harness import (
    NO_RESPONSE,
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    image_ref,
    plain_http_hosts_toml,
    push_new,
)
from tests.harness.nodekeeper import Nodekeeper

PROBE_TIMEOUT_S = 2.0
OUTAGE_WAIT_S = 0.2  # nodekeeper's default
POLICY = f"defaults:\n  update: always\n  probe_timeout: {PROBE_TIMEOUT_S:g}s\n"
FAULTS = ("black-holed", "refused")
# A kubelet's pull has no deadline of its own shorter than minutes: this one only bounds
# the run while containerd hangs on a black-holed registry.
CALL_TIMEOUT_S = 60.0
# Target: the last of N pulls within one probe_timeout plus outage_wait per later pull,
# with this much slack per pull for a busy machine.
SLACK_PER_PULL_S = 0.05


@dataclass(frozen=True)
class Sizes:
    counts: tuple[int, ...]   # N, images pulled per run
    hang_tries: int           # containerd's pulls against the black hole
    hang_deadline_s: float    # the client deadline of each


FULL = Sizes(counts=(10, 30), hang_tries=2, hang_deadline_s=10.0)
QUICK = Sizes(counts=(10,), hang_tries=1, hang_deadline_s=5.0)


@dataclass
class Run:
    """N pulls of one target against one fault."""

    target: str
    fault: str
    count: int
    costs: list[float] = field(default_factory=list)   # seconds, answered pulls
    codes: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0           # from the first pull sent to the last answered
    probes: int = 0               # manifest requests that reached the proxy
    decisions: Counter[str] = field(default_factory=Counter)


def pull_request(ref: str) -> bytes:
    return cri.PullImageRequest(image=cri.ImageSpec(image=ref)).SerializeToString()


def pull_all(client: RawClient, refs: Sequence[str], run: Run, timeout: float) -> Run:
    """The pulls one after another, as serializeImagePulls sends them."""
    started = time.perf_counter()
    for ref in refs:
        began = time.perf_counter()
        try:
            client.call("PullImage", pull_request(ref), timeout)
            run.codes["OK"] += 1
        except grpc.RpcError as exc:
            run.codes[exc.code().name] += 1
        run.costs.append(time.perf_counter() - began)
    run.wall_s = time.perf_counter() - started
    return run


def set_fault(proxy: FaultProxy, fault: str) -> None:
    proxy.clear()
    if fault == "black-holed":
        proxy.hang()
    else:
        proxy.refuse()


def clear_fault(proxy: FaultProxy) -> None:
    proxy.start()
    proxy.passthrough()


def decisions(daemon: Nodekeeper, refs: Sequence[str]) -> Counter[str]:
    return Counter(str(e["decision"]) for e in daemon.events()
                   if e.get("rpc") == "PullImage" and "decision" in e
                   and e.get("reference") in refs)


def through_nodekeeper(workdir: Path, containerd: Containerd, proxy: FaultProxy,
                       refs: Sequence[str], fault: str) -> Run:
    daemon = Nodekeeper(workdir, containerd.address, policy=POLICY,
                        settings={"containerd": {"hosts_dir": str(containerd.hosts_dir)},
                                  "log": {"level": "info", "format": "json"},
                                  "metrics_address": ""})
    daemon.start()
    client = RawClient(daemon.socket)
    try:
        # While the registry answers: each pull is `fresh`, and records that the
        # repositories pull anonymously, so that the node's copy may stand in later.
        for ref in refs:
            client.call("PullImage", pull_request(ref), CALL_TIMEOUT_S)
        before = decisions(daemon, refs)
        set_fault(proxy, fault)
        run = pull_all(client, refs, Run("nodekeeper", fault, len(refs)), CALL_TIMEOUT_S)
        run.probes = len(proxy.requests("HEAD", "/manifests/", status=NO_RESPONSE))
        run.decisions = decisions(daemon, refs) - before
        return run
    finally:
        clear_fault(proxy)
        client.close()
        daemon.stop()


def containerd_alone(containerd: Containerd, proxy: FaultProxy, refs: Sequence[str],
                     fault: str, sizes: Sizes) -> Run:
    client = RawClient(containerd.address)
    set_fault(proxy, fault)
    try:
        if fault == "refused":
            return pull_all(client, refs, Run("containerd", fault, len(refs)),
                            CALL_TIMEOUT_S)
        run = pull_all(client, refs[:sizes.hang_tries], Run("containerd", fault, len(refs)),
                       sizes.hang_deadline_s)
        run.probes = len(proxy.requests(status=NO_RESPONSE))
        return run
    finally:
        clear_fault(proxy)
        client.close()


@dataclass
class Results:
    runs: list[Run]
    load_at_start: str
    elapsed_s: float


def run_all(sizes: Sizes, workdir: Path) -> Results:
    started = time.monotonic()
    load = load_average()
    runs: list[Run] = []
    largest = max(sizes.counts)
    with contextlib.ExitStack() as stack:
        containerd = Containerd(workdir / "containerd")
        stack.callback(containerd.close)
        containerd.start()
        registry = Registry(workdir / "registry")
        stack.callback(registry.close)
        registry.start()
        proxy = stack.enter_context(FaultProxy(registry.url))
        containerd.write_hosts_toml(proxy.host, plain_http_hosts_toml(proxy.host))

        refs = [image_ref(proxy.host, f"bench/outage{i}", "v1") for i in range(largest)]
        direct = stack.enter_context(CriClient(containerd.address))
        for i, ref in enumerate(refs):
            push_new(registry.url, f"bench/outage{i}", "v1", seed=f"outage-bench-{i}")
            direct.pull(ref)

        for count in sizes.counts:
            for fault in FAULTS:
                runs.append(through_nodekeeper(workdir / f"nk-{fault}-{count}", containerd,
                                               proxy, refs[:count], fault))
                runs.append(containerd_alone(containerd, proxy, refs[:count], fault, sizes))
    return Results(runs, load, time.monotonic() - started)


# -- the report --------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:.3f} s"


def counted(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def target_s(count: int) -> float:
    return PROBE_TIMEOUT_S + (count - 1) * (OUTAGE_WAIT_S + SLACK_PER_PULL_S)


def containerd_cell(run: Run, sizes: Sizes) -> str:
    if run.fault == "refused":
        return f"{seconds(run.wall_s)}, every pull failed ({counted(run.codes)})"
    if set(run.codes) == {"DEADLINE_EXCEEDED"}:
        return (f"hangs: each of {len(run.costs)} pulls hit the client deadline "
                f"({sizes.hang_deadline_s:g} s), so N pulls take over "
                f"{run.count * sizes.hang_deadline_s:g} s")
    return "; ".join(f"{cost:.2f} s" for cost in run.costs) + f" ({counted(run.codes)})"


def before_cell(run: Run, value: float | None = None) -> str:
    """What the pulls cost before outage episodes: black-holed, each pull waited its own
    probe_timeout; refused, each probe failed at once then as now."""
    if run.fault == "refused":
        return "(refused at once, then as now)"
    if value is None:
        return f"{PROBE_TIMEOUT_S:g} s each"
    before = run.count * PROBE_TIMEOUT_S
    return f"{before:g} s (nodekeeper now {value / before:.2f}x)"


def table(res: Results, sizes: Sizes) -> list[str]:
    rows: list[tuple[str, ...]] = []
    by_key = {(r.target, r.fault, r.count): r for r in res.runs}
    for count in sizes.counts:
        for fault in FAULTS:
            nk, alone = by_key["nodekeeper", fault, count], by_key["containerd", fault, count]
            episode = nk.costs[1:]
            ok = nk.codes == Counter({"OK": count}) and nk.wall_s <= target_s(count)
            rows.append((
                f"{count} pulls, registry {fault}: until the last is answered",
                containerd_cell(alone, sizes), seconds(nk.wall_s),
                before_cell(nk, nk.wall_s),
                f"<= {target_s(count):.2f} s", verdict(ok)))
            rows.append((
                f"{count} pulls, registry {fault}: first pull; then each, p50 / p99",
                "", f"{seconds(nk.costs[0])}; {seconds(percentile(episode, 50))} / "
                f"{seconds(percentile(episode, 99))}",
                before_cell(nk), f"p99 <= {OUTAGE_WAIT_S + SLACK_PER_PULL_S:.2f} s",
                verdict(percentile(episode, 99) <= OUTAGE_WAIT_S + SLACK_PER_PULL_S)))
    header = ("metric", "containerd alone", "nodekeeper", "N x probe_timeout (before)",
              "target", "result")
    return markdown_table(header, rows)


def report(res: Results, sizes: Sizes, args: argparse.Namespace) -> str:
    details = []
    for run in res.runs:
        if run.target == "nodekeeper":
            details.append(
                f"- nodekeeper, {run.count} pulls, {run.fault}: answers {counted(run.codes)}; "
                f"decisions {counted(run.decisions)}; probes held by the black hole "
                f"{run.probes if run.fault == 'black-holed' else '(refused: not seen)'}; "
                "each pull (s): " + ", ".join(f"{c:.3f}" for c in run.costs))
        else:
            details.append(
                f"- containerd alone, {run.fault}: {len(run.costs)} pulls sent, "
                f"{counted(run.codes)}; each (s): " + ", ".join(f"{c:.3f}" for c in run.costs))
    lines = [
        "## nodekeeper outage benchmark", "", *machine_info(res.load_at_start),
        f"- nodekeeper: policy defaults `update: always`, `probe_timeout: "
        f"{PROBE_TIMEOUT_S:g}s`, `outage_wait` default ({OUTAGE_WAIT_S * 1000:.0f} ms); "
        "log level info, metrics off; a fresh daemon per run",
        f"- mode: {'quick' if args.quick else 'full'}; N = "
        f"{', '.join(map(str, sizes.counts))}; pulls back to back, one at a time",
        *details,
        f"- run time: {res.elapsed_s:.0f} s", "", *table(res, sizes), "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="pulls during a registry outage")
    parser.add_argument("--quick", action="store_true", help="N = 10 only (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    with work_directory(args.keep) as workdir:
        results = run_all(sizes, workdir)
    print(report(results, sizes, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
