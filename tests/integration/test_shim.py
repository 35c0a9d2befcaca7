"""nodekeeper in front of a real containerd: every forwarded RPC answers exactly as
containerd does, and the daemon survives bad input and a containerd that goes away."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import httpx
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeContainerd, MakeNodekeeper, MakeRegistry
from tests.harness import Containerd, CriClient, Registry, free_port, image_ref, push_new
from tests.harness.nodekeeper import Nodekeeper

pytestmark = pytest.mark.integration

T = TypeVar("T")


def outcome(call: Callable[[], T]) -> T | tuple[grpc.StatusCode, str]:
    """The answer, or the status code and message of the error."""
    try:
        return call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def without_timestamps(answer: cri.ImageFsInfoResponse) -> cri.ImageFsInfoResponse:
    for usage in [*answer.image_filesystems, *answer.container_filesystems]:
        usage.timestamp = 0
    return answer


def test_every_rpc_answers_as_containerd_does(
    registry: Registry, cri_client: CriClient, via_nodekeeper: CriClient
) -> None:
    image = push_new(registry.url, "team/app", "v1", seed="side-by-side")
    ref = image_ref(registry.host, "team/app", "v1")
    by_digest = image_ref(registry.host, "team/app", digest=image.digest)

    assert via_nodekeeper.pull(ref) == image.config_digest == cri_client.pull(ref)
    assert via_nodekeeper.pull(by_digest) == cri_client.pull(by_digest)
    for name in (ref, by_digest, image.config_digest, "absent:1"):
        for verbose in (False, True):
            assert via_nodekeeper.status(name, verbose=verbose) == cri_client.status(
                name, verbose=verbose)
    assert via_nodekeeper.list() == cri_client.list()
    assert via_nodekeeper.list().images  # not trivially equal
    assert via_nodekeeper.list(ref) == cri_client.list(ref)
    assert without_timestamps(via_nodekeeper.fsinfo()) == without_timestamps(cri_client.fsinfo())

    missing = image_ref(registry.host, "team/app", "no-such-tag")
    assert isinstance(outcome(lambda: cri_client.pull(missing)), tuple)
    code, message = outcome(lambda: via_nodekeeper.pull(missing))  # type: ignore[misc]
    assert code == grpc.StatusCode.NOT_FOUND  # nodekeeper decides PullImage: it says why
    assert "not_found" in message

    via_nodekeeper.remove(image.config_digest)
    assert not cri_client.status(ref).HasField("image")
    via_nodekeeper.remove(image.config_digest)  # idempotent, as in containerd
    assert not via_nodekeeper.status(ref).HasField("image")


def test_credentials_pass_through_and_never_reach_the_log(
    make_registry: MakeRegistry, cri_client: CriClient, via_nodekeeper: CriClient,
    nodekeeper: Nodekeeper,
) -> None:
    password = "pw-that-must-not-be-logged-7f3a"
    registry = make_registry(htpasswd={"alice": password})
    image = push_new(registry.url, "private/app", "1", seed="private", auth=("alice", password))
    ref = image_ref(registry.host, "private/app", "1")
    good = cri.AuthConfig(username="alice", password=password)
    bad = cri.AuthConfig(username="alice", password="wrong-password-also-secret")

    direct = outcome(lambda: cri_client.pull(ref))
    assert isinstance(direct, tuple)
    for refused in (None, bad):
        code, message = outcome(lambda a=refused: via_nodekeeper.pull(ref, auth=a))  # type: ignore[misc]
        assert code == direct[0]  # the code containerd answers for a 401
        assert "unauthorized" in message
    assert via_nodekeeper.pull(ref, auth=good) == image.config_digest
    log = nodekeeper.log_text()
    assert "private/app" in log
    assert password not in log
    assert "wrong-password-also-secret" not in log


def test_ready_status_and_socket_mode(nodekeeper: Nodekeeper) -> None:
    assert nodekeeper.notify is not None
    messages = nodekeeper.notify.drain()
    assert any("STATUS=Serving on" in m for m in messages)
    eventually(lambda: any("reachable" in m and "not reachable" not in m
                           for m in nodekeeper.notify.drain()))  # type: ignore[union-attr]
    assert stat.S_IMODE(os.stat(nodekeeper.socket).st_mode) == 0o660


def test_refuses_to_start_over_a_live_nodekeeper(
    make_nodekeeper: MakeNodekeeper, nodekeeper: Nodekeeper, containerd: Containerd
) -> None:
    second = make_nodekeeper(containerd.address, start=False,
                             settings={"listen": nodekeeper.socket})
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(15) == 1
    assert "already answers" in second.log_text()
    with CriClient(nodekeeper.socket) as client:  # the first one still serves
        client.list()


def test_stale_socket_from_a_crash_is_replaced(
    make_nodekeeper: MakeNodekeeper, nodekeeper: Nodekeeper, containerd: Containerd
) -> None:
    assert nodekeeper.proc is not None
    nodekeeper.proc.kill()
    nodekeeper.proc.wait()
    second = make_nodekeeper(containerd.address, settings={"listen": nodekeeper.socket})
    with CriClient(second.socket) as client:
        client.list()
    assert "removed stale socket" in second.log_text()


def test_sigterm_stops_cleanly(nodekeeper: Nodekeeper) -> None:
    assert nodekeeper.stop() == 0
    assert not os.path.exists(nodekeeper.socket)
    assert nodekeeper.notify is not None
    assert any(m.startswith("STOPPING=1") for m in nodekeeper.notify.drain())


def start_pull(socket_path: str, ref: str) -> tuple[threading.Thread, list[object]]:
    """A PullImage running in a thread; its outcome lands in the returned list."""
    result: list[object] = []

    def run() -> None:
        with CriClient(socket_path, timeout=None) as client:
            result.append(outcome(lambda: client.pull(ref)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_in_flight_pull_finishes_within_grace(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd, registry: Registry
) -> None:
    image = push_new(registry.url, "app", "v1", seed="grace")
    daemon = make_nodekeeper(containerd.address, settings={"shutdown_grace": "20s"})
    registry.freeze()
    thread, result = start_pull(daemon.socket, image_ref(registry.host, "app", "v1"))
    time.sleep(0.5)  # the pull is now waiting on the frozen registry
    daemon.signal(15)
    time.sleep(0.5)
    registry.thaw()
    thread.join(30)
    assert result == [image.config_digest]
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 0
    assert "cancelled RPCs" not in daemon.log_text()


def test_in_flight_pull_is_cancelled_after_grace(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd, registry: Registry
) -> None:
    push_new(registry.url, "app", "v1", seed="cancel")
    daemon = make_nodekeeper(containerd.address, settings={"shutdown_grace": "1s"})
    registry.freeze()
    thread, result = start_pull(daemon.socket, image_ref(registry.host, "app", "v1"))
    time.sleep(0.5)
    started = time.monotonic()
    assert daemon.stop() == 0
    # The grace (1 s), then the pull is cancelled: it would wait for as long as the
    # registry stays frozen.
    assert time.monotonic() - started < 30
    thread.join(10)
    registry.thaw()
    assert isinstance(result[0], tuple)
    cancelled = [e for e in daemon.events() if e.get("event") == "cancelled RPCs still running "
                 "at shutdown"]
    assert cancelled
    assert cancelled[0]["cancelled"] == 1


def test_second_sigterm_stops_at_once(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd, registry: Registry
) -> None:
    push_new(registry.url, "app", "v1", seed="second")
    daemon = make_nodekeeper(containerd.address, settings={"shutdown_grace": "60s"})
    registry.freeze()
    thread, _ = start_pull(daemon.socket, image_ref(registry.host, "app", "v1"))
    time.sleep(0.5)
    started = time.monotonic()
    daemon.signal(15)
    time.sleep(0.3)
    daemon.signal(15)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 0
    assert time.monotonic() - started < 30  # half the grace the first signal began
    assert "second signal" in daemon.log_text()
    registry.thaw()
    thread.join(10)


def test_client_vanishing_mid_call_leaves_the_daemon_serving(
    nodekeeper: Nodekeeper, registry: Registry
) -> None:
    push_new(registry.url, "app", "v1", seed="vanish")
    registry.freeze()
    channel = grpc.insecure_channel(f"unix://{nodekeeper.socket}")
    future = channel.unary_unary("/runtime.v1.ImageService/PullImage").future(
        cri.PullImageRequest(image=cri.ImageSpec(
            image=image_ref(registry.host, "app", "v1"))).SerializeToString())
    time.sleep(0.5)
    future.cancel()
    channel.close()
    registry.thaw()
    eventually(lambda: any(e.get("rpc") == "PullImage" and e.get("outcome") == "cancelled"
                           for e in nodekeeper.events()))
    with CriClient(nodekeeper.socket) as client:
        client.list()


def test_garbage_on_the_socket_is_survived(nodekeeper: Nodekeeper) -> None:
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                 + b"\xff" * 100):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(nodekeeper.socket)
        raw.sendall(junk)
        raw.close()
    with CriClient(nodekeeper.socket) as client:
        assert client.list() is not None
    assert nodekeeper.proc is not None
    assert nodekeeper.proc.poll() is None


def test_messages_up_to_16_mib_are_accepted(via_nodekeeper: CriClient) -> None:
    spec = cri.ImageSpec(image="x" * (5 * 1024 * 1024))  # over gRPC's 4 MiB default
    code, message = outcome(lambda: via_nodekeeper.raw(
        "ImageStatus", cri.ImageStatusRequest(image=spec).SerializeToString()))  # type: ignore[misc]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "references are at most" in message
    huge = cri.ImageSpec(image="x" * (17 * 1024 * 1024))
    code, _ = outcome(lambda: via_nodekeeper.raw(  # type: ignore[misc]
        "ImageStatus", cri.ImageStatusRequest(image=huge).SerializeToString()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_starts_without_containerd_and_connects_when_it_comes(
    make_nodekeeper: MakeNodekeeper, containerd: Containerd
) -> None:
    containerd.stop()
    daemon = make_nodekeeper(containerd.address)
    with CriClient(daemon.socket) as client:
        code, message = outcome(client.list)  # type: ignore[misc]
        assert code == grpc.StatusCode.UNAVAILABLE
        assert f"containerd is unavailable at {containerd.address}" in message
        containerd.start()
        eventually(lambda: not isinstance(outcome(client.list), tuple), timeout=10)
    assert "containerd unreachable" in daemon.log_text()
    assert "containerd reachable" in daemon.log_text()


def test_containerd_restart_is_survived(
    nodekeeper: Nodekeeper, containerd: Containerd, via_nodekeeper: CriClient
) -> None:
    via_nodekeeper.list()
    containerd.stop()
    code, _ = outcome(via_nodekeeper.list)  # type: ignore[misc]
    assert code == grpc.StatusCode.UNAVAILABLE
    containerd.start()
    eventually(lambda: not isinstance(outcome(via_nodekeeper.list), tuple), timeout=10)
    assert nodekeeper.proc is not None
    assert nodekeeper.proc.poll() is None


def test_sighup_reload_applies_log_level_and_survives_a_broken_file(
    nodekeeper: Nodekeeper, via_nodekeeper: CriClient
) -> None:
    original = nodekeeper.config_path.read_text()
    nodekeeper.config_path.write_text(original + "\nbogus_key: 1\n")
    nodekeeper.signal(1)
    eventually(lambda: "reload failed" in nodekeeper.log_text())
    assert "bogus_key: unknown key" in nodekeeper.log_text()
    via_nodekeeper.status("absent:1")
    eventually(lambda: any(e.get("rpc") == "ImageStatus" for e in nodekeeper.events()))

    eventually(lambda: nodekeeper.log_text().count('"reloaded"') == 1)
    nodekeeper.config_path.write_text(original.replace("level: debug", "level: warning"))
    nodekeeper.signal(1)
    # Reloads run off the event loop: wait for this one, not the first one's line.
    eventually(lambda: nodekeeper.log_text().count('"reloaded"') == 2)
    before = len([e for e in nodekeeper.events() if e.get("rpc") == "ImageStatus"])
    via_nodekeeper.status("absent:2")
    time.sleep(0.3)
    after = len([e for e in nodekeeper.events() if e.get("rpc") == "ImageStatus"])
    assert after == before  # debug lines are now filtered


def test_watchdog_pings(make_nodekeeper: MakeNodekeeper, containerd: Containerd) -> None:
    daemon = make_nodekeeper(containerd.address, env={"WATCHDOG_USEC": "200000"})
    assert daemon.notify is not None
    time.sleep(0.6)
    pings = [m for m in daemon.notify.drain() if m == "WATCHDOG=1"]
    assert len(pings) >= 3


def test_metrics_endpoint(make_nodekeeper: MakeNodekeeper, containerd: Containerd) -> None:
    address = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(containerd.address, settings={"metrics_address": address})
    with CriClient(daemon.socket) as client:
        client.status("absent:1")
    body = httpx.get(f"http://{address}/metrics", timeout=5).text
    assert 'nodekeeper_rpcs_total{code="OK",rpc="ImageStatus"} 1.0' in body
    assert "nodekeeper_containerd_reachable 1.0" in body
    eventually(lambda: "nodekeeper_containerd_image_events 1.0"
               in httpx.get(f"http://{address}/metrics", timeout=5).text)


def test_pinned_sandbox_image_answers_as_containerd_does(
    registry: Registry, make_containerd: MakeContainerd, make_nodekeeper: MakeNodekeeper
) -> None:
    pause = push_new(registry.url, "pause", "1", seed="sandbox")
    sandbox = image_ref(registry.host, "pause", "1")
    containerd = make_containerd(sandbox_image=sandbox)
    daemon = make_nodekeeper(containerd.address)
    with CriClient(containerd.address) as direct, CriClient(daemon.socket) as kubelet:
        assert kubelet.pull(sandbox) == pause.config_digest
        status = direct.status(sandbox)
        # 1.7 and later mark the sandbox image pinned (GC must keep it); 1.6 never sets it.
        assert status.image.pinned == (containerd.release.name != "1.6")
        assert kubelet.status(sandbox) == status
        assert kubelet.status(sandbox, verbose=True) == direct.status(sandbox, verbose=True)
        assert kubelet.list() == direct.list()
