"""Authenticated HTTP to registries, shared by the probe and the copier.

One httpx client per (host, trust settings), kept alive between requests. A 401 is
answered once, with a Bearer token (fetched from the challenge's realm, cached until it
expires, per host, scope and credential) or with Basic auth (then sent up front on later
requests for the same host, scope and credential). A streamed request body cannot be sent
twice, so its caller first makes a request of the same scope with no body (the copier's
POST before a blob PUT), which leaves the answer cached. Every failure is a
failures.Failure of one Kind, because the kind decides what nodekeeper does next.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import ssl
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass

import httpx

from nodekeeper import logs, metrics
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.values import Endpoint
from nodekeeper.registry.wire import MAX_SMALL_BODY, classify, header_safe, read_body, scrub

DEFAULT_TOKEN_SECONDS = 60.0     # when a token answer has no expires_in, as containerd
MAX_TOKEN_SECONDS = 3600.0       # a token is never kept longer, whatever it claims
MAX_TOKEN_CHARS = 16 * 1024      # Docker Hub's are ~2 KiB, the largest seen ~8 KiB
MAX_CHALLENGE_CHARS = 4096
MAX_REDIRECTS = 5

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_log = logs.get("registry")


@dataclass
class _Token:
    header: str  # the whole Authorization value: "Bearer …" or "Basic …"
    expires: float


class Session:
    def __init__(self, per_host: int = 8, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._per_host = per_host
        self._clock = clock
        # Tests hand in a MockTransport; in production each client opens real connections.
        self._transport = transport
        self._clients: dict[tuple[str, tuple[str, ...], bool, tuple[tuple[str, str], ...]],
                            httpx.AsyncClient] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def request(self, method: str, endpoint: Endpoint, url: str, *,
                      creds: Credentials | None, scope: str,
                      params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None,
                      content: bytes | AsyncIterable[bytes] | None = None,
                      stream: bool = False) -> httpx.Response:
        """One request, answering a 401 challenge once with a token or Basic auth.

        Raises Failure for any answer of 300 or more, and for anything else that goes
        wrong (wire.classify). Without `stream` the body is read, at most
        MAX_SMALL_BODY bytes; with it, the body is left for the caller to read (with
        wire.read_body) and close. A streamed `content` is sent once: a 401 to it is
        answered (and cached) but raised, not retried.
        """
        creds = creds if creds and creds.applies_to(endpoint.host) else None
        token_key = (endpoint.host, scope, _identity(creds))
        try:
            return await self._request(method, endpoint, url, creds, scope, token_key,
                                       params, headers, content, stream)
        except Exception as exc:
            secrets = _secrets(creds, self._tokens.get(token_key))
            failure = classify(exc, endpoint.host)
            raise Failure(failure.kind, scrub(failure.detail, secrets)) from None

    async def _request(self, method: str, endpoint: Endpoint, url: str,
                       creds: Credentials | None, scope: str,
                       token_key: tuple[str, str, str], params: Mapping[str, str] | None,
                       headers: Mapping[str, str] | None,
                       content: bytes | AsyncIterable[bytes] | None,
                       stream: bool) -> httpx.Response:
        sent = {**dict(endpoint.headers), **(headers or {})}
        cached = self._tokens.get(token_key)
        if cached is not None and cached.expires > self._clock():
            sent["Authorization"] = cached.header
        response = await self._send(method, endpoint, url, params, sent, content)
        if response.status_code == 401:
            challenge = response.headers.get("www-authenticate", "")
            await response.aclose()
            sent["Authorization"] = await self._answer(endpoint, challenge, creds, scope,
                                                       token_key)
            if content is not None and not isinstance(content, bytes):
                raise Failure(Kind.UNAUTHORIZED, f"{endpoint.host} challenged a streamed "
                                                 "upload, which cannot be sent again")
            response = await self._send(method, endpoint, url, params, sent, content)
        if response.status_code >= 300:
            await response.aclose()
            _raise_for(response, endpoint)
        if not stream:
            # The body is read here, bounded; callers see it as response.content.
            body = await read_body(response, MAX_SMALL_BODY, f"{endpoint.host}{url[-80:]}")
            response = httpx.Response(response.status_code, headers=response.headers,
                                      content=body, request=response.request)
        return response

    async def _answer(self, endpoint: Endpoint, challenge: str, creds: Credentials | None,
                      scope: str, token_key: tuple[str, str, str]) -> str:
        if len(challenge) > MAX_CHALLENGE_CHARS:
            raise Failure(Kind.INVALID, f"{endpoint.host} sent a challenge of "
                                        f"{len(challenge)} characters")
        scheme = challenge.split(" ", 1)[0].lower()
        fields = dict(_CHALLENGE_PARAM.findall(challenge))
        if scheme == "basic":
            if creds is None or not creds.username:
                raise Failure(Kind.UNAUTHORIZED, f"{endpoint.host} wants credentials and "
                                                 "none were given for it")
            pair = f"{creds.username}:{creds.password}".encode()
            header = f"Basic {base64.b64encode(pair).decode()}"
            self._tokens[token_key] = _Token(header, float("inf"))
            return header
        if scheme != "bearer" or "realm" not in fields:
            raise Failure(Kind.INVALID, f"{endpoint.host} sent an unusable challenge "
                                        f"{challenge[:120]!r}")
        if creds is not None and creds.registry_token:
            header = f"Bearer {creds.registry_token}"
            if not header_safe(header):
                raise Failure(Kind.INVALID, f"the registry token for {endpoint.host} cannot "
                                            "be sent in an HTTP header")
            self._tokens[token_key] = _Token(header, float("inf"))
            return header
        token = await self._fetch_token(endpoint, fields, creds, fields.get("scope") or scope)
        self._tokens[token_key] = token
        return token.header

    async def _fetch_token(self, endpoint: Endpoint, fields: dict[str, str],
                           creds: Credentials | None, scope: str) -> _Token:
        realm = fields["realm"]
        what = f"token service {realm[:200]}"
        try:
            realm_parts = httpx.URL(realm)
            usable = (realm_parts.scheme in ("http", "https") and bool(realm_parts.host)
                      and 0 < (realm_parts.port or 443) < 65536)
        except (ValueError, TypeError, httpx.InvalidURL):
            usable = False
        if not usable:
            raise Failure(Kind.INVALID, f"{endpoint.host} named a realm that is not a usable "
                                        f"URL: {realm[:120]!r}")
        # Credentials go to a token service over HTTPS, or to the registry's own host
        # (any port): never in clear text to a third party.
        same_host = realm_parts.host == httpx.URL(endpoint.base).host
        send_creds = creds is not None and (realm_parts.scheme == "https" or same_host)
        query = {"scope": scope}
        if "service" in fields:
            query["service"] = fields["service"]
        client = self._client(endpoint)
        if send_creds and creds is not None and creds.identity_token:
            request = client.build_request("POST", realm_parts, data={
                "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                "client_id": "nodekeeper", **query})
        else:
            basic = {}
            if send_creds and creds is not None and creds.username:
                pair = f"{creds.username}:{creds.password}".encode()
                basic["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
            request = client.build_request("GET", realm_parts, params=query, headers=basic)
        response = await client.send(request, stream=True)
        _count(endpoint, "token", response.status_code)
        if response.status_code in (401, 403):
            await response.aclose()
            raise Failure(Kind.UNAUTHORIZED, f"{what} refused the credentials "
                                             f"({response.status_code})")
        if response.status_code >= 300:
            await response.aclose()
            _raise_for(response, endpoint, what=what)
        body = await read_body(response, MAX_SMALL_BODY, what)
        return self._token(body, what)

    def _token(self, body: bytes, what: str) -> _Token:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Failure(Kind.INVALID, f"{what} answered something that is not a JSON object")
        value = answer.get("token") or answer.get("access_token")
        if not isinstance(value, str) or not value:
            raise Failure(Kind.INVALID, f"{what} sent no token")
        if len(value) > MAX_TOKEN_CHARS or not header_safe(value):
            raise Failure(Kind.INVALID, f"{what} sent a token that cannot be used "
                                        f"({len(value)} characters; at most "
                                        f"{MAX_TOKEN_CHARS} printable ASCII)")
        lifetime = answer.get("expires_in")
        if lifetime is None:
            lifetime = DEFAULT_TOKEN_SECONDS
        if (isinstance(lifetime, bool) or not isinstance(lifetime, int | float)
                or not math.isfinite(lifetime)):
            raise Failure(Kind.INVALID, f"{what} sent an expires_in that is not a number")
        # As containerd: less than a minute counts as a minute. Renew a little early, so a
        # token never expires between our check and its use.
        lifetime = min(max(float(lifetime), DEFAULT_TOKEN_SECONDS), MAX_TOKEN_SECONDS)
        return _Token(f"Bearer {value}", self._clock() + lifetime - 5.0)

    async def _send(self, method: str, endpoint: Endpoint, url: str,
                    params: Mapping[str, str] | None, headers: dict[str, str],
                    content: bytes | AsyncIterable[bytes] | None) -> httpx.Response:
        client = self._client(endpoint)
        request = client.build_request(method, url, params=params, headers=headers,
                                       content=content)
        response = await client.send(request, stream=True)
        _count(endpoint, method, response.status_code)
        return response

    def _client(self, endpoint: Endpoint) -> httpx.AsyncClient:
        key = (endpoint.host, endpoint.ca, endpoint.skip_verify, endpoint.client)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=_tls(endpoint), follow_redirects=True, max_redirects=MAX_REDIRECTS,
                trust_env=False, transport=self._transport,
                # The probe's own deadline bounds the whole exchange; these only keep a
                # dead connection from lingering in the pool.
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=self._per_host * 2,
                                    max_keepalive_connections=self._per_host),
                # Compressed answers could cost far more than their size: ask for none
                # (wire.read_body still copes, within its caps).
                headers={"User-Agent": "nodekeeper", "Accept-Encoding": "identity"},
            )
            self._clients[key] = client
        return client


def _secrets(creds: Credentials | None, token: _Token | None) -> list[str]:
    """What must never appear in a message about a request with these."""
    found = [token.header.split(" ", 1)[-1]] if token is not None else []
    if creds is not None:
        found += [creds.password, creds.identity_token, creds.registry_token,
                  base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()]
    return [secret for secret in found if secret]


def _identity(creds: Credentials | None) -> str:
    # In-memory cache key only; never stored or logged.
    if creds is None:
        return "anonymous"
    return hashlib.sha256(creds.secret_material().encode()).hexdigest()


@functools.cache
def _system_trust() -> ssl.SSLContext:
    # One context with the system's CAs for every client: each costs ~2 MB to build.
    return ssl.create_default_context()


def _tls(endpoint: Endpoint) -> ssl.SSLContext | bool:
    if endpoint.base.startswith("http://"):
        return False  # no TLS: nothing to load
    if not endpoint.ca and not endpoint.client:
        return False if endpoint.skip_verify else _system_trust()
    context = ssl.create_default_context()
    if endpoint.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for ca in endpoint.ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            _log.warning("CA file from hosts.toml cannot be used", path=ca,
                         host=endpoint.host, error=type(exc).__name__)
    for certificate, key in endpoint.client:
        try:
            context.load_cert_chain(certificate, key or None)
        except (OSError, ssl.SSLError) as exc:
            _log.warning("client certificate from hosts.toml cannot be used",
                         path=certificate, host=endpoint.host, error=type(exc).__name__)
    return context


def _raise_for(response: httpx.Response, endpoint: Endpoint, what: str = "") -> None:
    status = response.status_code
    where = what or endpoint.host
    if status < 300:
        return
    if status == 429:
        raise Failure(Kind.RATE_LIMITED, f"{where} answered 429 Too Many Requests")
    if status in (401, 403):
        raise Failure(Kind.UNAUTHORIZED, f"{where} refused access ({status})")
    if status == 404:
        raise Failure(Kind.NOT_FOUND, f"{where}: {response.request.url.path} not found")
    if status >= 500:
        raise Failure(Kind.SERVER_ERROR, f"{where} answered {status}")
    raise Failure(Kind.INVALID, f"{where} answered {status}")


def _count(endpoint: Endpoint, method: str, status: int) -> None:
    metrics.UPSTREAM_REQUESTS.labels(endpoint.host, method, str(status)).inc()
