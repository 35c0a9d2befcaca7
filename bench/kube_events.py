"""What Kubernetes Events cost the daemon: start-up and idle memory, and the two clients.

    .venv/bin/python bench/kube_events.py [--starts 5] [--official PYTHON]

Starts a private containerd and a real kube-apiserver (tests/harness), then

  daemon   `python -m nodekeeper serve` with kubernetes.events off, and on with the node's
           kubeconfig (client certificate): seconds from process start to READY=1, VmRSS
           after a few idle seconds (the Events client is built by then), and VmRSS idle
           again after one PullImage that probed a loopback registry (the state of any
           node that has pulled, where the registry client's share of httpx is loaded);
  clients  one child interpreter per client that imports the daemon's modules, then the
           client, then posts 1 and 100 Events: import time and VmRSS at each step. The
           official client (`kubernetes` from PyPI) is measured when --official names an
           interpreter that has it; it runs with this checkout's packages on PYTHONPATH.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import ROOT, load_average, machine_info, markdown_table, verdict, work_directory

from tests.harness import Containerd, CriClient, Registry, image_ref, push_new
from tests.harness.apiserver import ApiServer
from tests.harness.nodekeeper import Nodekeeper

RSS_MB = 55.0
READY_S = 1.0
IDLE_S = 3.0

_CHILD = r"""
import asyncio, json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
which, kubeconfig, namespace, pod, uid = sys.argv[1:6]
out = {"start": rss()}
import nodekeeper.daemon  # the daemon's own import set
out["daemon_modules"] = rss()
def event(i):
    return {"metadata": {"name": f"{pod}.bench{which}{i}"},
            "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": namespace,
                               "name": pod, "uid": uid},
            "reason": "ImageFallback", "message": f"bench {i}", "type": "Warning",
            "source": {"component": "nodekeeper", "host": "node-a"}, "count": 1}
started = time.perf_counter()
if which == "own":
    from nodekeeper.kube.sink import ApiSink
    out["import_s"] = time.perf_counter() - started
    out["client_imported"] = rss()
    async def post():
        sink = ApiSink(kubeconfig, 5.0)
        await sink.create(namespace, event(0))
        out["posted_1"] = rss()
        for i in range(1, 101):
            await sink.create(namespace, event(i))
        out["posted_101"] = rss()
        await sink.close()
    asyncio.run(post())
else:
    from kubernetes import client, config
    out["import_s"] = time.perf_counter() - started
    out["client_imported"] = rss()
    config.load_kube_config(config_file=kubeconfig)
    api = client.CoreV1Api()
    api.create_namespaced_event(namespace, event(0))
    out["posted_1"] = rss()
    for i in range(1, 101):
        api.create_namespaced_event(namespace, event(i))
    out["posted_101"] = rss()
print(json.dumps(out))
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


def daemon_settings(kubeconfig: Path | None) -> dict[str, Any]:
    kubernetes: dict[str, Any] = ({"events": False} if kubeconfig is None else
                                  {"kubeconfig": str(kubeconfig), "node_name": "node-a"})
    return {"log": {"level": "info", "format": "json"}, "kubernetes": kubernetes}


def measure_daemon(workdir: Path, containerd: str, kubeconfig: Path | None, starts: int,
                   image: str) -> tuple[list[float], float, float]:
    ready = []
    for i in range(starts):
        daemon = Nodekeeper(workdir / f"start{i}", containerd,
                            settings=daemon_settings(kubeconfig))
        try:
            daemon.start(wait_ready=False)
            ready.append(daemon.wait_ready(15.0))
        finally:
            daemon.stop()
    daemon = Nodekeeper(workdir / "idle", containerd, settings=daemon_settings(kubeconfig))
    try:
        daemon.start()
        time.sleep(IDLE_S)
        assert daemon.proc is not None
        rss = rss_mb(daemon.proc.pid)
        with CriClient(daemon.socket) as client:
            client.pull(image)
        time.sleep(IDLE_S)
        rss_pulled = rss_mb(daemon.proc.pid)
        said = [line["event"] for line in daemon.events()]
    finally:
        daemon.stop()
    expected = "kubernetes events on" if kubeconfig else "kubernetes events off"
    if expected not in said or any("not ready" in event for event in said):
        raise RuntimeError(f"{workdir}: the daemon did not say {expected!r}: {said}")
    return ready, rss, rss_pulled


