"""The demo behind scripts/demo.sh: a private containerd and registry, nodekeeper in front,
images pulled through it and shown. Everything runs under one temporary directory and
is stopped before exit."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodekeeper._proto import cri_image_pb2 as cri
from tests.harness import Containerd, CriClient, Registry, image_ref, push_new
from tests.harness.nodekeeper import Nodekeeper

USER, PASSWORD = "demo", "demo-password"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nodekeeper-demo-") as tmp:
        work = Path(tmp)
        containerd = Containerd(work / "containerd")
        registry = Registry(work / "registry", htpasswd={USER: PASSWORD})
        daemon: Nodekeeper | None = None
        try:
            step(f"Starting a private containerd (root {containerd.root})")
            containerd.start()
            step("Starting a password-protected registry on 127.0.0.1")
            registry.start()
            print(f"    registry at {registry.url}")

            step("Building a small OCI image in Python and pushing it as demo/hello:1")
            image = push_new(registry.url, "demo/hello", "1", seed="demo", auth=(USER, PASSWORD))
            ref = image_ref(registry.host, "demo/hello", "1")
            print(f"    {ref}\n    manifest {image.digest}\n    image id {image.config_digest}")

            step("Starting nodekeeper in front of containerd")
            daemon = Nodekeeper(work / "nodekeeper", containerd.address,
                                settings={"log": {"level": "info"}})
            daemon.start()
            print(f"    kubelet socket {daemon.socket} -> containerd {containerd.address}")

            with CriClient(daemon.socket) as kubelet, CriClient(containerd.address) as direct:
                step("PullImage through nodekeeper without credentials")
                try:
                    kubelet.pull(ref)
                    print("    unexpectedly succeeded")
                except grpc.RpcError as exc:
                    print(f"    refused, as containerd refuses it: {exc.code().name}")  # type: ignore[attr-defined]

                step("PullImage through nodekeeper with the pod's credentials")
                auth = cri.AuthConfig(username=USER, password=PASSWORD)
                print(f"    image_ref {kubelet.pull(ref, auth=auth)}")

                step("ImageStatus through nodekeeper, and straight from containerd")
                via, straight = kubelet.status(ref).image, direct.status(ref).image
                print(f"    id {via.id}\n    tags {list(via.repo_tags)}\n"
                      f"    digests {list(via.repo_digests)}")
                print(f"    identical to containerd's own answer: {via == straight}")

                step("A new build is pushed under the same tag; the next pull picks it up")
                update = push_new(registry.url, "demo/hello", "1", seed="demo-v2",
                                  auth=(USER, PASSWORD))
                print(f"    pushed image id {update.config_digest}")
                print(f"    nodekeeper answers {kubelet.pull(ref, auth=auth)}")

                step("The registry goes down")
                registry.stop()
                try:
                    direct.pull(ref, auth=auth)
                except grpc.RpcError as exc:
                    print(f"    containerd alone: {exc.code().name}")  # type: ignore[attr-defined]
                started = time.monotonic()
                answer = kubelet.pull(ref, auth=auth)
                print(f"    nodekeeper: the node's copy {answer} after "
                      f"{(time.monotonic() - started) * 1000:.0f} ms")
                wrong = cri.AuthConfig(username=USER, password="not-the-password")
                try:
                    kubelet.pull(ref, auth=wrong)
                except grpc.RpcError as exc:
                    print(f"    a pod with the wrong password is refused: "
                          f"{exc.code().name}")  # type: ignore[attr-defined]

                step("ListImages through nodekeeper")
                for listed in kubelet.list().images:
                    print(f"    {listed.id[:19]}…  {', '.join(listed.repo_tags)}")

            step("nodekeeper's log lines (one per RPC; credentials never appear)")
            for event in daemon.events():
                if event.get("event") == "rpc":
                    shown = {k: event[k] for k in ("rpc", "decision", "reason", "code",
                                                   "duration_ms") if k in event}
                    print(f"    {json.dumps(shown)}")
            assert PASSWORD not in daemon.log_text()
        finally:
            step("Stopping everything")
            if daemon is not None:
                print(f"    nodekeeper exited with {daemon.stop()}")
            registry.close()
            containerd.close()
            print("    containerd and the registry are stopped; nothing is left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
