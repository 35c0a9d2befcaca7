"""PullImage decisions against a real containerd and real registries: tags update, the
node's copy stands in within a bounded time when upstream fails, and never for
credentials that were not seen to work."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeNodekeeper, MakeRegistry
from tests.harness import (
    BearerAuth,
    Containerd,
    CriClient,
    FaultProxy,
    Registry,
    TokenServer,
    image_ref,
    plain_http_hosts_toml,
    push_new,
    push_new_with_token,
    tls_hosts_toml,
    write_htpasswd,
)
from tests.harness._proc import wait_for_count
from tests.harness.nodekeeper import Nodekeeper

pytestmark = pytest.mark.integration

Start = Callable[..., Nodekeeper]


def policy(**defaults: str) -> str:
    body = "".join(f"  {key}: {value}\n" for key, value in defaults.items())
    return f"defaults:\n{body}"


def pull(client: CriClient, ref: str, auth: cri.AuthConfig | None = None
         ) -> tuple[str, float] | tuple[grpc.StatusCode, str]:
    """(image_ref, seconds) on success, (code, message) on failure."""
    started = time.monotonic()
    try:
        return client.pull(ref, auth=auth), time.monotonic() - started
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]


def decisions(daemon: Nodekeeper) -> list[str]:
    return [e["decision"] for e in daemon.events() if e.get("rpc") == "PullImage"
            and "decision" in e]


def manifest_heads(registry: Registry, repo: str) -> int:
    return len(registry.requests("HEAD", f"/v2/{repo}/manifests/"))


def test_always_updates_a_moved_tag(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    ref = image_ref(registry.host, "app", "stable")
    v1 = push_new(registry.url, "app", "stable", seed="v1")
    with CriClient(daemon.socket) as kubelet, CriClient(containerd.address) as direct:
        assert pull(kubelet, ref)[0] == v1.config_digest
        assert pull(kubelet, ref)[0] == v1.config_digest
        v2 = push_new(registry.url, "app", "stable", seed="v2")
        assert pull(kubelet, ref)[0] == v2.config_digest
        assert direct.status(ref).image.id == v2.config_digest
    assert decisions(daemon) == ["pulled", "fresh", "updated"]


def test_interval_skips_upstream_until_it_elapses(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address,
                             policy=policy(update="interval", interval="2s"))
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed="interval")
    with CriClient(daemon.socket) as kubelet:
        assert pull(kubelet, ref)[0] == image.config_digest
        registry.clear_requests()
        for _ in range(5):
            assert pull(kubelet, ref)[0] == image.config_digest
        assert registry.requests() == []
        time.sleep(2.1)
        assert pull(kubelet, ref)[0] == image.config_digest
    registry.wait_for_requests(1, "HEAD")
    assert manifest_heads(registry, "app") == 1
    assert decisions(daemon)[1:] == ["local-interval"] * 5 + ["fresh"]


def following_events(daemon: Nodekeeper, count: int = 1) -> None:
    """Wait until nodekeeper has (re)subscribed to containerd's image events `count` times."""
    seen = wait_for_count(lambda: [e for e in daemon.events()
                                   if e.get("event") == "following containerd's image events"],
                          count, 15.0)
    assert len(seen) >= count, daemon.log_text()


def test_interval_answer_notices_images_removed_behind_its_back(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    # Inside the interval the node's copy is answered from what containerd's image events
    # kept true: a removal that bypasses nodekeeper must still be seen, also after
    # containerd restarted under it.
    daemon = make_nodekeeper(containerd.address, policy=policy(update="interval", interval="1h"))
    following_events(daemon)
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed="removed-out-of-band")
    with CriClient(daemon.socket) as kubelet:
        for restart in (False, True):
            if restart:
                containerd.restart()
                following_events(daemon, 2)
            assert pull(kubelet, ref)[0] == image.config_digest
            assert pull(kubelet, ref)[0] == image.config_digest
            with CriClient(containerd.address) as direct:
                direct.remove(ref)
                assert direct.status(ref).image.id == ""
                assert pull(kubelet, ref)[0] == image.config_digest
                assert direct.status(ref).image.id == image.config_digest
    assert decisions(daemon) == ["pulled", "local-interval", "pulled",
                                 "local-interval", "local-interval", "pulled"]


