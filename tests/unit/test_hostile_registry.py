"""Registries and token services that misbehave, ordinarily and on purpose: every answer
ends in a result or a Failure of one kind, reading is bounded in bytes and time, and no
secret shows in any message or log line."""

from __future__ import annotations

import asyncio
import base64
import builtins
import gzip
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog

from nodekeeper.failures import Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.registry import wire
from nodekeeper.registry.session import MAX_TOKEN_SECONDS
from tests.unit.test_probe import (
    DIGEST,
    MANIFEST,
    MANIFEST_TYPES,
    Clock,
    FakeRegistry,
    MakeProber,
    failure,
    probe,
)

REALM = "https://auth.test/token"
# Secrets shaped to slip past naive redaction: quotes, a newline, non-ASCII, base64-ish.
PASSWORD = 'pa"ss\nwörd=='
IDENTITY = "identity-'token'\nwith-newline"
REGISTRY_TOKEN = "registry\r\ntoken-ü"
SECRETS = (PASSWORD, IDENTITY, REGISTRY_TOKEN)


def gzipped_zeros(mib: int) -> bytes:
    """A gzip stream that inflates to `mib` MiB of zeros, without its trailer (a reader
    must give up long before): one compressed MiB repeated, each flushed in full so that
    the next starts afresh. Compressing all of it would take a second or more."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    return first + again * (mib - 1)


class Endless(httpx.AsyncByteStream):
    """A body that never ends (or ends after `total` bytes), `chunk` bytes at a time,
    counting what was actually read from it."""

    def __init__(self, chunk: bytes, total: int | None = None, pause: float = 0.0) -> None:
        self.chunk = chunk
        self.total = total
        self.pause = pause
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.total is None or self.sent < self.total:
            if self.pause:
                await asyncio.sleep(self.pause)
            self.sent += len(self.chunk)
            yield self.chunk

    async def aclose(self) -> None:
        pass


def bearer_registry(token_answer: object, status: int = 200,
                    challenge: str | None = None) -> FakeRegistry:
    """A registry whose token service answers `token_answer` (a body, or a JSON value)."""
    registry = FakeRegistry(auth="bearer", realm=REALM, token_status=status)
    if isinstance(token_answer, bytes):
        registry.token_body = token_answer
    else:
        registry.token_body = json.dumps(token_answer).encode()
    if challenge is not None:
        async def challenged(request: httpx.Request) -> httpx.Response:
            registry.requests.append(request)
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return challenged  # type: ignore[return-value]
    return registry


# -- token answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("expires_in", ["300", True, [60], {"s": 1}, 1e999, -1e999,
                                        float("nan")])
async def test_an_expires_in_that_is_not_a_number_is_invalid(
        make_prober: MakeProber, expires_in: object) -> None:
    body = json.dumps({"token": "t0k3n", "expires_in": expires_in}).encode()
    found = await failure(make_prober(bearer_registry(body)))
    assert found.kind is Kind.INVALID
    assert "expires_in" in found.detail


@pytest.mark.parametrize(("expires_in", "kept"), [
    (None, 60.0), (-5, 60.0), (0, 60.0), (300, 300.0), (10**30, MAX_TOKEN_SECONDS)])
async def test_a_numeric_expires_in_is_kept_within_sane_bounds(
        make_prober: MakeProber, expires_in: object, kept: float) -> None:
    clock = Clock()
    answer: dict[str, object] = {"token": "t0k3n"}
    if expires_in is not None:
        answer["expires_in"] = expires_in
    registry = FakeRegistry(auth="bearer", realm=REALM)
    registry.token_body = json.dumps(answer).encode()
    registry.issued.append("t0k3n")
    prober = make_prober(registry, clock=clock)
    await probe(prober)
    clock.now += kept - 6  # renewed 5 s early
    await probe(prober)
    assert len(registry.token_requests) == 1
    clock.now += 2
    await probe(prober)
    assert len(registry.token_requests) == 2


@pytest.mark.parametrize("token", ["with\nnewline", "non-ascii-é", "x" * 20_000, "\x00nul"])
async def test_a_token_that_cannot_go_in_a_header_is_refused_not_cached_not_shown(
        make_prober: MakeProber, token: str) -> None:
    registry = bearer_registry({"token": token, "expires_in": 300})
    prober = make_prober(registry)
    with structlog.testing.capture_logs() as logged:
        for _ in range(2):
            found = await failure(prober)
            assert found.kind is Kind.INVALID
            assert token not in str(found)
    assert len(registry.token_requests) == 2  # not cached: asked again
    assert token not in repr(logged)


async def test_a_huge_token_answer_stops_being_read_at_its_cap(make_prober: MakeProber) -> None:
    body = Endless(b" " * 65536)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(200, stream=body)
        return httpx.Response(401, headers={
            "WWW-Authenticate": f'Bearer realm="{REALM}",service="s",scope="x"'})

    found = await failure(make_prober(handler))
    assert found.kind is Kind.INVALID
    assert "larger than" in found.detail
    assert body.sent <= wire.MAX_SMALL_BODY + 2 * 65536


async def test_a_token_answer_that_is_not_json_is_invalid(make_prober: MakeProber) -> None:
    found = await failure(make_prober(bearer_registry(b"<html>token?</html>")))
    assert (found.kind, "not a JSON object" in found.detail) == (Kind.INVALID, True)


@pytest.mark.parametrize("realm", [
    "ftp://auth.test/token", "https://auth.test:99999/token", "https://auth.test:port/x",
    "https://[::1/token", "token-service", "https://xn--a.test/token"])
async def test_an_unusable_realm_is_invalid(make_prober: MakeProber, realm: str) -> None:
    challenge = f'Bearer realm="{realm}",service="s",scope="repository:team/app:pull"'
    found = await failure(make_prober(bearer_registry({"token": "x"}, challenge=challenge)))
    assert found.kind is Kind.INVALID


async def test_an_oversized_challenge_is_invalid(make_prober: MakeProber) -> None:
    challenge = f'Bearer realm="{REALM}",service="s",scope="{"repository:a:pull," * 1000}"'
    found = await failure(make_prober(bearer_registry({"token": "x"}, challenge=challenge)))
    assert found.kind is Kind.INVALID
    assert "challenge" in found.detail


# -- bodies, redirects, and what a transport raises ------------------------------------------

async def test_a_gzip_bomb_manifest_costs_no_more_than_the_cap(make_prober: MakeProber) -> None:
    # 1 GiB of zeros compresses to about 1 MiB; the reader must stop at 4 MiB inflated.
    head = gzipped_zeros(64)
    bomb = Endless(head, total=len(head) * 16)

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": MANIFEST_TYPES[1], "Content-Encoding": "gzip"}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, stream=bomb)

    found = await failure(make_prober(handler))
    assert found.kind is Kind.INVALID
    assert "larger than 4194304 bytes" in found.detail
    assert bomb.sent <= len(head)  # one compressed chunk was enough to tell


async def test_a_50_mb_manifest_is_not_read_past_its_cap(make_prober: MakeProber) -> None:
    body = Endless(b"{" * 65536, total=50 * 1024 * 1024)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200)
        return httpx.Response(200, stream=body)

    found = await failure(make_prober(handler))
    assert found.kind is Kind.INVALID
    assert body.sent <= wire.MAX_MANIFEST_BYTES + 65536


async def test_a_gzipped_manifest_within_the_cap_is_hashed_as_served(
        make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": MANIFEST_TYPES[1], "Content-Encoding": "gzip"}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers,
                              stream=Endless(gzip.compress(MANIFEST), total=1))

    assert (await probe(make_prober(handler))).digest == DIGEST


async def test_a_slow_drip_is_cut_off_by_probe_timeout(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200)
        return httpx.Response(200, stream=Endless(b"{", pause=0.01))

    # Each byte comes well within the timeout: only a deadline for the whole answer ends
    # it. Without one, this would drip for ever (wait_for turns that into a failure).
    found = await asyncio.wait_for(failure(make_prober(handler), timeout=0.1), 30)
    assert found.kind is Kind.TIMEOUT


async def test_a_redirect_loop_is_invalid(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": str(request.url)})

    found = await failure(make_prober(handler))
    assert found.kind is Kind.INVALID
    assert "redirect" in found.detail


async def test_a_redirect_to_an_unusable_host_is_invalid(make_prober: MakeProber) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "https://xn--a.test/v2/x"})

    assert (await failure(make_prober(handler))).kind is Kind.INVALID


@pytest.mark.parametrize("digest", ["sha256:short", "md5:" + "a" * 32, "sha256:" + "A" * 64,
                                    "sha256:" + "a" * 64 + "\u200b"])
async def test_a_digest_header_that_is_not_a_digest_is_invalid(make_prober: MakeProber,
                                                               digest: str) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Docker-Content-Digest": digest})

    assert (await failure(make_prober(handler))).kind is Kind.INVALID


@pytest.mark.parametrize(("raised", "kind"), [
    (RuntimeError("something odd"), Kind.INVALID),
    (KeyError("x"), Kind.INVALID),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), Kind.INVALID),
    (httpx.DecodingError("bad gzip"), Kind.INVALID),
    (httpx.LocalProtocolError("Illegal header value b'Bearer secret'"), Kind.INVALID),
    (httpx.ReadTimeout("slow"), Kind.TIMEOUT),
    (ConnectionResetError(104, "Connection reset by peer"), Kind.UNREACHABLE),
])
async def test_anything_a_transport_raises_is_one_kind(make_prober: MakeProber,
                                                       raised: Exception, kind: Kind) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    found = await failure(make_prober(handler))
    assert found.kind is kind
    assert "secret" not in str(found)


async def test_an_exception_group_is_classified_by_its_first_member(
        make_prober: MakeProber) -> None:
    group = builtins.ExceptionGroup  # Python 3.11 and later; 3.10 has none to raise

    async def handler(request: httpx.Request) -> httpx.Response:
        raise group("task group", [httpx.ConnectError("refused")])

    assert (await failure(make_prober(handler))).kind is Kind.UNREACHABLE


async def test_an_unforeseen_error_is_logged_once_as_a_bug(make_prober: MakeProber) -> None:
    class Surprise(Exception):
        pass

    async def handler(request: httpx.Request) -> httpx.Response:
        raise Surprise("never seen before")

    prober = make_prober(handler)
    with structlog.testing.capture_logs() as logged:
        for _ in range(3):
            assert (await failure(prober)).kind is Kind.INVALID
    bugs = [e for e in logged if e.get("type") == "Surprise"]
    assert len(bugs) == 1
    assert bugs[0]["log_level"] == "error"


# -- secrets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("creds", [
    Credentials("alice", PASSWORD),
    Credentials(identity_token=IDENTITY),
    Credentials(registry_token=REGISTRY_TOKEN),
])
async def test_no_secret_in_any_failure_or_log(make_prober: MakeProber,
                                               creds: Credentials) -> None:
    outcomes = [
        bearer_registry({"token": "x"}, status=401),
        bearer_registry({"token": "bad\ntoken"}),
        bearer_registry(b"not json"),
        FakeRegistry(auth="basic"),
        FakeRegistry(auth="bearer", realm=REALM, require_creds=True),
    ]

    async def raising(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers!r}")

    with structlog.testing.capture_logs() as logged:
        messages = [str(await failure(make_prober(handler), creds=creds))
                    for handler in [*outcomes, raising]]
    shown = repr(messages) + repr(logged)
    for secret in SECRETS:
        for form in (secret, repr(secret), secret.encode("unicode_escape").decode()):
            assert form not in shown
    assert all(isinstance(m, str) and m for m in messages)


def test_scrub_removes_every_form_of_a_secret() -> None:
    text = f"a {PASSWORD} b {PASSWORD!r} c {PASSWORD.encode('unicode_escape').decode()}"
    scrubbed = wire.scrub(text, [PASSWORD])
    assert PASSWORD not in scrubbed
    assert scrubbed.count(wire.REDACTED) == 3


async def test_a_registry_echoing_a_secret_back_does_not_get_it_shown(
        make_prober: MakeProber) -> None:
    # A hostile registry knows what it was sent: the Basic credentials. It puts them in an
    # unusable realm (which messages quote) and in a connection error's text.
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        given = request.headers.get("authorization", "")
        if not given:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        password = base64.b64decode(given.split(" ", 1)[1]).decode().split(":", 1)[1]
        seen.append(password)
        if len(seen) == 1:
            return httpx.Response(401, headers={
                "WWW-Authenticate": f'Bearer realm="ftp://{password}"'})
        raise httpx.ConnectError(f"refused for {password}")

    creds = Credentials("alice", "pa55-\u00e9-word")
    prober = make_prober(handler)
    shown = [str(await failure(prober, creds=creds)) for _ in range(2)]
    assert seen
    assert all("pa55" not in text for text in shown), shown


async def test_peak_memory_of_a_gzip_bomb_stays_near_the_cap(make_prober: MakeProber) -> None:
    head = gzipped_zeros(256)

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Encoding": "gzip"}
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, stream=Endless(head, total=len(head)))

    prober = make_prober(handler)
    tracemalloc.start()
    try:
        assert (await failure(prober)).kind is Kind.INVALID
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * wire.MAX_MANIFEST_BYTES, peak
