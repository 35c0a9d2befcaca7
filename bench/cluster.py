"""A rollout across a cluster: what a new build costs the upstream registry, and how long
until the last node has it, with nodekeeper and with containerd alone on the same nodes.

    .venv/bin/python bench/cluster.py [--nodes 4 8] [--rounds 3] [--layer-mb 3]
                                      [--gap 1.5] [--interval 5] [--interval-gap 0.3]
                                      [--containerd 2.3] [--quiet S] [--keep]
                                      [--upstream-mbit M --upstream-rtt MS]

For each K in --nodes, one cluster (tests/harness/cluster.py): K nodes on this machine,
each its own containerd and its own nodekeeper (policy `update: always`, but `update:
interval` for the tag `interval`; backing with `timeout: 1s` and the default
`fetch_wait`), one upstream and one backing registry on loopback. Then, --rounds times,
for each way of pulling and each target, in alternating order:

  a new build     `bench/app:v1` pushed upstream: one layer of --layer-mb MB of random
                  bytes, so every round is a new digest for every node
  at once         every node pulls it at the same moment (a Deployment's pods scheduled
                  together)
  staggered       node after node, --gap seconds after the previous answer
  containerd      the pulls go to each node's containerd directly (no nodekeeper)
  nodekeeper      the pulls go through each node's nodekeeper, as its kubelet's would;
                  the round ends once every copy to backing they started has ended

  interval        `bench/app:interval` under `update: interval` (--interval seconds):
                  every node pulls a new build of it, then, once every node's own check
                  is older than the interval, the nodes pull it again one after another
                  (--interval-gap apart, so that all K pull within one interval);
                  upstream should see one check (HEAD) for the cluster,
                  the other nodes taking the first node's check shared through backing
                  (`cluster-interval`); containerd alone resolves on every node (K)

  --upstream-mbit the nodes reach upstream through one link (tests/harness/link.py) of
                  M megabits a second shared by every node and a round trip of
                  --upstream-rtt ms, as a cluster reaches a registry on the internet
                  through its NAT; backing stays on loopback, as it is in the cluster.
                  Without it, upstream is as near and as fast as backing.

Upstream's access log gives what it served in the round (requests that did not fail):
manifest GETs and HEADs, blob GETs and their bytes. "Seconds until the last node" runs
from the first pull's start to the last pull's answer (staggered: gaps included);
"slowest pull" is the round's longest single PullImage. Prints markdown tables, the
targets with PASS/FAIL last; see docs/benchmarks.md.

The nodekeeper the nodes run is the one `python -m nodekeeper` finds from the current
directory: run from the checkout for its own, or from elsewhere with PYTHONPATH naming
another checkout to measure that one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import load_average, machine_info, markdown_table, work_directory

from tests.harness.cluster import ALWAYS, Cluster, Traffic
from tests.harness.containerd import RELEASES

WAYS = ("at once", "staggered")
INTERVAL_WAY = "interval"
TARGETS = ("containerd", "nodekeeper")
INTERVAL_TAG = "interval"
# The last node through nodekeeper within this many times containerd alone's.
TIME_TARGET = 1.5


def policy(interval: float) -> str:
    return (f"{ALWAYS}rules:\n  - match: '**'\n    tags: ['{INTERVAL_TAG}']\n"
            f"    update: interval\n    interval: {interval:g}s\n")


@dataclass(frozen=True)
class Round:
    nodes: int
    way: str
    target: str
    traffic: Traffic
    until_last: float
    slowest: float
    decisions: Counter[str]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-mb", type=float, default=3.0)
    parser.add_argument("--gap", type=float, default=1.5, help="seconds, staggered")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds, the `update: interval` of the interval rounds "
                             "(at least 5: a node shares a check of a tag and digest at "
                             "most every 5 s)")
    parser.add_argument("--interval-gap", type=float, default=0.3,
                        help="seconds between pulls in the interval rounds")
    parser.add_argument("--containerd", default="2.3", choices=sorted(RELEASES))
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="end a round once upstream was quiet this long, instead of "
                             "waiting for nodekeeper to log that every copy ended (for "
                             "a nodekeeper that logs no skipped copy)")
    parser.add_argument("--upstream-mbit", type=float, default=0.0,
                        help="megabits a second of the nodes' one shared link to upstream "
                             "(default: none, upstream on loopback like backing)")
    parser.add_argument("--upstream-rtt", type=float, default=0.0,
                        help="milliseconds, the round trip of that link")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.upstream_rtt and not args.upstream_mbit:
        parser.error("--upstream-rtt needs --upstream-mbit")
    return args


def steady(cluster: Cluster, quiet: float = 0.3) -> Traffic:
    """Upstream's traffic once its access log has stopped growing for `quiet` seconds."""
    last = cluster.traffic()
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = cluster.traffic()
        if len(now.requests) != len(last.requests):
            last, since = now, time.monotonic()
    return last