def measure_client(python: str, which: str, kubeconfig: Path, pod: dict[str, Any],
                   ) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(p)) for p in sys.path if p.endswith("site-packages")] + [str(ROOT)])}
    meta = pod["metadata"]
    done = subprocess.run([python, "-c", _CHILD, which, str(kubeconfig), meta["namespace"],
                           meta["name"], meta["uid"]], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{which} client run failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def report(ready: dict[str, list[float]], rss: dict[str, float], pulled: dict[str, float],
           clients: dict[str, dict[str, float]]) -> str:
    rows = []
    for mode in ("events off", "events on"):
        med, top = statistics.median(ready[mode]), max(ready[mode])
        rows.append((f"daemon, {mode}: start to READY=1 (median, max of {len(ready[mode])})",
                     f"{med:.3f} s, {top:.3f} s", f"<= {READY_S:.0f} s", verdict(top <= READY_S)))
        rows.append((f"daemon, {mode}: idle VmRSS", f"{rss[mode]:.1f} MB", f"<= {RSS_MB:.0f} MB",
                     verdict(rss[mode] <= RSS_MB)))
        rows.append((f"daemon, {mode}: idle VmRSS after a pull", f"{pulled[mode]:.1f} MB",
                     f"<= {RSS_MB:.0f} MB", verdict(pulled[mode] <= RSS_MB)))
    rows.append(("daemon: events on - off, idle VmRSS (fresh; after a pull)",
                 f"{rss['events on'] - rss['events off']:+.1f} MB; "
                 f"{pulled['events on'] - pulled['events off']:+.1f} MB", "", ""))
    for name, got in clients.items():
        base = got["daemon_modules"]
        rows.append((f"{name} client: import after the daemon's modules",
                     f"{got['import_s'] * 1000:.0f} ms, {got['client_imported'] - base:+.1f} MB",
                     "", ""))
        rows.append((f"{name} client: after 1 / 101 Events posted",
                     f"{got['posted_1'] - base:+.1f} MB / {got['posted_101'] - base:+.1f} MB "
                     f"(over {base:.1f} MB)", "", ""))
    return "\n".join(markdown_table(("metric", "value", "target", "result"), rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="starts timed per mode")
    parser.add_argument("--official", help="an interpreter with the `kubernetes` package")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    load = load_average()
    with work_directory(args.keep) as workdir, contextlib.ExitStack() as stack:
        containerd = Containerd(workdir / "containerd")
        stack.callback(containerd.close)
        containerd.start()
        apiserver = ApiServer(workdir / "apiserver")
        stack.callback(apiserver.close)
        apiserver.start()
        registry = Registry(workdir / "registry")
        stack.callback(registry.close)
        registry.start()
        push_new(registry.url, "bench/app", "v1", seed="nodekeeper-kube-events-bench")
        image = image_ref(registry.host, "bench/app", "v1")
        kubeconfig = apiserver.write_kubeconfig(workdir / "kubelet.conf")
        pod = apiserver.create_pod("default", "bench")
        ready: dict[str, list[float]] = {}
        rss: dict[str, float] = {}
        pulled: dict[str, float] = {}
        for mode, path in (("events off", None), ("events on", kubeconfig)):
            ready[mode], rss[mode], pulled[mode] = measure_daemon(
                workdir / mode.replace(" ", "-"), containerd.address, path, args.starts, image)
        clients = {"own (httpx)": measure_client(sys.executable, "own", kubeconfig, pod)}
        if args.official:
            clients["official (kubernetes)"] = measure_client(args.official, "official",
                                                              kubeconfig, pod)
    print("\n".join(["## Kubernetes Events: start-up and memory", "", *machine_info(load), "",
                     report(ready, rss, pulled, clients), ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
