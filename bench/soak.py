"""A soak: a busy node's kubelet traffic for ten minutes while everything around
nodekeeper fails in turn, watching its memory, file descriptors and event loop.

    .venv/bin/python bench/soak.py [--quick] [--minutes N] [--keep]

Starts a private containerd (tests/harness), a public registry behind a FaultProxy and a
password-protected registry, pushes a few images, then starts nodekeeper (log level
info, metrics on loopback, state on a tmpfs of its own) and, for the whole run:

  kubelet        ImageStatus every 0.1 s, timed from a process of its own
                 (tests/harness/sampler.py); ListImages every 5 s and ImageFsInfo every
                 2 s (the kubelet's own periods are about 30 s and 10 s: a busier node);
                 every 5 s a burst of 12 concurrent PullImage calls across tags,
                 repositories and credentials (anonymous, right password, wrong password,
                 a tag that does not exist); every 20 s a RemoveImage by image ID.
  upstream       every 60 s the public registry fails for 20 s, in turn refusing
                 connections, black-holed (connections accepted, never answered) and
                 answering 503; every other time the private registry is stopped and
                 started instead. One tag moves (a new image pushed) every 30 s.
  policy         every 30 s a reload, in turn: the largest policy allowed (by SIGHUP),
                 the ordinary one (by editing the file: the daemon notices), one with an
                 alias bomb and one with a backreference (both refused: the last good
                 policy stays).
  state          every 90 s the state tmpfs is remounted read-only for 30 s.

Every 5 s it samples nodekeeper's resident memory, open file descriptors and threads.
nodekeeper runs with MALLOC_ARENA_MAX=2, as its systemd unit sets it.
At the end it reads nodekeeper's log (decisions, errors, episodes), metrics (event loop
lag) and the status file, and checks that nothing grew: the median RSS of the last
minute within RSS_BOUND_MIB of the first minute after warm-up, open descriptors within
FD_BOUND, threads within THREAD_BOUND; every ImageStatus answered and none stalled past
STATUS_STALL_S (containerd's own ImageStatus is timed alongside, for comparison); no
event loop lag sample over LOOP_LAG_BOUND_S; the daemon still running. --quick runs one
minute with every period shortened (a CI-sized smoke run). Prints markdown; exits 1 when
a check fails.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from _common import (
    load_average,
    machine_info,
    markdown_table,
    percentile,
    verdict,
    work_directory,
)

from nodekeeper._proto import cri_image_pb2 as cri
from nodekeeper.host import runstatus
from tests.harness import (
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    free_port,
    image_ref,
    push_new,
)
from tests.harness.mounts import Tmpfs
from tests.harness.nodekeeper import Nodekeeper, scrape
from tests.harness.policies import largest_policy
from tests.harness.sampler import Sampler

POLICY = """\
defaults:
  update: always
  probe_timeout: 1s
rules:
  - match: "**"
    tags: ["v[0-9]+"]
    update: interval
    interval: 20s