def one_round(cluster: Cluster, way: str, target: str, seed: str, layer_bytes: int,
              gap: float, quiet: float) -> Round:
    image = cluster.push_new("bench/app", "v1", seed=seed, layer_bytes=layer_bytes)
    ref = cluster.ref("bench/app", "v1")
    cluster.upstream.clear_requests()
    direct = target == "containerd"
    if way == "at once":
        pulls = cluster.pull_at_once(ref, direct=direct)
    else:
        pulls = cluster.pull_staggered(ref, gap=gap, direct=direct)
    wrong = [a for a in pulls.answers if a != image.config_digest]
    if wrong:
        raise RuntimeError(f"{target}, {way}: pulls answered {wrong}")
    decisions: Counter[str] = Counter()
    if not direct:
        if not quiet:
            cluster.settle(image.digest)
        for node in cluster.nodes:
            decisions.update(node.decisions(image.digest))
    return Round(len(cluster.nodes), way, target, steady(cluster, quiet or 0.3),
                 pulls.until_last,
                 max(pulls.durations), decisions)


def interval_round(cluster: Cluster, target: str, seed: str, gap: float,
                   interval: float) -> Round:
    """A new build of the interval tag on every node, then, once every node's own check
    is older than the interval, the nodes pull it again one after another."""
    image = cluster.push_new("bench/app", INTERVAL_TAG, seed=seed)
    ref = cluster.ref("bench/app", INTERVAL_TAG)
    direct = target == "containerd"
    cluster.pull_at_once(ref, direct=direct)
    if not direct:
        cluster.settle(image.digest)
        time.sleep(interval + 0.5)
    before = {node.name: len(node.decisions()) for node in cluster.nodes}
    cluster.upstream.clear_requests()
    pulls = cluster.pull_staggered(ref, gap=gap, direct=direct)
    wrong = [a for a in pulls.answers if a != image.config_digest]
    if wrong:
        raise RuntimeError(f"{target}, interval: pulls answered {wrong}")
    decisions: Counter[str] = Counter()
    for node in cluster.nodes if not direct else []:
        decisions.update(node.decisions()[before[node.name]:])
    return Round(len(cluster.nodes), INTERVAL_WAY, target, steady(cluster),
                 pulls.until_last, max(pulls.durations), decisions)


def run(args: argparse.Namespace, workdir: Path) -> list[Round]:
    rounds: list[Round] = []
    layer_bytes = int(args.layer_mb * 1024 * 1024)
    for count in args.nodes:
        link = (args.upstream_rtt / 1000, args.upstream_mbit) if args.upstream_mbit else None
        with Cluster(workdir / f"k{count}", release=RELEASES[args.containerd],
                     nodes=count, policy=policy(args.interval),
                     upstream_link=link) as cluster:
            for number in range(args.rounds):
                order = TARGETS if number % 2 == 0 else TARGETS[::-1]
                for way in WAYS:
                    for target in order:
                        seed = f"k{count}-{way}-{target}-{number}-{time.time_ns()}"
                        rounds.append(one_round(cluster, way, target, seed, layer_bytes,
                                                args.gap, args.quiet))
                for target in order:
                    seed = f"k{count}-interval-{target}-{number}-{time.time_ns()}"
                    rounds.append(interval_round(cluster, target, seed,
                                                 args.interval_gap, args.interval))
    return rounds


