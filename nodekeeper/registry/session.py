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
import re
import ssl
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass

import httpx

from nodekeeper import logs, metrics
from nodekeeper.credentials import Credentials
from nodekeeper.failures import Failure, Kind
from nodekeeper.registry.hosts import Endpoint

DEFAULT_TOKEN_SECONDS = 60.0

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

        Raises Failure for any answer of 300 or more. With `stream`, the body is
        not read: the caller iterates it and closes the response. A streamed `content`
        is sent once: a 401 to it is answered (and cached) but raised, not retried.
        """
        creds = creds if creds and creds.applies_to(endpoint.host) else None
        sent = {**dict(endpoint.headers), **(headers or {})}
        token_key = (endpoint.host, scope, _identity(creds))
        cached = self._tokens.get(token_key)
        if cached is not None and cached.expires > self._clock():
            sent["Authorization"] = cached.header
        response = await self._send(method, endpoint, url, params, sent, content, stream)
        if response.status_code == 401:
            await response.aclose()
            challenge = response.headers.get("www-authenticate", "")
            sent["Authorization"] = await self._answer(endpoint, challenge, creds, scope,
                                                       token_key)
            if content is not None and not isinstance(content, bytes):
                raise Failure(Kind.UNAUTHORIZED, f"{endpoint.host} challenged a streamed "
                                                   "upload, which cannot be sent again")
            response = await self._send(method, endpoint, url, params, sent, content, stream)
        if response.status_code >= 300:
            await response.aread()
            await response.aclose()
            _raise_for(response, endpoint)
        return response

    async def _answer(self, endpoint: Endpoint, challenge: str, creds: Credentials | None,
                      scope: str, token_key: tuple[str, str, str]) -> str:
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
            self._tokens[token_key] = _Token(header, float("inf"))
            return header
        token = await self._fetch_token(endpoint, fields, creds, fields.get("scope") or scope)
        self._tokens[token_key] = token
        return token.header

    async def _fetch_token(self, endpoint: Endpoint, fields: dict[str, str],
                           creds: Credentials | None, scope: str) -> _Token:
        realm = fields["realm"]
        realm_parts = httpx.URL(realm)
        # Credentials go to a token service over HTTPS, or to the registry's own host
        # (any port): never in clear text to a third party.
        same_host = realm_parts.host == httpx.URL(endpoint.base).host
        send_creds = creds is not None and (realm_parts.scheme == "https" or same_host)
        query = {"scope": scope}
        if "service" in fields:
            query["service"] = fields["service"]
        client = self._client(endpoint)
        try:
            if send_creds and creds is not None and creds.identity_token:
                response = await client.post(realm, data={
                    "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "nodekeeper", **query})
            else:
                auth = (httpx.BasicAuth(creds.username, creds.password)
                        if send_creds and creds is not None and creds.username else None)
                response = await client.get(realm, params=query, auth=auth)
        except httpx.TransportError as exc:
            raise Failure(Kind.UNREACHABLE, f"token service {realm}: {_describe(exc)}") from None
        _count(endpoint, "token", response.status_code)
        if response.status_code in (401, 403):
            raise Failure(Kind.UNAUTHORIZED, f"token service {realm} refused the credentials "
                                               f"({response.status_code})")
        _raise_for(response, endpoint, what=f"token service {realm}")
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError):
            value, lifetime = None, 0.0
        if not isinstance(value, str) or not value:
            raise Failure(Kind.INVALID, f"token service {realm} sent no token")
        # Renew a little early, so a token never expires between our check and its use.
        return _Token(f"Bearer {value}", self._clock() + max(lifetime - 5.0, 1.0))

    async def _send(self, method: str, endpoint: Endpoint, url: str,
                    params: Mapping[str, str] | None, headers: dict[str, str],
                    content: bytes | AsyncIterable[bytes] | None,
                    stream: bool) -> httpx.Response:
        client = self._client(endpoint)
        request = client.build_request(method, url, params=params, headers=headers,
                                       content=content)
        try:
            response = await client.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise Failure(Kind.UNREACHABLE, f"{endpoint.host}: {_describe(exc)}") from None
        _count(endpoint, method, response.status_code)
        return response

    def _client(self, endpoint: Endpoint) -> httpx.AsyncClient:
        key = (endpoint.host, endpoint.ca, endpoint.skip_verify, endpoint.client)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=_tls(endpoint), follow_redirects=True, trust_env=False,
                transport=self._transport,
                # The probe's own deadline bounds the whole exchange; these only keep a
                # dead connection from lingering in the pool.
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=self._per_host * 2,
                                    max_keepalive_connections=self._per_host),
                headers={"User-Agent": "nodekeeper"},
            )
            self._clients[key] = client
        return client


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


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
