"""Probing a registry for a tag's digest, against an in-process fake registry
(httpx.MockTransport): auth flows, token caching, and how every failure is classified.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from structlog.testing import capture_logs

from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.reference import Reference, parse
from nodekeeper.registry import Hosts, Prober, ProbeResult, Session

# The four manifest types containerd accepts (FACTS.md, "Registry protocol").
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
HOST = "registry.test:5000"
IMAGE = f"{HOST}/team/app:1.0"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPES[1]}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
USER, PASSWORD = "alice", "s3cret"
TIMEOUT = 5.0

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class FakeRegistry:
    """A registry with an optional token service, recording every request it gets.

    auth: "" (open), "bearer" (token flow) or "basic". With `require_creds`, the token
    service (or the Basic check) wants USER/PASSWORD; otherwise it also serves anonymously.
    """

    auth: str = ""
    realm: str = "https://auth.example/token"
    service: str = "registry.test"
    require_creds: bool = False
    send_digest: bool = True
    manifest: bytes = MANIFEST
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    token_lifetime: float | None = 300.0
    token_field: str = "token"
    token_status: int = 200
    token_body: bytes | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    @property
    def token_requests(self) -> list[httpx.Request]:
        realm = httpx.URL(self.realm)
        return [r for r in self.requests
                if r.url.host == realm.host and r.url.path == realm.path]

    @property
    def registry_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r not in self.token_requests]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        realm = httpx.URL(self.realm)
        if request.url.host == realm.host and request.url.path == realm.path:
            return self._token(request)
        return self._registry(request)

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self.require_creds and request.headers.get("authorization") != basic(USER, PASSWORD):
            return httpx.Response(401, json={"details": "bad credentials"})
        if self.token_status != 200:
            return httpx.Response(self.token_status)
        if self.token_body is not None:
            return httpx.Response(200, content=self.token_body)
        value = f"token-{len(self.issued) + 1}"
        self.issued.append(value)
        body: dict[str, object] = {self.token_field: value}
        if self.token_lifetime is not None:
            body["expires_in"] = self.token_lifetime
        return httpx.Response(200, json=body)

    def _registry(self, request: httpx.Request) -> httpx.Response:
        given = request.headers.get("authorization", "")
        if self.auth == "bearer" and given.removeprefix("Bearer ") not in self.issued:
            name = request.url.path.split("/v2/", 1)[1].split("/manifests/", 1)[0]
            challenge = (f'Bearer realm="{self.realm}",service="{self.service}",'
                         f'scope="repository:{name}:pull"')
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        if self.auth == "basic" and given != basic(USER, PASSWORD):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        if self.status is not None:
            return httpx.Response(self.status, headers=self.headers)
        headers = {"Content-Type": MANIFEST_TYPES[1], **self.headers}
        if self.send_digest:
            headers["Docker-Content-Digest"] = DIGEST
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(self.manifest))
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=self.manifest)


class MockProber(Prober):
    """A Prober whose session talks to `handler` instead of the network."""

    def __init__(self, hosts_dir: str, handler: Handler,
                 clock: Callable[[], float] = time.monotonic, per_registry: int = 8,
                 outage_wait: float = 0.2) -> None:
        self.session = Session(clock=clock, transport=httpx.MockTransport(handler))
        super().__init__(Hosts([hosts_dir]), self.session, per_registry=per_registry,
                         clock=clock, outage_wait=outage_wait)

    async def close(self) -> None:
        await super().close()
        await self.session.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeProber = Callable[..., MockProber]


async def probe(prober: Prober, image: str = IMAGE, creds: Credentials | None = None,
                timeout: float = TIMEOUT) -> ProbeResult:
    return await prober.probe(parse(image), creds, timeout)


async def failure(prober: Prober, image: str = IMAGE, creds: Credentials | None = None,
                  timeout: float = TIMEOUT) -> Failure:
    with pytest.raises(Failure) as info:
        await probe(prober, image, creds, timeout)
    return info.value


def hosts_toml(tmp_path: Path, domain: str, text: str) -> None:
    directory = tmp_path / "hosts" / domain
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text(text)


# -- finding the digest ----------------------------------------------------------------------

async def test_head_with_docker_content_digest(make_prober: MakeProber) -> None:
    registry = FakeRegistry()
    result = await probe(make_prober(registry))
    assert result == ProbeResult(DIGEST, HOST, authenticated=False, pull_quota_spent=False)
    (request,) = registry.requests
    assert request.method == "HEAD"
    assert str(request.url) == f"https://{HOST}/v2/team/app/manifests/1.0"


async def test_accept_lists_all_four_manifest_types(make_prober: MakeProber) -> None:
    registry = FakeRegistry(send_digest=False)
    await probe(make_prober(registry))
    assert len(registry.requests) == 2
    for request in registry.requests:
        accepted = {part.strip() for part in request.headers["accept"].split(",")}
        assert accepted >= set(MANIFEST_TYPES)


async def test_missing_digest_header_hashes_the_body_of_a_get(make_prober: MakeProber) -> None:
    body = b'{"schemaVersion": 2, "note": "hashed by the prober"}'
    registry = FakeRegistry(send_digest=False, manifest=body)
    result = await probe(make_prober(registry))
    assert result.digest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert [r.method for r in registry.requests] == ["HEAD", "GET"]


async def test_oversized_manifest_is_invalid(make_prober: MakeProber) -> None:
    from nodekeeper.registry.probe import MAX_MANIFEST_BYTES

    registry = FakeRegistry(send_digest=False, manifest=b" " * (MAX_MANIFEST_BYTES + 1))
    assert (await failure(make_prober(registry))).kind is Kind.INVALID


async def test_docker_hub_goes_to_registry_1(make_prober: MakeProber) -> None:
    registry = FakeRegistry()
    result = await probe(make_prober(registry), "postgres:15")
    assert result.host == "registry-1.docker.io"
    assert str(registry.requests[0].url) == \
        "https://registry-1.docker.io/v2/library/postgres/manifests/15"


async def test_digest_reference_is_checked(make_prober: MakeProber) -> None:
    registry = FakeRegistry()
    pinned = f"{HOST}/team/app@{DIGEST}"
    assert (await probe(make_prober(registry), pinned)).digest == DIGEST
    assert registry.requests[0].url.path == f"/v2/team/app/manifests/{DIGEST}"
    other = "sha256:" + hashlib.sha256(b"other").hexdigest()
    assert (await failure(make_prober(registry), f"{HOST}/team/app@{other}")).kind is Kind.INVALID


@pytest.mark.parametrize(
    ("header", "spent"),
    [("0;w=21600", True), ("0", True), (" 0 ; w=21600", True), ("57;w=21600", False),
     ("", False), ("100", False)],
)
async def test_ratelimit_remaining(make_prober: MakeProber, header: str, spent: bool) -> None:
    registry = FakeRegistry(headers={"ratelimit-remaining": header, "ratelimit-limit": "100"})
    result = await probe(make_prober(registry))
    assert result.pull_quota_spent is spent
    assert result.digest == DIGEST


# -- Bearer tokens ---------------------------------------------------------------------------

async def test_bearer_challenge_fetches_a_token_with_service_and_scope(
        make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")
    result = await probe(make_prober(registry), creds=Credentials(USER, PASSWORD))
    assert result.digest == DIGEST
    assert result.authenticated
    (token_request,) = registry.token_requests
    query = parse_qs(token_request.url.query.decode())
    assert query == {"service": [registry.service], "scope": ["repository:team/app:pull"]}
    # HTTPS realm: Basic credentials go to the token service.
    assert token_request.headers["authorization"] == basic(USER, PASSWORD)
    head, retry = registry.registry_requests
    assert "authorization" not in head.headers
    assert retry.headers["authorization"] == f"Bearer {registry.issued[0]}"


async def test_anonymous_token(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")
    result = await probe(make_prober(registry))
    assert not result.authenticated
    (token_request,) = registry.token_requests
    assert "authorization" not in token_request.headers


async def test_credentials_go_to_a_plain_http_realm_on_the_same_host(
        make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer", realm=f"http://{HOST}/token", require_creds=True)
    await probe(make_prober(registry), creds=Credentials(USER, PASSWORD))
    (token_request,) = registry.token_requests
    assert token_request.headers["authorization"] == basic(USER, PASSWORD)


async def test_credentials_never_go_to_another_host_over_plain_http(
        make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer", realm="http://auth.example:8080/token")
    await probe(make_prober(registry), creds=Credentials(USER, PASSWORD))
    (token_request,) = registry.token_requests
    assert "authorization" not in token_request.headers
    assert all(PASSWORD not in str(r.url) for r in registry.requests)


async def test_identity_token_is_exchanged_by_post(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")
    await probe(make_prober(registry), creds=Credentials(identity_token="refresh-me"))
    (token_request,) = registry.token_requests
    assert token_request.method == "POST"
    form = parse_qs(token_request.content.decode())
    assert form["grant_type"] == ["refresh_token"]
    assert form["refresh_token"] == ["refresh-me"]
    assert form["scope"] == ["repository:team/app:pull"]
    assert form["service"] == [registry.service]


async def test_token_is_cached_until_it_expires(make_prober: MakeProber) -> None:
    clock = Clock()
    registry = FakeRegistry(auth="bearer", token_lifetime=300)
    prober = make_prober(registry, clock=clock)
    await probe(prober)
    assert len(registry.token_requests) == 1
    clock.now += 250
    await probe(prober)
    assert len(registry.token_requests) == 1
    # The cached token is sent up front: no 401 round trip.
    assert registry.requests[-1].headers["authorization"] == f"Bearer {registry.issued[0]}"
    assert len(registry.registry_requests) == 3
    clock.now += 51  # past expires_in
    await probe(prober)
    assert len(registry.token_requests) == 2


async def test_token_lifetime_defaults_to_60_seconds(make_prober: MakeProber) -> None:
    clock = Clock()
    registry = FakeRegistry(auth="bearer", token_lifetime=None)
    prober = make_prober(registry, clock=clock)
    await probe(prober)
    clock.now += 30
    await probe(prober)
    assert len(registry.token_requests) == 1
    clock.now += 31  # 61 s after the token was issued
    await probe(prober)
    assert len(registry.token_requests) == 2


async def test_access_token_field_is_accepted(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer", token_field="access_token")
    assert (await probe(make_prober(registry))).digest == DIGEST


async def test_tokens_are_cached_per_credential(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")
    prober = make_prober(registry)
    await probe(prober, creds=Credentials(USER, PASSWORD))
    await probe(prober, creds=Credentials("bob", "other"))
    await probe(prober)
    assert len(registry.token_requests) == 3
    await probe(prober, creds=Credentials(USER, PASSWORD))
    assert len(registry.token_requests) == 3


async def test_registry_token_is_used_directly(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")
    registry.issued.append("given-by-kubelet")
    creds = Credentials(registry_token="given-by-kubelet")
    result = await probe(make_prober(registry), creds=creds)
    assert result.digest == DIGEST
    assert registry.token_requests == []
    assert registry.requests[-1].headers["authorization"] == "Bearer given-by-kubelet"


# -- Basic auth ------------------------------------------------------------------------------

async def test_basic_challenge_is_answered_with_basic_auth(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="basic")
    result = await probe(make_prober(registry), creds=Credentials(USER, PASSWORD))
    assert result.authenticated
    assert result.digest == DIGEST
    first, retry = registry.requests
    assert "authorization" not in first.headers
    assert retry.headers["authorization"] == basic(USER, PASSWORD)


async def test_basic_challenge_without_credentials_is_unauthorized(
        make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="basic")
    assert (await failure(make_prober(registry))).kind is Kind.UNAUTHORIZED
    assert len(registry.requests) == 1


async def test_wrong_password_is_unauthorized(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="basic")
    found = await failure(make_prober(registry), creds=Credentials(USER, "wrong"))
    assert found.kind is Kind.UNAUTHORIZED


@pytest.mark.parametrize("server_address", ["https://other.example", "127.0.0.1:5000",
                                            "http://127.0.0.1:5001"])
async def test_credentials_for_another_registry_are_not_sent(
        make_prober: MakeProber, server_address: str) -> None:
    creds = Credentials(USER, PASSWORD, server_address=server_address)
    registry = FakeRegistry(auth="basic")
    assert (await failure(make_prober(registry), creds=creds)).kind is Kind.UNAUTHORIZED
    assert all("authorization" not in r.headers for r in registry.requests)
    open_registry = FakeRegistry(auth="bearer")
    result = await probe(make_prober(open_registry), creds=creds)
    assert not result.authenticated
    assert all("authorization" not in r.headers for r in open_registry.token_requests)


async def test_credentials_for_this_registry_are_sent(make_prober: MakeProber) -> None:
    creds = Credentials(USER, PASSWORD, server_address=f"http://{HOST}")
    registry = FakeRegistry(auth="basic")
    assert (await probe(make_prober(registry), creds=creds)).authenticated


async def test_unusable_challenge_is_invalid(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Negotiate realm="x"'})

    assert (await failure(make_prober(handler))).kind is Kind.INVALID


# -- failures --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, "rate_limited"), (404, "not_found"), (500, "server_error"), (502, "server_error"),
     (503, "server_error"), (403, "unauthorized"), (400, "invalid")],
)
async def test_status_classification(make_prober: MakeProber, status: int, kind: str) -> None:
    found = await failure(make_prober(FakeRegistry(status=status)))
    assert found.kind == kind
    assert str(found).startswith(f"{kind}: ")


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("connection refused"), httpx.ReadError("connection reset"),
     httpx.RemoteProtocolError("server disconnected")],
)
async def test_transport_errors_are_unreachable(make_prober: MakeProber,
                                                error: httpx.TransportError) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise error

    assert (await failure(make_prober(handler))).kind is Kind.UNREACHABLE


async def test_token_service_refusing_is_unauthorized(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer", require_creds=True)
    found = await failure(make_prober(registry), creds=Credentials(USER, "wrong"))
    assert found.kind is Kind.UNAUTHORIZED
    assert "token service" in found.detail


@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (429, "rate_limited"),
                                              (404, "not_found"), (403, "unauthorized")])
async def test_token_service_failures(make_prober: MakeProber, status: int, kind: str) -> None:
    registry = FakeRegistry(auth="bearer", token_status=status)
    assert (await failure(make_prober(registry))).kind == kind


async def test_token_service_unreachable(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            raise httpx.ConnectError("no route to host")
        return await registry(request)

    assert (await failure(make_prober(handler))).kind is Kind.UNREACHABLE


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'"token"', b"{}", b'{"token": ""}', b'{"token": 5}', b"{"],
)
async def test_malformed_token_reply_is_invalid(make_prober: MakeProber, body: bytes) -> None:
    registry = FakeRegistry(auth="bearer", token_body=body)
    assert (await failure(make_prober(registry))).kind is Kind.INVALID


async def test_still_unauthorized_with_a_token(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "useless"})
        challenge = 'Bearer realm="https://auth.example/token",service="s"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    assert (await failure(make_prober(handler))).kind is Kind.UNAUTHORIZED


async def test_hanging_registry_times_out_within_the_timeout(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)

    timeout = 0.05
    started = time.monotonic()
    found = await failure(make_prober(handler), timeout=timeout)
    elapsed = time.monotonic() - started
    assert found.kind is Kind.TIMEOUT
    # Not before the timeout; and not for as long as the registry hangs (30 s).
    assert timeout <= elapsed < 10


async def test_hanging_token_service_times_out(make_prober: MakeProber) -> None:
    registry = FakeRegistry(auth="bearer")

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            await asyncio.sleep(30)
        return await registry(request)

    started = time.monotonic()
    assert (await failure(make_prober(handler), timeout=0.05)).kind is Kind.TIMEOUT
    assert time.monotonic() - started < 10  # not for as long as the service hangs (30 s)


async def test_probes_per_registry_are_limited(make_prober: MakeProber) -> None:
    in_flight, most = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, headers={"Docker-Content-Digest": DIGEST})

    prober = make_prober(handler, per_registry=2)
    results = await asyncio.gather(*(probe(prober) for _ in range(6)))
    assert {r.digest for r in results} == {DIGEST}
    assert most == 2


# -- mirrors ---------------------------------------------------------------------------------

async def test_mirror_is_asked_first_with_ns(make_prober: MakeProber, tmp_path: Path) -> None:
    hosts_toml(tmp_path, HOST, '[host."http://mirror.example:5001"]\n')
    registry = FakeRegistry()
    result = await probe(make_prober(registry))
    assert result.host == "mirror.example:5001"
    (request,) = registry.requests
    assert request.url.host == "mirror.example"
    assert request.url.params["ns"] == HOST


@pytest.mark.parametrize("broken", ["unreachable", "not_found", "server_error"])
async def test_unusable_mirror_hands_over_to_the_server(make_prober: MakeProber, tmp_path: Path,
                                                        broken: str) -> None:
    hosts_toml(tmp_path, HOST, '[host."http://mirror.example:5001"]\n')
    registry = FakeRegistry()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.example":
            if broken == "unreachable":
                raise httpx.ConnectError("connection refused")
            return httpx.Response(404 if broken == "not_found" else 503)
        return await registry(request)

    result = await probe(make_prober(handler))
    assert result.host == HOST
    assert "ns" not in registry.requests[-1].url.params


async def test_every_host_failing_reports_the_first_failure(make_prober: MakeProber,
                                                            tmp_path: Path) -> None:
    hosts_toml(tmp_path, HOST, '[host."http://mirror.example:5001"]\n')

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.example":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(404)

    assert (await failure(make_prober(handler))).kind is Kind.UNREACHABLE


async def test_hosts_toml_headers_are_sent(make_prober: MakeProber, tmp_path: Path) -> None:
    hosts_toml(tmp_path, HOST, '[header]\n  x-tenant = "blue"\n')
    registry = FakeRegistry()
    await probe(make_prober(registry))
    assert registry.requests[0].headers["x-tenant"] == "blue"


async def test_no_resolving_endpoint_is_a_probe_failure(make_prober: MakeProber,
                                                        tmp_path: Path) -> None:
    hosts_toml(tmp_path, HOST, 'capabilities = ["pull"]\n')
    with pytest.raises(Failure):
        await probe(make_prober(FakeRegistry()))


def test_reference_parse_matches_the_probed_path() -> None:
    assert parse(IMAGE) == Reference(HOST, "team/app", "1.0")


# -- loopback registries: HTTPS first, then plain HTTP, as containerd -------------------------

LOOPBACK_IMAGE = "127.0.0.1:5000/team/app:1.0"


@pytest.mark.parametrize(("status", "kind"), [(404, Kind.NOT_FOUND), (401, Kind.UNAUTHORIZED),
                                              (503, Kind.SERVER_ERROR)])
async def test_plain_http_answers_for_a_loopback_registry_without_tls(
        make_prober: MakeProber, status: int, kind: Kind) -> None:
    schemes: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        schemes.append(request.url.scheme)
        if request.url.scheme == "https":
            raise httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number")
        return httpx.Response(status, headers={"WWW-Authenticate": 'Basic realm="r"'})

    assert (await failure(make_prober(handler), LOOPBACK_IMAGE)).kind is kind
    assert schemes[:2] == ["https", "http"]


async def test_a_loopback_registry_with_tls_is_not_asked_over_http(
        make_prober: MakeProber) -> None:
    registry = FakeRegistry()
    found = await probe(make_prober(registry), LOOPBACK_IMAGE)
    assert found.digest == DIGEST
    assert [r.url.scheme for r in registry.requests] == ["https"]


# -- outage episodes: one probe in flight, later pulls wait at most outage_wait --------------
# Bounds are shown by counting requests: a pull that waited longer than the probe in flight
# lasts would have sent another one.

OTHER_IMAGE = "other.test:5000/team/app:1.0"
MIRROR = "mirror.example:5001"


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def hang() -> None:
    await asyncio.Event().wait()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class BlackHole:
    """`registry` behind a connection that takes requests and, while `silent`, answers none
    of them (the kernel accepts, nothing replies); else answers after `delay`."""

    def __init__(self) -> None:
        self.registry = FakeRegistry()
        self.silent = True
        self.delay = 0.0
        self.requests: list[httpx.Request] = []
        self.answered = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.silent:
            await hang()
        await asyncio.sleep(self.delay)
        self.answered.set()
        return await self.registry(request)


def outage_logs(logs: Sequence[Mapping[str, Any]], start: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if str(entry["event"]).startswith(start)]


async def test_a_black_holed_registry_costs_one_timeout_then_one_probe_in_flight(
        make_prober: MakeProber) -> None:
    hole = BlackHole()
    prober = make_prober(hole, outage_wait=0.01)
    with capture_logs() as logs:
        first = await failure(prober, timeout=0.2)
        later = [await failure(prober, timeout=5.0) for _ in range(9)]
    # The first pull started the episode: it waited the whole timeout, as it could not know.
    # Every pull tells the same cause, so that a pod's Events about it add up to one.
    assert {(f.kind, f.detail, f.outage) for f in [first, *later]} == {
        (Kind.TIMEOUT, f"no answer from {HOST} within probe_timeout 0.2s", HOST)}
    # The first pull's request, then the episode's probe (5 s long), which the nine waited
    # for in turn without sending another.
    assert len(hole.requests) == 2
    (outage,) = prober.open_outages()
    assert (outage.endpoint, outage.kind, outage.answered) == (HOST, Kind.TIMEOUT, 9)
    assert abs(outage.since - time.time()) < 60  # wall-clock seconds, for `status`
    (started,) = outage_logs(logs, "registry endpoint in an outage")
    assert (started["log_level"], started["endpoint"], started["kind"]) == (
        "warning", HOST, "timeout")
    assert outage_logs(logs, "registry endpoint answers again") == []


async def test_an_unreachable_registry_is_an_outage_and_every_pull_tries_once(
        make_prober: MakeProber) -> None:
    refused: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        refused.append(request)
        raise httpx.ConnectError("connection refused")

    prober = make_prober(handler)
    first = await failure(prober)
    later = [await failure(prober) for _ in range(3)]
    assert {(f.kind, f.detail, f.outage) for f in [first, *later]} == {
        (Kind.UNREACHABLE, f"{HOST}: ConnectError: connection refused", HOST)}
    # A refusal ends the probe at once: the next pull's probe is its own, and costs nothing.
    assert len(refused) == 4
    assert prober.open_outages()[0].answered == 3


async def test_a_pull_in_an_outage_uses_the_answer_of_the_probe_it_sent(
        make_prober: MakeProber) -> None:
    hole = BlackHole()
    prober = make_prober(hole, outage_wait=5.0)
    await failure(prober, timeout=0.2)
    hole.silent = False
    with capture_logs() as logs:
        found = await probe(prober)
    assert found.digest == DIGEST
    assert len(hole.requests) == 2
    assert prober.open_outages() == []
    (ended,) = outage_logs(logs, "registry endpoint answers again")
    assert (ended["log_level"], ended["endpoint"], ended["pulls_answered"]) == ("info", HOST, 0)
    assert isinstance(ended["lasted_s"], float)


async def test_a_pull_that_started_after_the_probe_was_sent_sends_its_own(
        make_prober: MakeProber) -> None:
    # Under `update: always` a pull that starts after a push must get the build pushed: the
    # episode's probe, asked before the push, answers the old digest to the pull that sent
    # it, and only ends the episode for the others, which then ask themselves.
    old, new = sha("v1"), sha("v2")
    current, silent = old, True
    requests: list[str] = []
    sent, release = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.method)
        if silent:
            await hang()
        digest = current  # as of when it was asked
        if len(requests) == 2:
            sent.set()
            await release.wait()  # the episode's probe: answered late
        return httpx.Response(200, headers={"Docker-Content-Digest": digest})

    prober = make_prober(handler, outage_wait=5.0)
    await failure(prober, timeout=0.2)
    silent = False
    sender = asyncio.create_task(probe(prober))
    await sent.wait()
    current = new  # pushed
    waiter = asyncio.create_task(probe(prober))
    await settle()
    assert len(requests) == 2  # waiting for the probe in flight
    release.set()
    assert (await sender).digest == old
    assert (await waiter).digest == new
    assert len(requests) == 3


async def test_a_slow_registry_ends_the_outage_with_the_probe_s_answer(
        make_prober: MakeProber) -> None:
    hole = BlackHole()
    prober = make_prober(hole, outage_wait=0.01)
    await failure(prober, timeout=0.2)
    hole.silent, hole.delay = False, 0.3  # slow, within the probe's 5 s
    with capture_logs() as logs:
        skipped = await failure(prober, timeout=5.0)  # waited 0.01 s of the 0.3 s
        await hole.answered.wait()
        await settle()
    assert skipped.outage == HOST
    assert prober.open_outages() == []
    (ended,) = outage_logs(logs, "registry endpoint answers again")
    assert ended["pulls_answered"] == 1
    hole.delay = 0.0
    assert (await probe(prober)).digest == DIGEST
    assert len(hole.requests) == 3  # the pull after the end asked for itself


async def test_a_registry_that_is_only_slow_is_never_in_an_outage(
        make_prober: MakeProber) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(200, headers={"Docker-Content-Digest": DIGEST})

    prober = make_prober(slow, outage_wait=0.01)
    assert [(await probe(prober, timeout=1.0)).digest for _ in range(3)] == [DIGEST] * 3
    assert prober.open_outages() == []


async def test_a_black_holed_mirror_costs_outage_wait_and_the_server_answers(
        make_prober: MakeProber, tmp_path: Path) -> None:
    hosts_toml(tmp_path, HOST, f'[host."http://{MIRROR}"]\n')
    registry = FakeRegistry()
    mirror: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.netloc.decode() == MIRROR:
            mirror.append(request)
            await hang()
        return await registry(request)

    prober = make_prober(handler, outage_wait=0.01)
    assert (await failure(prober, timeout=0.2)).kind is Kind.TIMEOUT  # the mirror took it all
    found = [await probe(prober, timeout=5.0) for _ in range(5)]
    assert {(f.host, f.digest) for f in found} == {(HOST, DIGEST)}
    assert len(mirror) == 2
    assert len(registry.requests) == 5
    assert [(o.endpoint, o.answered) for o in prober.open_outages()] == [(MIRROR, 5)]


async def test_one_registry_s_outage_never_slows_another(make_prober: MakeProber) -> None:
    registry = FakeRegistry()
    other: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "other.test":
            other.append(request)
            return await registry(request)
        await hang()
        raise AssertionError("unreachable")

    prober = make_prober(handler, outage_wait=5.0)
    await failure(prober, timeout=0.2)
    assert (await probe(prober, OTHER_IMAGE, timeout=5.0)).digest == DIGEST
    assert len(other) == 1
    assert [o.endpoint for o in prober.open_outages()] == [HOST]