def _same(values: list[int]) -> str:
    """One number when every round agrees, else min-max."""
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def report(rounds: list[Round], args: argparse.Namespace, load: str) -> str:
    lines = ["# bench/cluster.py", "", *machine_info(load, RELEASES[args.containerd].version),
             f"- layer {args.layer_mb:g} MB of random bytes, staggered gap {args.gap:g} s, "
             f"{args.rounds} rounds per row, `update: interval` of "
             f"{args.interval:g} s for the tag `{INTERVAL_TAG}`, pulled "
             f"{args.interval_gap:g} s apart",
             "- upstream: " + (f"through one link of {args.upstream_mbit:g} Mbit/s shared by "
                               f"every node, {args.upstream_rtt:g} ms round trip"
                               if args.upstream_mbit else "on loopback, like backing"), ""]
    header = ("K", "pulls", "target", "manifest GETs", "manifest HEADs", "blob GETs",
              "MB from upstream", "s until last node (median, max)", "slowest pull s",
              "decisions")
    rows = []
    for count in args.nodes:
        for way in (*WAYS, INTERVAL_WAY):
            for target in TARGETS:
                mine = [r for r in rounds
                        if (r.nodes, r.way, r.target) == (count, way, target)]
                if not mine:
                    continue
                seconds = [r.until_last for r in mine]
                decided: Counter[str] = Counter()
                for r in mine:
                    decided.update(r.decisions)
                per_round = ", ".join(f"{name} {n / len(mine):g}"
                                      for name, n in sorted(decided.items()))
                megabytes = [r.traffic.blob_bytes / 2**20 for r in mine]
                rows.append((
                    str(count), way, target,
                    _same([r.traffic.manifest_gets for r in mine]),
                    _same([r.traffic.manifest_heads for r in mine]),
                    _same([r.traffic.blob_gets for r in mine]),
                    f"{statistics.median(megabytes):.1f}",
                    f"{statistics.median(seconds):.2f}, {max(seconds):.2f}",
                    f"{statistics.median(r.slowest for r in mine):.2f}",
                    per_round or "-"))
    lines += markdown_table(header, rows)
    lines += ["", "Per new digest (one round); interval: per check of the tag once every "
              "node's own check is old. decisions: nodekeeper's, per round.", ""]
    lines += markdown_table(("K", "pulls", "target", "measured", "PASS/FAIL"),
                            targets(rounds, args))
    return "\n".join(lines)


def targets(rounds: list[Round], args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The goals, per K and way, over every round (the worst one counts): one manifest GET
    and one GET per blob (config and layer) upstream for the cluster, the last node within
    TIME_TARGET times containerd alone's (medians), one check upstream per interval."""
    rows: list[tuple[str, ...]] = []

    def row(count: int, way: str, target: str, measured: str, ok: bool) -> None:
        rows.append((str(count), way, target, measured, "PASS" if ok else "FAIL"))

    for count in args.nodes:
        for way in WAYS:
            mine = [r for r in rounds if (r.nodes, r.way, r.target) == (count, way,
                                                                       "nodekeeper")]
            alone = [r.until_last for r in rounds
                     if (r.nodes, r.way, r.target) == (count, way, "containerd")]
            if not mine or not alone:
                continue
            gets = max(r.traffic.manifest_gets for r in mine)
            row(count, way, "1 manifest GET", str(gets), gets == 1)
            blobs = max(r.traffic.blob_gets for r in mine)
            row(count, way, "1 GET per blob (2)", str(blobs), blobs == 2)
            ratio = statistics.median(r.until_last for r in mine) / statistics.median(alone)
            row(count, way, f"last node <= {TIME_TARGET:g}x containerd alone",
                f"{ratio:.2f}x", ratio <= TIME_TARGET)
        mine = [r for r in rounds
                if (r.nodes, r.way, r.target) == (count, INTERVAL_WAY, "nodekeeper")]
        if mine:
            heads = max(r.traffic.manifest_heads for r in mine)
            row(count, INTERVAL_WAY, "1 check (HEAD) upstream", str(heads), heads == 1)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = load_average()
    with work_directory(args.keep) as workdir:
        rounds = run(args, workdir)
    print(report(rounds, args, load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