def test_never_sends_nothing_upstream(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="never"))
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed="never")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        registry.clear_requests()
        push_new(registry.url, "app", "v1", seed="moved")  # upstream moves; we do not look
        registry.clear_requests()
        assert pull(kubelet, ref)[0] == image.config_digest
        digest_ref = image_ref(registry.host, "app", digest=image.digest)
        assert pull(kubelet, digest_ref)[0] == image.config_digest
    time.sleep(0.2)
    assert registry.requests() == []
    assert decisions(daemon)[1:] == ["local-pinned", "local-pinned"]


@pytest.mark.parametrize("failure", ["stopped", "black-holed", "tag deleted"])
def test_failing_upstream_falls_back_within_probe_timeout(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper, failure: str
) -> None:
    daemon = make_nodekeeper(containerd.address,
                             policy=policy(update="always", probe_timeout="1s"))
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed=failure)
    with CriClient(daemon.socket) as kubelet, CriClient(containerd.address) as direct:
        pull(kubelet, ref)
        if failure == "stopped":
            registry.stop()
        elif failure == "black-holed":
            registry.freeze()
        else:
            registry.remove_tag("app", "v1")
        answer = pull(kubelet, ref)
        if failure != "black-holed":
            assert isinstance(pull(direct, ref)[0], grpc.StatusCode)  # containerd alone fails
        if failure == "black-holed":
            registry.thaw()
    assert answer[0] == image.config_digest
    assert isinstance(answer[1], float)
    # Within the probe timeout (1 s) and some slack for a busy machine: a black hole
    # answers nothing for as long as the client waits (no deadline here).
    assert answer[1] < 1.0 + 10
    fallback = [e for e in daemon.events() if e.get("event", "").startswith("upstream failed")]
    assert fallback
    assert fallback[0]["kind"] == {"stopped": "unreachable", "black-holed": "timeout",
                                     "tag deleted": "not_found"}[failure]
    assert fallback[0]["digest"] == image.digest
    assert fallback[0]["level"] == "warning"


def test_no_copy_and_unreachable_says_registry_unavailable(
    registry: Registry, nodekeeper: Nodekeeper
) -> None:
    ref = image_ref(registry.host, "app", "v1")
    push_new(registry.url, "app", "v1", seed="none")
    registry.stop()
    with CriClient(nodekeeper.socket) as kubelet:
        code, message = pull(kubelet, ref)
    assert code == grpc.StatusCode.UNKNOWN
    assert str(message).startswith("RegistryUnavailable:")


def test_fallback_class_not_listed_is_an_error(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(
        update="always", fallback_on="[unreachable]"))
    ref = image_ref(registry.host, "app", "v1")
    push_new(registry.url, "app", "v1", seed="narrow")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        registry.remove_tag("app", "v1")
        code, message = pull(kubelet, ref)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "does not include not_found" in str(message)