"""
BAD_POLICIES = ("defaults: &a {update: always}\nrules: [*a, *a]\n",
                "rules:\n  - match: '**'\n    tags: ['(v)\\1']\n")
USER, PASSWORD = "kubelet", "soak-password"
PULL_TIMEOUT_S = 30.0

# The checks. Memory is compared between the first minute after warm-up and the last
# one, by median: Python's allocator keeps what it once used, so a real leak shows as a
# steady climb, not as the peak of one busy second.
RSS_BOUND_MIB = 8.0
FD_BOUND = 8
THREAD_BOUND = 2
# nodekeeper's own share of an ImageStatus is its event loop's lag. Calls also wait
# behind the PullImage calls of a burst, each a few milliseconds of work on that loop, so
# the end-to-end check is only that none stalls.
LOOP_LAG_BOUND_S = 0.05
STATUS_STALL_S = 1.0


@dataclass(frozen=True)
class Plan:
    """How long the run takes, and how often each thing happens (seconds)."""

    duration: float
    warmup: float
    window: float          # the first and last window compared for growth
    sample: float
    status_pause: float
    list_every: float
    fsinfo_every: float
    burst_every: float
    burst_size: int
    remove_every: float
    move_every: float
    flap_every: float
    flap_for: float
    reload_every: float
    readonly_every: float
    readonly_for: float


FULL = Plan(duration=600, warmup=60, window=60, sample=5, status_pause=0.1, list_every=5,
            fsinfo_every=2, burst_every=5, burst_size=12, remove_every=20, move_every=30,
            flap_every=60, flap_for=20, reload_every=30, readonly_every=90, readonly_for=30)
QUICK = Plan(duration=60, warmup=12, window=12, sample=2, status_pause=0.1, list_every=5,
             fsinfo_every=2, burst_every=4, burst_size=8, remove_every=10, move_every=15,
             flap_every=20, flap_for=6, reload_every=8, readonly_every=25, readonly_for=8)


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the traffic started
    rss_kib: int
    fds: int
    threads: int


@dataclass
class Observed:
    samples: list[Sample] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)  # "RPC CODE", as clients saw
    events: list[tuple[float, str]] = field(default_factory=list)  # what the run did
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, rpc: str, code: str) -> None:
        with self.lock:
            self.answers[f"{rpc} {code}"] += 1


@dataclass
class Results:
    plan: Plan
    observed: Observed
    status_latencies: list[float]
    status_errors: list[str]
    status_failures: list[tuple[float, str]]
    containerd_latencies: list[float]
    decisions: Counter[str]
    errors: Counter[str]
    episodes: Counter[str]
    lag_over_50ms: float
    lag_samples: float
    worst_lag_s: float
    alive: bool
    last_status: str
    load_at_start: str
    elapsed_s: float


# -- the node's traffic ----------------------------------------------------------------------

def every(seconds: float, stop: threading.Event, work: Callable[[], None]) -> None:
    while not stop.wait(seconds):
        work()


def code_of(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[attr-defined]
    return "OK"


class Kubelet:
    """The reads, pulls and removals a kubelet sends, from threads of this process."""

    def __init__(self, socket: str, plan: Plan, seen: Observed,
                 pulls: Sequence[tuple[str, cri.AuthConfig | None]], keep: str) -> None:
        self.socket, self.plan, self.seen = socket, plan, seen
        self.pulls = pulls
        self.keep = keep  # the image the timed ImageStatus asks for: never removed
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        jobs = [(self.plan.list_every, self._list), (self.plan.fsinfo_every, self._fsinfo),
                (self.plan.burst_every, self._burst), (self.plan.remove_every, self._remove)]
        for seconds, work in jobs:
            thread = threading.Thread(target=every, args=(seconds, self.stop, work),
                                      name=work.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(PULL_TIMEOUT_S + 5)

    def _list(self) -> None:
        with CriClient(self.socket) as client:
            self.seen.answered("ListImages", code_of(lambda: client.list(timeout=10)))

    def _fsinfo(self) -> None:
        with CriClient(self.socket) as client:
            self.seen.answered("ImageFsInfo", code_of(lambda: client.fsinfo(timeout=10)))

    def _burst(self) -> None:
        chosen = list(itertools.islice(itertools.cycle(self.pulls), self.plan.burst_size))

        def one(pull: tuple[str, cri.AuthConfig | None]) -> str:
            with CriClient(self.socket) as client:
                return code_of(lambda: client.pull(pull[0], pull[1], timeout=PULL_TIMEOUT_S))

        with ThreadPoolExecutor(len(chosen)) as pool:
            for code in pool.map(one, chosen):
                self.seen.answered("PullImage", code)
        # The next burst starts the list at another place.
        self.pulls = [*self.pulls[1:], self.pulls[0]]

    def _remove(self) -> None:
        with CriClient(self.socket) as client:
            try:
                images = client.list(timeout=10).images
            except grpc.RpcError as exc:
                self.seen.answered("ListImages", exc.code().name)  # type: ignore[attr-defined]
                return
            victims = [i for i in images if self.keep not in i.repo_tags]
            if victims:
                victim = victims[int(time.monotonic()) % len(victims)]
                self.seen.answered("RemoveImage",
                                   code_of(lambda: client.remove(victim.id, timeout=10)))


# -- what fails around it ----------------------------------------------------------------------

class Chaos:
    """Upstream flaps, policy reloads, the state directory going read-only; in turn."""

    def __init__(self, plan: Plan, seen: Observed, proxy: FaultProxy, private: Registry,
                 public: Registry, daemon: Nodekeeper, state: Tmpfs) -> None:
        self.plan, self.seen = plan, seen
        self.proxy, self.private, self.public = proxy, private, public
        self.daemon, self.state = daemon, state
        self.started = time.monotonic()
        self._flaps = itertools.cycle(["refuse", "private", "hang", "private", "503"])
        self._policies = itertools.cycle(["largest", "ordinary", "bad0", "bad1"])
        self._moves = itertools.count(1)
        self._largest = largest_policy(POLICY.split("rules:")[0])
        self._due: dict[str, float] = {}
        self._undo: dict[str, float] = {}
        self._flapping = ""

    def note(self, what: str) -> None:
        with self.seen.lock:
            self.seen.events.append((round(time.monotonic() - self.started, 1), what))

    def tick(self, now: float) -> None:
        """Start and end whatever is due at `now` (seconds since the start)."""
        plan = self.plan
        if self._is_due("flap", now, plan.flap_every):
            kind = next(self._flaps)
            self._flap(kind)
            self._undo["flap"] = now + plan.flap_for
        if self._is_due("policy", now, plan.reload_every):
            self._reload(next(self._policies))
        if self._is_due("move", now, plan.move_every):
            push_new(self.public.url, "soak/app", "moving",
                     seed=f"soak-moving-{next(self._moves)}")
            self.note("tag soak/app:moving moved")
        if self._is_due("readonly", now, plan.readonly_every):
            self.state.read_only()
            self.note("state directory read-only")
            self._undo["readonly"] = now + plan.readonly_for
        for what, when in list(self._undo.items()):
            if now >= when:
                del self._undo[what]
                self._restore(what)

    def _is_due(self, what: str, now: float, period: float) -> bool:
        due = self._due.setdefault(what, period)
        if now < due:
            return False
        self._due[what] = due + period
        return True

    def _flap(self, kind: str) -> None:
        if kind == "refuse":
            self.proxy.refuse()
        elif kind == "hang":
            self.proxy.hang(max_seconds=self.plan.flap_for + 5)
        elif kind == "503":
            self.proxy.respond(503)
        else:
            self.private.stop()
        self._flapping = kind
        self.note(f"upstream down: {'private registry stopped' if kind == 'private' else kind}")

    def _restore(self, what: str) -> None:
        if what == "readonly":
            self.state.writable()
            self.note("state directory writable")
            return
        if self._flapping == "private":
            self.private.start()
        else:
            self.proxy.start()
            self.proxy.passthrough()
        self.note("upstream back")

    def _reload(self, which: str) -> None:
        text = {"largest": self._largest, "ordinary": POLICY, "bad0": BAD_POLICIES[0],
                "bad1": BAD_POLICIES[1]}[which]
        self.daemon.policy_path.write_text(text)
        if which != "ordinary":  # the ordinary one is noticed by the file watch
            self.daemon.signal(1)
        self.note(f"policy reload: {which}")

    def close(self) -> None:
        for what in list(self._undo):
            with contextlib.suppress(Exception):
                self._restore(what)
        self._undo.clear()


def sample(pid: int, since: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Sample(round(time.monotonic() - since, 1), int(fields["VmRSS"].split()[0]),
                  len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


# -- the run ---------------------------------------------------------------------------------

def lag_counts(metrics: dict[str, float]) -> tuple[float, float]:
    """Event loop lag samples: how many were over 50 ms, and how many in all."""
    count = metrics["nodekeeper_event_loop_lag_seconds_count"]
    return count - metrics['nodekeeper_event_loop_lag_seconds_bucket{le="0.05"}'], count


def from_log(daemon: Nodekeeper) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """PullImage decisions, failed RPCs by code and reason, and episodes logged."""
    decisions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    episodes: Counter[str] = Counter()
    for event in daemon.events():
        if event.get("event") == "rpc":
            if event.get("code") == "OK":
                if event.get("rpc") == "PullImage":
                    shared = " (shared)" if event.get("shared") else ""
                    decisions[f"{event.get('decision')}{shared}"] += 1
            else:
                errors[f"{event.get('rpc')} {event.get('code')} "
                       f"{event.get('reason') or event.get('decision') or ''}".strip()] += 1
        elif event.get("level") in ("warning", "error"):
            episodes[f"{event.get('level')}: {str(event.get('event')).split(';')[0]}"] += 1
    return decisions, errors, episodes


def images(registry: Registry, private: Registry) -> None:
    for repo, tags in (("soak/app", ("v1", "v2", "v3", "moving")), ("soak/web", ("v1", "v2"))):
        for tag in tags:
            push_new(registry.url, repo, tag, seed=f"soak-{repo}-{tag}")
    for tag in ("v1", "v2"):
        push_new(private.url, "soak/secret", tag, seed=f"soak-secret-{tag}",
                 auth=private.auth)


def run(plan: Plan, workdir: Path) -> Results:
    started = time.monotonic()
    load = load_average()
    seen = Observed()
    with contextlib.ExitStack() as stack:
        containerd = stack.enter_context(Containerd(workdir / "containerd"))
        public = stack.enter_context(Registry(workdir / "public"))
        private = stack.enter_context(Registry(workdir / "private",
                                               htpasswd={USER: PASSWORD}))
        proxy = stack.enter_context(FaultProxy(public.url))
        state = stack.enter_context(Tmpfs(workdir / "state", size=16 << 20))
        images(public, private)

        address = f"127.0.0.1:{free_port()}"
        # MALLOC_ARENA_MAX as packaging/nodekeeper.service sets it.
        daemon = Nodekeeper(workdir / "nk", containerd.address, policy=POLICY, settings={
            "log": {"level": "info", "format": "json"}, "metrics_address": address,
            "state_dir": str(state.path)}, env={"MALLOC_ARENA_MAX": "2"})
        stack.callback(daemon.stop)
        daemon.start()
        assert daemon.proc is not None
        assert daemon.notify is not None
        pid, notify = daemon.proc.pid, daemon.notify

        right = cri.AuthConfig(username=USER, password=PASSWORD)
        wrong = cri.AuthConfig(username=USER, password="not-the-password")
        keep = image_ref(proxy.host, "soak/app", "v1")
        pulls = [(keep, None), (image_ref(proxy.host, "soak/app", "v2"), None),
                 (image_ref(proxy.host, "soak/app", "v3"), right),
                 (image_ref(proxy.host, "soak/app", "moving"), None),
                 (image_ref(proxy.host, "soak/web", "v1"), None),
                 (image_ref(proxy.host, "soak/web", "v2"), None),
                 (image_ref(private.host, "soak/secret", "v1"), right),
                 (image_ref(private.host, "soak/secret", "v2"), right),
                 (image_ref(private.host, "soak/secret", "v1"), wrong),
                 (image_ref(private.host, "soak/secret", "v2"), None),
                 (image_ref(proxy.host, "soak/app", "no-such-tag"), None)]
        with CriClient(daemon.socket) as client:
            client.pull(keep, timeout=PULL_TIMEOUT_S)
        # Lag is counted from here: the first pull sets up TLS for registries, once.
        lag_before = lag_counts(scrape(address))

        chaos = Chaos(plan, seen, proxy, private, public, daemon, state)
        kubelet = Kubelet(daemon.socket, plan, seen, pulls, keep)
        # containerd's own ImageStatus of the same image, timed alongside: what the
        # machine and containerd allow, under the same load.
        with Sampler(daemon.socket, keep, plan.status_pause) as timed, \
                Sampler(containerd.address, keep, plan.status_pause) as direct:
            kubelet.start()
            since = time.monotonic()
            next_sample = 0.0
            try:
                while (now := time.monotonic() - since) < plan.duration:
                    if now >= next_sample:
                        seen.samples.append(sample(pid, since))
                        next_sample += plan.sample
                        notify.drain()  # as systemd reads its notifications
                    chaos.tick(now)
                    time.sleep(0.05)
            finally:
                chaos.close()
                kubelet.close()
        seen.samples.append(sample(pid, since))
        alive = daemon.proc.poll() is None
        # The work directory is this run's own: shown as $WORK.
        statuses = [line.replace(str(workdir), "$WORK") for message in notify.drain()
                    for line in message.splitlines() if line.startswith("STATUS=")]
        metrics = scrape(address)
        decisions, errors, episodes = from_log(daemon)
        running = runstatus.read(runstatus.path_for(daemon.socket))
    (over_after, count_after), (over_before, count_before) = lag_counts(metrics), lag_before
    lag = running.loop_lag if running is not None else None
    worst = lag.worst_s if lag is not None else -1.0
    return Results(plan, seen, timed.latencies, timed.errors, timed.failures,
                   direct.latencies, decisions, errors, episodes, over_after - over_before,
                   count_after - count_before, worst, alive,
                   statuses[-1] if statuses else "none", load, time.monotonic() - started)


# -- the report ------------------------------------------------------------------------------

def window(samples: Sequence[Sample], start: float, length: float) -> list[Sample]:
    return [s for s in samples if start <= s.at < start + length]


def checks(res: Results) -> list[tuple[str, str, str, str]]:
    plan, samples = res.plan, res.observed.samples
    first = window(samples, plan.warmup, plan.window)
    last = window(samples, plan.duration - plan.window, plan.window + 1)

    def median(of: Sequence[Sample], value: Callable[[Sample], int]) -> float:
        return statistics.median(value(s) for s in of)

    rss = (median(last, lambda s: s.rss_kib) - median(first, lambda s: s.rss_kib)) / 1024
    fds = median(last, lambda s: s.fds) - median(first, lambda s: s.fds)
    threads = median(last, lambda s: s.threads) - median(first, lambda s: s.threads)
    slowest = max(res.status_latencies)
    return [
        ("resident memory, last minute vs first after warm-up (medians)",
         f"{rss:+.1f} MiB", f"<= {RSS_BOUND_MIB:g} MiB", verdict(rss <= RSS_BOUND_MIB)),
        ("open file descriptors, same windows", f"{fds:+.0f}", f"<= {FD_BOUND}",
         verdict(fds <= FD_BOUND)),
        ("threads, same windows", f"{threads:+.0f}", f"<= {THREAD_BOUND}",
         verdict(threads <= THREAD_BOUND)),
        ("ImageStatus answered", f"{len(res.status_latencies) - len(res.status_errors)} of "
         f"{len(res.status_latencies)}", "all", verdict(not res.status_errors)),
        ("ImageStatus, slowest", f"{slowest * 1000:.1f} ms",
         f"< {STATUS_STALL_S * 1000:.0f} ms", verdict(slowest < STATUS_STALL_S)),
        (f"event loop lag samples over {LOOP_LAG_BOUND_S * 1000:.0f} ms",
         f"{res.lag_over_50ms:.0f} of {res.lag_samples:.0f}", "0",
         verdict(res.lag_over_50ms == 0)),
        ("daemon still running at the end", "yes" if res.alive else "NO", "yes",
         verdict(res.alive)),
    ]


def counted(counts: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def report(res: Results, quick: bool) -> tuple[str, bool]:
    plan = res.plan
    samples = res.observed.samples
    lat, direct = res.status_latencies, res.containerd_latencies
    rows = checks(res)
    over_time = [(f"{s.at:.0f}", f"{s.rss_kib / 1024:.1f}", str(s.fds), str(s.threads))
                 for s in samples[:: max(1, round(plan.window / plan.sample / 2))]]
    events = Counter(what.split(":")[0] for _, what in res.observed.events)
    lines = [
        "## nodekeeper soak", "", *machine_info(res.load_at_start),
        f"- mode: {'quick' if quick else 'full'}, {plan.duration:.0f} s of traffic after one "
        f"pull; warm-up {plan.warmup:.0f} s; growth compared over {plan.window:.0f} s windows",
        f"- traffic: ImageStatus every {plan.status_pause:g} s (timed from its own process), "
        f"ListImages every {plan.list_every:g} s, ImageFsInfo every {plan.fsinfo_every:g} s, "
        f"{plan.burst_size} concurrent PullImage every {plan.burst_every:g} s, RemoveImage "
        f"every {plan.remove_every:g} s",
        f"- around it: upstream down {plan.flap_for:g} s of every {plan.flap_every:g} s; "
        f"a policy reload every {plan.reload_every:g} s; state read-only "
        f"{plan.readonly_for:g} s of every {plan.readonly_every:g} s; a tag moved every "
        f"{plan.move_every:g} s",
        f"- what the run did: {counted(events)}",
        "- when: " + "; ".join(f"{at:.0f} {what}" for at, what in res.observed.events),
        f"- answers as the clients saw them: {counted(res.observed.answers)}",
        f"- containerd's own ImageStatus, alongside: {len(direct)} calls, p50 "
        f"{percentile(direct, 50) * 1000:.2f} ms, p99 {percentile(direct, 99) * 1000:.2f} ms, "
        f"max {max(direct) * 1000:.2f} ms",
        f"- ImageStatus through nodekeeper: {len(lat)} calls, p50 "
        f"{percentile(lat, 50) * 1000:.2f} ms, p99 {percentile(lat, 99) * 1000:.2f} ms, "
        f"max {max(lat) * 1000:.2f} ms"
        + (f"; failed: {counted(Counter(res.status_errors))}, at (s): "
           f"{', '.join(f'{at:.1f}' for at, _ in res.status_failures)}"
           if res.status_errors else ""),
        f"- PullImage decisions (nodekeeper's log): {counted(res.decisions)}",
        f"- failed RPCs by code and reason (nodekeeper's log): {counted(res.errors)}",
        f"- warnings and errors logged: {counted(res.episodes)}",
        f"- event loop: worst lag since start {res.worst_lag_s * 1000:.1f} ms (status file, "
        f"start-up included); during the traffic {res.lag_over_50ms:.0f} of "
        f"{res.lag_samples:.0f} samples over 50 ms",
        f"- the daemon's last {res.last_status}",
        f"- run time: {res.elapsed_s:.0f} s", "",
        *markdown_table(("seconds", "RSS MiB", "open fds", "threads"), over_time), "",
        *markdown_table(("check", "measured", "bound", "result"), rows), "",
    ]
    return "\n".join(lines), all(row[3] == "PASS" for row in rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nodekeeper under a long, failing load")
    parser.add_argument("--quick", action="store_true", help="one minute (a smoke run)")
    parser.add_argument("--minutes", type=float, help="how long the traffic runs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.minutes:
        plan = Plan(**{**plan.__dict__, "duration": args.minutes * 60})
    with work_directory(args.keep) as workdir:
        results = run(plan, workdir)
    text, passed = report(results, args.quick)
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
