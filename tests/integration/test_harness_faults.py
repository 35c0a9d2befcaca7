"""The fault proxy and the token-auth registry against the real things: distribution 2.8 and
containerd 1.6, 1.7 and 2.3 (CRI). Besides checking the harness, these pin down how each
containerd reacts to each fault, which nodekeeper's own tests build on."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeRegistry
from tests.harness import (
    NO_RESPONSE,
    BearerAuth,
    Containerd,
    CriClient,
    FaultProxy,
    ProxyRequest,
    Registry,
    Scope,
    TokenServer,
    image_ref,
    oci_error,
    parse_bearer_challenge,
    plain_http_hosts_toml,
    push_new,
    push_new_with_token,
    sha256_digest,
)
from tests.harness.oci import MANIFEST_ACCEPT

pytestmark = pytest.mark.integration

MakeProxy = Callable[..., FaultProxy]
MakeTokenServer = Callable[..., TokenServer]


@pytest.fixture
def make_proxy(request: pytest.FixtureRequest) -> Iterator[MakeProxy]:
    """Start fault proxies. When the test runs a containerd, a hosts.toml tells it each proxy
    speaks plain HTTP: 1.7 and later try HTTPS first on a loopback host, and give up when
    the server drops the TLS hello, as this proxy does (see the test of that below)."""
    started: list[FaultProxy] = []
    containerd: Containerd | None = None
    if "containerd" in request.fixturenames:
        containerd = request.getfixturevalue("containerd")

    def make(target_url: str, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(target_url, **kwargs)
        started.append(proxy)
        if containerd is not None:
            containerd.write_hosts_toml(proxy.host, plain_http_hosts_toml(proxy.host))
        return proxy

    try:
        yield make
    finally:
        for proxy in started:
            proxy.close()
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("fault-proxy-")]
    assert leaked == []


@pytest.fixture
def proxy(registry: Registry, make_proxy: MakeProxy) -> FaultProxy:
    return make_proxy(registry.url)


@pytest.fixture
def make_token_server(tmp_path: Path) -> Iterator[MakeTokenServer]:
    started: list[TokenServer] = []

    def make(users: dict[str, str], **kwargs: object) -> TokenServer:
        server = TokenServer(users, base_dir=tmp_path / f"token{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.close()
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("token-server-")]
    assert leaked == []


def pull_error(client: CriClient, ref: str, timeout: float = 10.0, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client.pull(ref, timeout=timeout, **kw)  # type: ignore[arg-type]
    return info.value


def details(err: grpc.RpcError) -> str:
    return err.details() or ""


def code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()


# -- the proxy in passthrough mode ------------------------------------------------------------


def test_containerd_pulls_through_the_proxy(
    registry: Registry, proxy: FaultProxy, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "team/app", "v1", seed="through")
    ref = image_ref(proxy.host, "team/app", "v1")

    assert cri_client.pull(ref, timeout=10) == image.config_digest

    # Plain HTTP (as hosts.toml says): containerd resolves with HEAD and fetches the
    # manifest and blobs by digest.
    seen = proxy.requests()
    assert seen[0] == ProxyRequest("HEAD", "/v2/team/app/manifests/v1", 200)
    assert ProxyRequest("GET", f"/v2/team/app/manifests/{image.digest}", 200) in seen
    for digest in image.blobs:
        assert ProxyRequest("GET", f"/v2/team/app/blobs/{digest}", 200) in seen
    assert all(r.status == 200 for r in seen)
    # Every one of them reached the registry.
    assert len(registry.wait_for_requests(len(seen))) == len(seen)
    assert cri_client.status(ref).image.id == image.config_digest


def test_loopback_registry_without_hosts_toml(
    registry: Registry, containerd: Containerd, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "team/app", "v1", seed="no-hosts-toml")
    with FaultProxy(registry.url) as proxy:
        ref = image_ref(proxy.host, "team/app", "v1")
        if containerd.release.name == "1.6":
            # 1.6 speaks plain HTTP to a 127.0.0.1 registry at once.
            assert cri_client.pull(ref, timeout=10) == image.config_digest
            assert proxy.requests()[0] == ProxyRequest("HEAD", "/v2/team/app/manifests/v1", 200)
        else:
            # 1.7 and later start with HTTPS; a server that drops the TLS hello is not tried
            # over HTTP, and nothing reaches it as HTTP.
            err = pull_error(cri_client, ref)
            assert f'Head "https://{proxy.host}/v2/team/app/manifests/v1": EOF' in details(err)
            assert proxy.requests() == []
    # distribution answers a TLS hello with an HTTP error, which every version takes as a
    # cue to retry over HTTP.
    direct = image_ref(registry.host, "team/app", "v1")
    assert cri_client.pull(direct, timeout=10) == image.config_digest


def test_push_through_the_proxy_rewrites_upload_locations(
    registry: Registry, proxy: FaultProxy
) -> None:
    start = httpx.post(f"{proxy.url}/v2/up/blobs/uploads/")
    assert start.status_code == 202
    assert start.headers["Location"].startswith(f"{proxy.url}/v2/up/blobs/uploads/")
    httpx.delete(start.headers["Location"])

    # The whole push (HEAD, POST, PUT to the rewritten Location, manifest PUT) goes through.
    image = push_new(proxy.url, "up", "v1", seed="push")
    puts = proxy.requests("PUT", include_harness=True)
    assert [r.status for r in puts] == [201] * (len(image.blobs) + 1)
    # The harness's own traffic is left out unless asked for.
    assert [(r.method, r.status) for r in proxy.requests()] == [("POST", 202), ("DELETE", 204)]
    resp = httpx.head(f"{registry.url}/v2/up/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert resp.headers["Docker-Content-Digest"] == image.digest


def test_proxy_streams_large_bodies_both_ways(registry: Registry, proxy: FaultProxy) -> None:
    blob = os.urandom(24 * 1024 * 1024 + 7)
    digest = sha256_digest(blob)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        # Chunked upload (a generator body has no Content-Length): PATCH, then PUT to close.
        start = client.post("/v2/big/blobs/uploads/")
        pieces = (blob[i : i + 1_000_003] for i in range(0, len(blob), 1_000_003))
        patch = client.patch(start.headers["Location"], content=pieces)
        assert patch.status_code == 202, patch.text
        done = client.put(
            httpx.URL(patch.headers["Location"]).copy_merge_params({"digest": digest})
        )
        assert done.status_code == 201, done.text

        head = client.head(f"/v2/big/blobs/{digest}")
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == len(blob)

        hasher, size = hashlib.sha256(), 0
        with client.stream("GET", f"/v2/big/blobs/{digest}") as resp:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes():
                hasher.update(chunk)
                size += len(chunk)
    assert size == len(blob)
    assert f"sha256:{hasher.hexdigest()}" == digest


def test_concurrent_requests_while_one_hangs(registry: Registry, proxy: FaultProxy) -> None:
    push_new(registry.url, "busy", "v1", seed="busy")
    proxy.hang(path_contains="/v2/stuck/")
    hung_error: list[BaseException] = []

    def stuck() -> None:
        try:
            httpx.get(f"{proxy.url}/v2/stuck/manifests/v1", timeout=10)
        except httpx.HTTPError as e:
            hung_error.append(e)

    hung = threading.Thread(target=stuck)
    hung.start()
    try:
        assert proxy.wait_for_requests(1, status=NO_RESPONSE)
        results: list[int] = []

        def fetch() -> None:
            with httpx.Client(base_url=proxy.url, timeout=5) as client:
                for _ in range(5):  # keep-alive: several requests per connection
                    resp = client.get("/v2/busy/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
                    results.append(resp.status_code)

        workers = [threading.Thread(target=fetch) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=10)
        assert results == [200] * 40
        assert hung.is_alive()
    finally:
        proxy.passthrough()  # releases the hung request by dropping its connection
        hung.join(timeout=5)
    assert not hung.is_alive()
    assert len(hung_error) == 1
    assert isinstance(hung_error[0], httpx.RemoteProtocolError)


# -- faults seen by containerd ----------------------------------------------------------------


def test_500_fails_the_pull_with_at_most_one_retry(
    registry: Registry, proxy: FaultProxy, containerd: Containerd, cri_client: CriClient
) -> None:
    push_new(registry.url, "app", "v1", seed="500")
    ref = image_ref(proxy.host, "app", "v1")
    proxy.respond(500, body=oci_error("UNKNOWN", "boom"))

    err = pull_error(cri_client, ref)
    assert code(err) == grpc.StatusCode.UNKNOWN
    assert "500 Internal Server Error" in details(err)
    # 2.3 asks once more after a server error; 1.6 and 1.7 give up at once.
    heads = 2 if containerd.release.name == "2.3" else 1
    assert proxy.requests() == [ProxyRequest("HEAD", "/v2/app/manifests/v1", 500)] * heads
    assert registry.requests() == []

    proxy.passthrough()
    assert cri_client.pull(ref, timeout=10)


def test_429_is_retried_by_containerd_at_once(
    registry: Registry, proxy: FaultProxy, containerd: Containerd, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "app", "v1", seed="429")
    ref = image_ref(proxy.host, "app", "v1")
    proxy.respond(
        429,
        {"Retry-After": "30", "RateLimit-Remaining": "0;w=21600"},
        oci_error("TOOMANYREQUESTS", "slow down"),
    )

    started = time.monotonic()
    err = pull_error(cri_client, ref)
    # Retry-After is ignored: HEADs back to back (six; five on 2.3), then the error, well
    # before the 30 s that honouring it once would take.
    assert time.monotonic() - started < 25
    assert "429 Too Many Requests" in details(err)
    heads = 5 if containerd.release.name == "2.3" else 6
    assert proxy.requests() == [ProxyRequest("HEAD", "/v2/app/manifests/v1", 429)] * heads

    # With fewer 429s than containerd's retries the pull gets through.
    proxy.clear()
    proxy.respond(429, {"Retry-After": "1"}, times=2)
    assert cri_client.pull(ref, timeout=10) == image.config_digest
    statuses = [r.status for r in proxy.requests("HEAD", "/manifests/")]
    assert statuses == [429, 429, 200]


def test_404_with_an_oci_error_body(
    registry: Registry, proxy: FaultProxy, cri_client: CriClient
) -> None:
    push_new(registry.url, "app", "v1", seed="404")
    proxy.respond(
        404, body=oci_error("MANIFEST_UNKNOWN", "manifest unknown"), path_contains="/manifests/"
    )

    resp = httpx.get(f"{proxy.url}/v2/app/manifests/v1")
    assert resp.status_code == 404
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert httpx.get(f"{proxy.url}/v2/").status_code == 200  # not matched: forwarded

    err = pull_error(cri_client, image_ref(proxy.host, "app", "v1"))
    assert code(err) == grpc.StatusCode.NOT_FOUND


def test_hang_until_the_client_gives_up_then_released(
    registry: Registry, proxy: FaultProxy, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "app", "v1", seed="hang")
    ref = image_ref(proxy.host, "app", "v1")
    proxy.hang()

    started = time.monotonic()
    err = pull_error(cri_client, ref, timeout=1.5)
    assert code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1.4 < time.monotonic() - started < 20  # the client's deadline ended it
    assert proxy.requests() == [ProxyRequest("HEAD", "/v2/app/manifests/v1", NO_RESPONSE)]
    assert registry.requests() == []

    proxy.passthrough()
    assert cri_client.pull(ref, timeout=10) == image.config_digest


def test_delay_answers_late(registry: Registry, proxy: FaultProxy) -> None:
    push_new(registry.url, "app", "v1", seed="delay")
    proxy.delay(1.0, path_contains="/manifests/", times=1)
    url = f"{proxy.url}/v2/app/manifests/v1"
    started = time.monotonic()
    assert httpx.head(url, headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
    delayed = time.monotonic() - started
    assert delayed >= 1.0
    started = time.monotonic()
    assert httpx.head(url, headers={"Accept": MANIFEST_ACCEPT}).status_code == 200
    assert time.monotonic() - started < delayed  # once only: the second is not delayed


def test_refuse_then_start_on_the_same_port(
    registry: Registry, proxy: FaultProxy, cri_client: CriClient
) -> None:
    image = push_new(registry.url, "app", "v1", seed="refuse")
    ref = image_ref(proxy.host, "app", "v1")
    port = proxy.port
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert client.get("/v2/").status_code == 200  # a kept-alive connection
        proxy.refuse()
        with pytest.raises(httpx.TransportError):
            client.get("/v2/")  # the open connection was cut, and reconnecting fails
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/v2/")
    err = pull_error(cri_client, ref)
    assert "connection refused" in details(err)

    proxy.start()
    assert proxy.port == port
    assert cri_client.pull(ref, timeout=10) == image.config_digest


def test_header_tampering(registry: Registry, proxy: FaultProxy, cri_client: CriClient) -> None:
    image = push_new(registry.url, "app", "v1", seed="headers")
    ref = image_ref(proxy.host, "app", "v1")
    proxy.drop_headers(["docker-content-digest"], path_contains="/manifests/")
    proxy.set_headers({"RateLimit-Remaining": "0;w=21600", "RateLimit-Limit": "100;w=21600"})

    head = httpx.head(f"{proxy.url}/v2/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert head.status_code == 200
    assert "Docker-Content-Digest" not in head.headers
    assert head.headers["RateLimit-Remaining"] == "0;w=21600"
    blob = httpx.head(f"{proxy.url}/v2/app/blobs/{image.layer_digests[0]}")
    assert blob.headers["Docker-Content-Digest"] == image.layer_digests[0]

    # Without the digest on HEAD, containerd GETs the manifest by tag to learn it.
    proxy.clear()
    assert cri_client.pull(ref, timeout=10) == image.config_digest
    manifests = proxy.requests(path_contains="/manifests/")
    assert manifests[:2] == [
        ProxyRequest("HEAD", "/v2/app/manifests/v1", 200),
        ProxyRequest("GET", "/v2/app/manifests/v1", 200),
    ]

    proxy.passthrough()
    head = httpx.head(f"{proxy.url}/v2/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert "RateLimit-Remaining" not in head.headers


def test_request_log_filters_and_clear(registry: Registry, proxy: FaultProxy) -> None:
    proxy.respond(503, method="HEAD")
    assert httpx.head(f"{proxy.url}/v2/a/manifests/x").status_code == 503
    assert httpx.get(f"{proxy.url}/v2/a/manifests/x").status_code == 404
    harness = {"User-Agent": "nodekeeper-harness-test"}
    httpx.get(f"{proxy.url}/v2/", headers=harness)

    assert proxy.requests() == [
        ProxyRequest("HEAD", "/v2/a/manifests/x", 503),
        ProxyRequest("GET", "/v2/a/manifests/x", 404),
    ]
    assert proxy.requests("get") == [ProxyRequest("GET", "/v2/a/manifests/x", 404)]
    assert proxy.requests(status=503) == [ProxyRequest("HEAD", "/v2/a/manifests/x", 503)]
    assert proxy.requests(path_contains="/v2/b/") == []
    assert proxy.requests(include_harness=True)[-1] == ProxyRequest("GET", "/v2/", 200)
    proxy.clear()
    assert proxy.requests(include_harness=True) == []


def test_frozen_target_answers_504_after_upstream_timeout(
    registry: Registry, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy(registry.url, upstream_timeout=0.5)
    registry.freeze()
    try:
        started = time.monotonic()
        # A 504 from the proxy, not the client's own timeout (30 s).
        assert httpx.get(f"{proxy.url}/v2/", timeout=30).status_code == 504
        assert time.monotonic() - started > 0.4  # after the upstream timeout, not at once
    finally:
        registry.thaw()
    assert httpx.get(f"{proxy.url}/v2/", timeout=5).status_code == 200


def test_tls_target_behind_a_plain_http_proxy(
    make_registry: MakeRegistry, make_proxy: MakeProxy, cri_client: CriClient
) -> None:
    reg = make_registry(tls=True)
    image = push_new(reg.url, "app", "v1", seed="tls", verify=reg.verify())
    proxy = make_proxy(reg.url, verify=reg.verify())
    assert cri_client.pull(image_ref(proxy.host, "app", "v1"), timeout=10) == image.config_digest
    assert proxy.requests("HEAD")[0] == ProxyRequest("HEAD", "/v2/app/manifests/v1", 200)


def test_target_down_answers_502(registry: Registry, proxy: FaultProxy) -> None:
    registry.stop()
    resp = httpx.get(f"{proxy.url}/v2/")
    assert resp.status_code == 502
    assert proxy.requests() == [ProxyRequest("GET", "/v2/", 502)]
    registry.start()
    assert httpx.get(f"{proxy.url}/v2/").status_code == 200


# -- token auth -------------------------------------------------------------------------------


def test_token_challenge_then_bearer(
    make_registry: MakeRegistry, make_token_server: MakeTokenServer
) -> None:
    tokens = make_token_server({"alice": "s3cret"})
    reg = make_registry(token_auth=tokens)
    image = push_new_with_token(
        reg.url, "private/app", "v1", BearerAuth("alice", "s3cret"), seed="t"
    )
    tokens.clear()
    url = f"{reg.url}/v2/private/app/manifests/v1"

    anon = httpx.get(url, headers={"Accept": MANIFEST_ACCEPT})
    assert anon.status_code == 401
    assert anon.headers["WWW-Authenticate"] == (
        f'Bearer realm="{tokens.url}/token",service="{tokens.service}",'
        'scope="repository:private/app:pull"'
    )
    challenge = parse_bearer_challenge(anon.headers["WWW-Authenticate"])
    assert challenge is not None

    params = {"service": challenge["service"], "scope": challenge["scope"]}
    answer = httpx.get(challenge["realm"], params=params, auth=("alice", "s3cret"))
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == tokens.expires_in
    assert body["issued_at"].endswith("Z")

    ok = httpx.get(
        url, headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {body['token']}"}
    )
    assert ok.status_code == 200
    assert ok.headers["Docker-Content-Digest"] == image.digest

    bad = httpx.get(challenge["realm"], params=params, auth=("alice", "wrong"))
    assert bad.status_code == 401
    assert [(r.user, r.scopes, r.granted, r.status) for r in tokens.requests()] == [
        ("alice", ("repository:private/app:pull",), ("repository:private/app:pull",), 200),
        ("alice", ("repository:private/app:pull",), (), 401),
    ]


def test_registry_checks_signature_issuer_audience_and_expiry(
    make_registry: MakeRegistry, make_token_server: MakeTokenServer
) -> None:
    tokens = make_token_server({"alice": "pw"})
    stranger = make_token_server({"alice": "pw"})  # same names, another key
    reg = make_registry(token_auth=tokens)
    push_new_with_token(reg.url, "private/app", "v1", BearerAuth("alice", "pw"), seed="v")
    access = [Scope("repository", "private/app", ("pull",))]

    def status(token: str) -> int:
        headers = {"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {token}"}
        return httpx.head(f"{reg.url}/v2/private/app/manifests/v1", headers=headers).status_code

    assert status(tokens.make_token("alice", access)) == 200  # x5c
    assert status(tokens.make_token("alice", access, signing_header="kid")) == 200
    assert status(stranger.make_token("alice", access)) == 401
    assert status(stranger.make_token("alice", access, signing_header="kid")) == 401
    assert status(tokens.make_token("alice", access, audience="elsewhere")) == 401
    assert status(tokens.make_token("alice", access, issuer="someone")) == 401
    # distribution allows 60 s of clock skew past "exp".
    assert status(tokens.make_token("alice", access, expires_in=-30)) == 200
    assert status(tokens.make_token("alice", access, expires_in=-90)) == 401
    assert status(tokens.make_token("alice", [])) == 401
    other_repo = [Scope("repository", "private/other", ("pull",))]
    assert status(tokens.make_token("alice", other_repo)) == 401


@pytest.mark.parametrize("oauth_post", [True, False])
def test_containerd_pull_with_token_auth(
    make_registry: MakeRegistry,
    make_token_server: MakeTokenServer,
    cri_client: CriClient,
    oauth_post: bool,
) -> None:
    tokens = make_token_server(
        {"alice": "s3cret"}, anonymous_pull={"public/app"}, oauth_post=oauth_post
    )
    reg = make_registry(token_auth=tokens)
    pusher = BearerAuth("alice", "s3cret")
    private = push_new_with_token(reg.url, "private/app", "v1", pusher, seed="priv")
    public = push_new_with_token(reg.url, "public/app", "v1", pusher, seed="pub")
    private_ref = image_ref(reg.host, "private/app", "v1")
    tokens.clear()

    err = pull_error(cri_client, private_ref)
    # The anonymous token carries no access; the registry's second 401 says why.
    assert "pull access denied" in details(err)
    assert "insufficient_scope" in details(err)
    anonymous = tokens.requests(anonymous=True)
    assert anonymous
    assert all(r.method == "GET" and r.granted == () for r in anonymous)

    tokens.clear()
    assert (
        cri_client.pull(image_ref(reg.host, "public/app", "v1"), timeout=10) == public.config_digest
    )
    assert {(r.method, r.user, r.granted) for r in tokens.requests()} == {
        ("GET", None, ("repository:public/app:pull",))
    }

    tokens.clear()
    wrong = cri.AuthConfig(username="alice", password="nope")
    # 1.6 says "unexpected status: 401"; 1.7 and later name the token URL that said 401.
    assert re.search(r"failed to fetch oauth token: unexpected status: 401"
                     r"|/token\?.*: 401 Unauthorized$",
                     details(pull_error(cri_client, private_ref, auth=wrong)))
    # containerd tries the OAuth2 password grant (POST) first and falls back to GET with
    # Basic credentials when the token endpoint answers 401 (or 404, 400, 405).
    first = ("POST", "alice", 401) if oauth_post else ("POST", None, 404)
    assert [(r.method, r.user, r.status) for r in tokens.requests()] == [
        first,
        ("GET", "alice", 401),
    ]
    tokens.clear()
    good = cri.AuthConfig(username="alice", password="s3cret")
    assert cri_client.pull(private_ref, auth=good, timeout=10) == private.config_digest
    granted = tokens.requests(user="alice", status=200)
    assert granted
    assert {r.method for r in granted} == ({"POST"} if oauth_post else {"GET"})
    assert all(r.granted == ("repository:private/app:pull",) for r in granted)


def test_token_server_behind_a_fault_proxy(
    make_registry: MakeRegistry,
    make_token_server: MakeTokenServer,
    make_proxy: MakeProxy,
    cri_client: CriClient,
) -> None:
    tokens = make_token_server({"alice": "pw"}, anonymous_pull={"public/app"})
    token_proxy = make_proxy(tokens.url)
    tokens.realm = f"{token_proxy.url}/token"  # before the registry starts
    reg = make_registry(token_auth=tokens)
    image = push_new_with_token(reg.url, "public/app", "v1", BearerAuth("alice", "pw"), seed="tp")
    # The registry's challenge (realm included) passes a registry proxy unchanged.
    reg_proxy = make_proxy(reg.url)
    anon = httpx.get(f"{reg_proxy.url}/v2/public/app/manifests/v1")
    assert anon.status_code == 401
    assert f'realm="{token_proxy.url}/token"' in anon.headers["WWW-Authenticate"]

    ref = image_ref(reg_proxy.host, "public/app", "v1")
    token_proxy.respond(503, path_contains="/token")
    assert "503" in details(pull_error(cri_client, ref))
    token_proxy.passthrough()
    assert cri_client.pull(ref, timeout=10) == image.config_digest
    assert token_proxy.requests("GET", "/token")[-1].status == 200


def test_bearer_auth_client_reuses_its_token(
    make_registry: MakeRegistry, make_token_server: MakeTokenServer
) -> None:
    tokens = make_token_server({"alice": "pw"})
    reg = make_registry(token_auth=tokens)
    auth = BearerAuth("alice", "pw")
    push_new_with_token(reg.url, "private/app", "v1", auth, seed="reuse")
    assert auth.token is not None
    tokens.clear()
    with httpx.Client(base_url=reg.url, auth=auth) as client:
        for _ in range(3):
            resp = client.head("/v2/private/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
            assert resp.status_code == 200
    assert tokens.requests() == []  # the push's pull,push token covers pulls
    payload = auth.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "alice"
    assert claims["aud"] == tokens.service
    [access] = claims["access"]
    assert (access["name"], sorted(access["actions"])) == ("private/app", ["pull", "push"])


def test_peak_concurrent_counts_requests_in_flight_and_a_client_giving_up_ends_one(
    registry: Registry, proxy: FaultProxy
) -> None:
    push_new(registry.url, "app", "v1", seed="concurrent")
    proxy.hang(path_contains="/manifests/")
    url = f"{proxy.url}/v2/app/manifests/v1"

    def give_up() -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.head(url, timeout=0.3)

    for _ in range(3):  # one after another: each client hangs up before the next asks
        give_up()
        time.sleep(0.2)  # the proxy notices a hang-up within a few ms
    assert len(proxy.requests(path_contains="/manifests/", status=NO_RESPONSE)) == 3
    assert proxy.peak_concurrent(path_contains="/manifests/") == 1

    together = [threading.Thread(target=give_up) for _ in range(3)]
    for t in together:
        t.start()
    for t in together:
        t.join(timeout=5)
    assert proxy.peak_concurrent(path_contains="/manifests/") == 3
    assert proxy.peak_concurrent(path_contains="/blobs/") == 0
    time.sleep(0.2)
    proxy.clear()  # keeps only requests still in flight: none, their clients are gone
    assert proxy.peak_concurrent() == 0