def test_credentials_decide_who_gets_the_cached_copy(
    make_registry: MakeRegistry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    registry = make_registry(htpasswd={"alice": "alice-pw", "bob": "bob-pw"})
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    image = push_new(registry.url, "private/app", "1", seed="private",
                     auth=("alice", "alice-pw"))
    ref = image_ref(registry.host, "private/app", "1")
    alice = cri.AuthConfig(username="alice", password="alice-pw")
    bob = cri.AuthConfig(username="bob", password="bob-pw")
    mallory = cri.AuthConfig(username="alice", password="guess")
    with CriClient(daemon.socket) as kubelet:
        assert pull(kubelet, ref, alice)[0] == image.config_digest
        # Registry up, wrong password: upstream says 401, nobody saw these work.
        code, message = pull(kubelet, ref, mallory)
        assert code == grpc.StatusCode.UNKNOWN
        assert "never seen to work" in str(message)
        # The password changes upstream: alice's old credentials now get 401, but they
        # pulled this image before, so the node's copy stands in.
        write_htpasswd(registry.base_dir / "htpasswd", {"alice": "new-pw", "bob": "bob-pw"})
        registry.restart()
        assert pull(kubelet, ref, alice)[0] == image.config_digest
        registry.stop()
        assert pull(kubelet, ref, alice)[0] == image.config_digest  # unreachable: known creds
        for stranger in (None, bob, mallory):  # never seen to work: refused
            code, message = pull(kubelet, ref, stranger)
            assert code == grpc.StatusCode.UNKNOWN
            assert "the node's copy is not used" in str(message)
    assert "alice-pw" not in daemon.log_text()
    assert "guess" not in daemon.log_text()


def test_auth_fallback_never_refuses_even_known_credentials(
    make_registry: MakeRegistry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    registry = make_registry(htpasswd={"alice": "alice-pw"})
    daemon = make_nodekeeper(containerd.address,
                             policy=policy(update="always", auth_fallback="never"))
    push_new(registry.url, "private/app", "1", seed="strict", auth=("alice", "alice-pw"))
    ref = image_ref(registry.host, "private/app", "1")
    alice = cri.AuthConfig(username="alice", password="alice-pw")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref, alice)
        registry.stop()
        code, message = pull(kubelet, ref, alice)
    assert code == grpc.StatusCode.UNKNOWN
    assert "auth_fallback is never" in str(message)


def test_interval_answer_still_checks_unverified_credentials(
    make_registry: MakeRegistry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    registry = make_registry(htpasswd={"alice": "alice-pw"})
    daemon = make_nodekeeper(containerd.address,
                             policy=policy(update="interval", interval="1h"))
    push_new(registry.url, "private/app", "1", seed="interval-auth", auth=("alice", "alice-pw"))
    ref = image_ref(registry.host, "private/app", "1")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref, cri.AuthConfig(username="alice", password="alice-pw"))
        code, _ = pull(kubelet, ref, cri.AuthConfig(username="alice", password="guess"))
        assert code == grpc.StatusCode.UNKNOWN
        code, _ = pull(kubelet, ref)
        assert code == grpc.StatusCode.UNKNOWN


def test_registry_with_a_private_ca_from_hosts_toml(
    make_registry: MakeRegistry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    registry = make_registry(tls=True)
    assert registry.ca_file is not None
    containerd.write_hosts_toml(registry.host, tls_hosts_toml(registry.host, registry.ca_file))
    daemon = make_nodekeeper(containerd.address, settings={
        "containerd": {"hosts_dir": str(containerd.hosts_dir)}},
        policy=policy(update="always"))
    image = push_new(registry.url, "tls/app", "1", seed="tls", verify=registry.verify())
    ref = image_ref(registry.host, "tls/app", "1")
    with CriClient(daemon.socket) as kubelet:
        assert pull(kubelet, ref)[0] == image.config_digest
        assert pull(kubelet, ref)[0] == image.config_digest
    assert decisions(daemon) == ["pulled", "fresh"]


def test_fifty_concurrent_pulls_share_a_few_upstream_requests(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed="burst")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
    registry.clear_requests()

    async def burst() -> list[bytes]:
        request = cri.PullImageRequest(image=cri.ImageSpec(image=ref)).SerializeToString()
        async with grpc.aio.insecure_channel(f"unix://{daemon.socket}") as channel:
            method = channel.unary_unary("/runtime.v1.ImageService/PullImage")
            return await asyncio.gather(*(method(request, timeout=30) for _ in range(50)))

    answers = [cri.PullImageResponse.FromString(a).image_ref for a in asyncio.run(burst())]
    assert answers == [image.config_digest] * 50
    time.sleep(0.3)
    # Calls that overlap share a round; one that arrives after a round asked upstream
    # waits for the next (singleflight.py). containerd alone asks 50 times.
    assert 1 <= manifest_heads(registry, "app") <= 6
    assert len(registry.requests()) == manifest_heads(registry, "app")


def test_broken_policy_reload_keeps_the_old_one(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="never"))
    ref = image_ref(registry.host, "app", "v1")
    push_new(registry.url, "app", "v1", seed="reload")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        daemon.policy_path.write_text("defaults:\n  update: sometimes\n")
        daemon.signal(1)
        deadline = time.monotonic() + 10
        while "policy reload failed" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "defaults.update: expected one of always, interval, never" in daemon.log_text()
        registry.clear_requests()
        pull(kubelet, ref)
        assert registry.requests() == []  # still `never`
        # A valid edit is picked up without a signal, from the file changing on disk.
        daemon.policy_path.write_text(policy(update="always"))
        while '"policy loaded"' not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        pull(kubelet, ref)
    registry.wait_for_requests(1, "HEAD")
    assert decisions(daemon)[-2:] == ["local-pinned", "fresh"]


def test_restart_keeps_state(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="interval", interval="1h"))
    ref = image_ref(registry.host, "app", "v1")
    push_new(registry.url, "app", "v1", seed="restart")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
    assert daemon.stop() == 0
    daemon.start()
    registry.clear_requests()
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
    time.sleep(0.2)
    assert registry.requests() == []
    assert decisions(daemon)[-1] == "local-interval"


