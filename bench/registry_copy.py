"""Registry-to-registry copy: nodekeeper's Copier beside `skopeo copy`, on loopback.

    .venv/bin/python bench/registry_copy.py [--layers 4] [--layer-mb 50] [--runs 3]

Starts one source registry (tests/harness) holding an image of `--layers` layers of
random, incompressible bytes, then copies it `--runs` times with each tool, every time
into a fresh, empty destination registry, alternating the tools. Each copy runs in its
own process:

  nodekeeper  `bench/registry_copy.py --child …`: Copier(Session()).copy(), parallel_blobs 4
  skopeo      `skopeo copy --src-tls-verify=false --dest-tls-verify=false
               docker://SRC/bench/x:t docker://DEST/bench/x:t`

Reports wall time and throughput (median of the runs), and the peak RSS of the copying
process (its VmHWM, polled); for nodekeeper also its growth during the copy (VmHWM after
the copy minus VmRSS before it, imports and session set up). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the harness lives in tests/, which is not installed
    sys.path.insert(0, str(ROOT))

from tests.harness import Image, Registry, push  # noqa: E402
from tests.harness.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST  # noqa: E402

REPO, TAG = "bench/x", "t"
TIMEOUT_S = 600.0


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_image(layers: int, layer_bytes: int) -> Image:
    """An OCI image whose layers are gzip tars of one random file each (level 1: random
    bytes do not compress, so the layers are about `layer_bytes` each)."""
    blobs: dict[str, bytes] = {}
    descriptors, diff_ids = [], []
    for n in range(layers):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(f"layer{n}.bin")
            info.size = layer_bytes
            tar.addfile(info, io.BytesIO(os.urandom(layer_bytes)))
        raw = buf.getvalue()
        gz = gzip.compress(raw, compresslevel=1, mtime=0)
        blobs[_digest(gz)] = gz
        diff_ids.append(_digest(raw))
        descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": _digest(gz), "size": len(gz)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    blobs[_digest(config)] = config
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": descriptors}).encode()
    return Image(manifest=manifest, digest=_digest(manifest), config=config,
                 config_digest=_digest(config), blobs=blobs,
                 layer_digests=tuple(str(d["digest"]) for d in descriptors),
                 platform=("linux", "amd64"))


def _status_kb(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status memory field in kB (0 once the process has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0  # a zombie has no memory fields


def child(source: str, dest: str, digest: str) -> None:
    """Copy REPO@digest from registry `source` to `dest` (host:port); print a JSON line."""
    from nodekeeper.registry import Copier, Endpoint, Location, Session

    async def run() -> dict[str, float]:
        session = Session()
        try:
            copier = Copier(session)
            src = Location(Endpoint(f"http://{source}/v2", source), REPO)
            dst = Location(Endpoint(f"http://{dest}/v2", dest), REPO)
            before = _status_kb("VmRSS")
            started = time.monotonic()
            report = await copier.copy(src, dst, digest, TAG)
            seconds = time.monotonic() - started
            return {"seconds": seconds, "rss_before_kb": before,
                    "hwm_after_kb": _status_kb("VmHWM"), "bytes": report.bytes_copied}
        finally:
            await session.close()

    print(json.dumps(asyncio.run(run())))


def _run_measured(argv: list[str], work: Path,
                  env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run argv; (wall seconds, its peak RSS in kB, stdout).

    The peak is the child's VmHWM, read while it runs (it only grows). Not wait4's
    ru_maxrss: Linux keeps that across exec, so a child reports at least the RSS its
    parent (this script, which built the image) had when it forked."""
    out_path, err_path = work / "out", work / "err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    deadline = started + TIMEOUT_S
    peak = 0
    while True:
        peak = max(peak, _status_kb("VmHWM", proc.pid))
        try:
            proc.wait(0.005)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                break
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n"
                           f"{err_path.read_text()[-2000:]}")
    return wall, peak, out_path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DEST", "DIGEST"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    skopeo = shutil.which("skopeo")
    with tempfile.TemporaryDirectory(prefix="nk-bench-copy-") as tmp:
        work = Path(tmp)
        image = random_image(args.layers, args.layer_mb * 1024 * 1024)
        total = sum(len(b) for b in image.blobs.values())
        digest = image.digest
        with Registry(work / "source") as source:
            push(source.url, REPO, TAG, image)
            del image  # a few hundred MB
            # tool -> runs of (copy seconds, process wall seconds, peak RSS kB, growth kB)
            results: dict[str, list[tuple[float, float, int, int]]] = {
                "nodekeeper": [], "skopeo": []}
            env = {**os.environ, "HOME": str(work / "home"), "XDG_DATA_HOME": str(work / "xdg")}
            for run in range(args.runs):
                for tool in ("nodekeeper", "skopeo") if run % 2 == 0 else ("skopeo", "nodekeeper"):
                    if tool == "skopeo" and skopeo is None:
                        continue
                    with Registry(work / f"dest-{tool}-{run}") as dest:
                        if tool == "nodekeeper":
                            wall, peak, out = _run_measured(
                                [sys.executable, __file__, "--child", source.host, dest.host,
                                 digest], work)
                            line = json.loads(out.strip().splitlines()[-1])
                            growth = int(line["hwm_after_kb"] - line["rss_before_kb"])
                            results[tool].append((float(line["seconds"]), wall, peak, growth))
                        else:
                            assert skopeo is not None
                            wall, peak, _ = _run_measured(
                                [skopeo, "copy", "--quiet", "--src-tls-verify=false",
                                 "--dest-tls-verify=false",
                                 f"docker://{source.host}/{REPO}:{TAG}",
                                 f"docker://{dest.host}/{REPO}:{TAG}"], work, env=env)
                            results[tool].append((wall, wall, peak, -1))
                        if tool == "skopeo" or run == 0:
                            _check_copied(dest, digest)
    print(f"image: {args.layers} layers, {total / 1e6:.1f} MB; {args.runs} runs each; "
          f"{os.cpu_count()} CPUs; skopeo {'found' if skopeo else 'missing'}\n")
    print("| tool | copy s | MB/s | process s | peak RSS MB | RSS growth in copy MB |")
    print("|---|---|---|---|---|---|")
    for tool, runs in results.items():
        if not runs:
            continue
        seconds = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        peak_mb = max(r[2] for r in runs) / 1024
        growth = max(r[3] for r in runs)
        grown = f"{growth / 1024:.1f}" if growth >= 0 else "n/a"
        print(f"| {tool} | {seconds:.2f} | {total / 1e6 / seconds:.0f} | {wall:.2f} "
              f"| {peak_mb:.1f} | {grown} |")
    print("\nMedians over the runs (peak and growth: the largest). 'copy s' for nodekeeper is "
          "timed inside its process (interpreter start and imports excluded); 'process s' "
          "is the whole process, which for skopeo is all there is.")


def _check_copied(dest: Registry, digest: str) -> None:
    import httpx

    from tests.harness.oci import MANIFEST_ACCEPT
    response = httpx.head(f"{dest.url}/v2/{REPO}/manifests/{TAG}",
                          headers={"Accept": MANIFEST_ACCEPT})
    if response.headers.get("docker-content-digest") != digest:
        raise RuntimeError(f"{dest.host} holds {response.headers.get('docker-content-digest')} "
                           f"under {TAG}, not {digest}")


if __name__ == "__main__":
    main()