def test_invalid_reference_is_invalid_argument(nodekeeper: Nodekeeper) -> None:
    with CriClient(nodekeeper.socket) as kubelet:
        for bad in ("docker.io/Upper/case:1", "app:bad tag", "a@sha256:short", "a:" + "t" * 200):
            code, message = pull(kubelet, bad)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid image reference" in str(message)


def test_status_and_explain_show_what_happened(
    registry: Registry, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="interval", interval="1h"))
    ref = image_ref(registry.host, "app", "v1")
    image = push_new(registry.url, "app", "v1", seed="report")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        pull(kubelet, ref)
    cli = [sys.executable, "-m", "nodekeeper"]

    def status() -> str:
        return subprocess.run([*cli, "status", "--config", str(daemon.config_path)],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    # Decisions reach the database a moment after their answers.
    shown = wait_for_count(lambda: ["ok"] if "local-interval" in status() else [], 1, 10)
    assert shown
    status = status()
    assert "local-interval" in status
    assert f"pid {daemon.proc.pid if daemon.proc else '?'}; state on disk" in status
    assert "loop:    worst lag" in status
    assert f"{ref}" in status
    assert image.digest in status
    explain = subprocess.run([*cli, "explain", ref, "--config", str(daemon.config_path)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert "rule:        defaults" in explain
    assert image.config_digest in explain
    assert "answer the node's copy without network (local-interval" in explain
    assert "anonymous pulls seen to work" in explain


@pytest.fixture
def proxied(registry: Registry, containerd: Containerd) -> Iterator[FaultProxy]:
    """The registry behind a proxy that fails on demand; images are named by the proxy,
    which containerd is told speaks plain HTTP (1.7 and later try HTTPS first)."""
    with FaultProxy(registry.url) as proxy:
        containerd.write_hosts_toml(proxy.host, plain_http_hosts_toml(proxy.host))
        yield proxy


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 429, "headers": {"Retry-After": "60"}}, "rate_limited"),
        ({"status": 500}, "server_error"),
        ({"status": 503}, "server_error"),
    ],
)
def test_rate_limits_and_server_errors_fall_back(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper, fault: dict[str, object], reason: str
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    image = push_new(registry.url, "app", "v1", seed=reason)
    ref = image_ref(proxied.host, "app", "v1")
    with CriClient(daemon.socket) as kubelet, CriClient(containerd.address) as direct:
        assert pull(kubelet, ref)[0] == image.config_digest
        proxied.respond(fault["status"], fault.get("headers"),  # type: ignore[arg-type]
                        path_contains="/manifests/")
        assert isinstance(pull(direct, ref)[0], grpc.StatusCode)  # containerd alone fails
        proxied.clear()
        assert pull(kubelet, ref)[0] == image.config_digest
    assert len(proxied.requests("HEAD", "/manifests/")) == 1  # no retry storm
    fallbacks = [e for e in daemon.events() if e.get("event", "").startswith("upstream failed")]
    assert [e["kind"] for e in fallbacks] == [reason]


def test_spent_docker_hub_quota_keeps_the_node_copy_when_the_tag_moved(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    image = push_new(registry.url, "app", "v1", seed="quota")
    ref = image_ref(proxied.host, "app", "v1")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        proxied.set_headers({"ratelimit-remaining": "0;w=21600"}, path_contains="/manifests/")
        assert pull(kubelet, ref)[0] == image.config_digest  # digest unchanged: fresh
        push_new(registry.url, "app", "v1", seed="quota-moved")
        proxied.clear()
        assert pull(kubelet, ref)[0] == image.config_digest  # a pull would be refused
    assert proxied.requests("GET", "/blobs/") == []
    assert decisions(daemon) == ["pulled", "fresh", "fallback"]


def test_missing_digest_header_is_computed_from_the_manifest(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    push_new(registry.url, "app", "v1", seed="nodigest")
    ref = image_ref(proxied.host, "app", "v1")
    proxied.drop_headers(["Docker-Content-Digest"], path_contains="/manifests/")
    with CriClient(daemon.socket) as kubelet:
        pull(kubelet, ref)
        pull(kubelet, ref)
    assert decisions(daemon) == ["pulled", "fresh"]


def test_token_auth_registry_with_cached_tokens(
    tmp_path: Path, containerd: Containerd, make_nodekeeper: MakeNodekeeper
) -> None:
    with TokenServer({"alice": "alice-pw"}, anonymous_pull={"public/app"},
                     base_dir=tmp_path / "tokens") as tokens, \
            Registry(tmp_path / "token-registry", token_auth=tokens) as registry:
        daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
        pusher = BearerAuth("alice", "alice-pw")
        private = push_new_with_token(registry.url, "private/app", "1", pusher, seed="token")
        public = push_new_with_token(registry.url, "public/app", "1", pusher, seed="public")
        alice = cri.AuthConfig(username="alice", password="alice-pw")
        private_ref = image_ref(registry.host, "private/app", "1")
        public_ref = image_ref(registry.host, "public/app", "1")
        with CriClient(daemon.socket) as kubelet:
            assert pull(kubelet, private_ref, alice)[0] == private.config_digest
            assert pull(kubelet, public_ref)[0] == public.config_digest
            tokens.clear()
            assert pull(kubelet, private_ref, alice)[0] == private.config_digest
            assert pull(kubelet, public_ref)[0] == public.config_digest
            assert tokens.requests() == []  # both tokens still valid: reused
            code, _ = pull(kubelet, private_ref)
            assert code == grpc.StatusCode.UNKNOWN
            registry.stop()
            assert pull(kubelet, public_ref)[0] == public.config_digest  # public: anyone
            code, _ = pull(kubelet, private_ref)
            assert code == grpc.StatusCode.UNKNOWN
            assert pull(kubelet, private_ref, alice)[0] == private.config_digest
        assert "alice-pw" not in daemon.log_text()


def test_always_answers_every_push_made_before_the_pull(
    registry: Registry, proxied: FaultProxy, containerd: Containerd,
    make_nodekeeper: MakeNodekeeper
) -> None:
    # Other pods keep pulling the tag, and the registry's answers to manifest HEADs take
    # 0.1 s to arrive, so a pull nearly always finds a round whose question went upstream
    # before the push. A pull that starts after a push must still answer the build pushed.
    daemon = make_nodekeeper(containerd.address, policy=policy(update="always"))
    ref = image_ref(proxied.host, "app", "live")
    push_new(registry.url, "app", "live", seed="fresh-0")
    with CriClient(daemon.socket) as first:
        first.pull(ref)
    proxied.answer_late(0.1, path_contains="/manifests/", method="HEAD")
    stop = threading.Event()

    def other_pods() -> None:
        with CriClient(daemon.socket) as neighbour:
            while not stop.is_set():
                neighbour.pull(ref)

    neighbours = [threading.Thread(target=other_pods) for _ in range(2)]
    for thread in neighbours:
        thread.start()
    stale = []
    try:
        with CriClient(daemon.socket) as kubelet:
            for round_number, gap in enumerate([0.0, 0.005, 0.02, 0.05, 0.1, 0.25] * 3, 1):
                pushed = push_new(registry.url, "app", "live", seed=f"fresh-{round_number}")
                if kubelet.pull(ref) != pushed.config_digest:
                    stale.append(round_number)
                time.sleep(gap)
    finally:
        stop.set()
        for thread in neighbours:
            thread.join(timeout=30)
    assert stale == [], f"stale answers after pushes {stale}"
