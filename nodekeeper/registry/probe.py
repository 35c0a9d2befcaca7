"""Asking a registry for a tag's current digest, within a deadline.

`HEAD /v2/<name>/manifests/<tag>` with every manifest type in Accept, so the digest is
the one containerd records; the digest comes from Docker-Content-Digest, or from hashing
the body of a GET when that header is missing. 401 answers are met with the Bearer token
flow (tokens cached until they expire, per realm, service, scope and credential) or with
Basic auth. Every failure is classified, because the classification decides whether the
node's copy may stand in:

    unreachable   no connection (refused, reset, DNS, TLS)
    timeout       no answer within the probe's deadline (token fetch included)
    server_error  5xx
    rate_limited  429, or Docker Hub's ratelimit-remaining of 0 when a pull is needed
    not_found     404: the tag or repository is gone
    unauthorized  401/403 after trying the credentials we were given
    invalid       an answer that makes no sense (no digest, malformed token reply)
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from nodekeeper import logs, metrics
from nodekeeper.credentials import Credentials
from nodekeeper.reference import Reference
from nodekeeper.registry.hosts import Endpoint, endpoints

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)
DEFAULT_TOKEN_SECONDS = 60.0
# Largest manifest we hash ourselves when a registry omits Docker-Content-Digest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_log = logs.get("registry")


class ProbeFailure(Exception):
    """The probe did not produce a digest. `kind` is one of the classes above."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ProbeResult:
    digest: str
    endpoint: str
    # The request's credentials were used (else the registry answered anonymously).
    authenticated: bool
    # Docker Hub says the pull quota is spent: a HEAD still works, a pull would not.
    pull_quota_spent: bool = False


@dataclass
class _Token:
    value: str
    expires: float


class Prober:
    def __init__(self, hosts_dir: str, per_registry: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._hosts_dir = hosts_dir
        self._per_registry = per_registry
        self._clock = clock
        self._clients: dict[tuple[str, tuple[str, ...], bool], httpx.AsyncClient] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        """The digest `ref` names upstream now, or ProbeFailure. Takes at most `timeout`."""
        started = self._clock()
        limit = self._limits.setdefault(ref.domain, asyncio.Semaphore(self._per_registry))
        kind = "ok"
        try:
            # The deadline covers waiting for a slot too: the kubelet's pull is what waits.
            return await asyncio.wait_for(self._probe(limit, ref, credentials), timeout)
        except asyncio.TimeoutError:
            kind = "timeout"
            raise ProbeFailure("timeout", f"no answer from {ref.domain} within "
                                          f"probe_timeout {timeout:g}s") from None
        except ProbeFailure as failure:
            kind = failure.kind
            raise
        finally:
            metrics.PROBE_SECONDS.labels(ref.domain, kind).observe(self._clock() - started)

    async def _probe(self, limit: asyncio.Semaphore, ref: Reference,
                     credentials: Credentials | None) -> ProbeResult:
        async with limit:
            first: ProbeFailure | None = None
            for endpoint in endpoints(self._hosts_dir, ref.domain):
                try:
                    return await self._resolve(endpoint, ref, credentials)
                except ProbeFailure as failure:
                    # Like containerd: an unusable mirror hands over to the next host.
                    first = first or failure
                    if failure.kind in ("unauthorized", "rate_limited"):
                        break
            raise first or ProbeFailure(
                "invalid", f"no host in the hosts.toml for {ref.domain} may resolve tags")

    async def _resolve(self, endpoint: Endpoint, ref: Reference,
                       credentials: Credentials | None) -> ProbeResult:
        creds = credentials if credentials and credentials.applies_to(endpoint.host) else None
        url = f"{endpoint.base}/{ref.path}/manifests/{ref.digest or ref.tag}"
        params = {"ns": endpoint.namespace} if endpoint.namespace else None
        scope = f"repository:{ref.path}:pull"
        response = await self._authorized("HEAD", endpoint, url, params, creds, scope)
        digest = response.headers.get("docker-content-digest", "")
        if not digest:
            response = await self._authorized("GET", endpoint, url, params, creds, scope)
            if len(response.content) > MAX_MANIFEST_BYTES:
                raise ProbeFailure("invalid", f"manifest from {endpoint.host} is too large")
            digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
        if ref.digest and digest != ref.digest:
            raise ProbeFailure("invalid", f"{endpoint.host} answered {digest} for {ref.digest}")
        remaining = response.headers.get("ratelimit-remaining", "").split(";", 1)[0].strip()
        return ProbeResult(digest, endpoint.host, authenticated=creds is not None,
                           pull_quota_spent=remaining == "0")

    async def _authorized(self, method: str, endpoint: Endpoint, url: str,
                          params: dict[str, str] | None, creds: Credentials | None,
                          scope: str) -> httpx.Response:
        """One request, answering a 401 challenge once with a token or Basic auth."""
        headers = {"Accept": ACCEPT, **dict(endpoint.headers)}
        token_key = (endpoint.host, scope, _identity(creds))
        cached = self._tokens.get(token_key)
        if cached is not None and cached.expires > self._clock():
            headers["Authorization"] = f"Bearer {cached.value}"
        response = await self._send(method, endpoint, url, params, headers)
        if response.status_code == 401:
            challenge = response.headers.get("www-authenticate", "")
            headers["Authorization"] = await self._answer(endpoint, challenge, creds, scope,
                                                          token_key)
            response = await self._send(method, endpoint, url, params, headers)
        _raise_for(response, endpoint)
        return response

    async def _answer(self, endpoint: Endpoint, challenge: str, creds: Credentials | None,
                      scope: str, token_key: tuple[str, str, str]) -> str:
        scheme = challenge.split(" ", 1)[0].lower()
        fields = dict(_CHALLENGE_PARAM.findall(challenge))
        if scheme == "basic":
            if creds is None or not creds.username:
                raise ProbeFailure("unauthorized", f"{endpoint.host} wants credentials and "
                                                   "none were given for it")
            pair = f"{creds.username}:{creds.password}".encode()
            return f"Basic {base64.b64encode(pair).decode()}"
        if scheme != "bearer" or "realm" not in fields:
            raise ProbeFailure("invalid", f"{endpoint.host} sent an unusable challenge "
                                          f"{challenge[:120]!r}")
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        token = await self._fetch_token(endpoint, fields, creds, fields.get("scope") or scope)
        self._tokens[token_key] = token
        return f"Bearer {token.value}"

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
            raise ProbeFailure("unreachable", f"token service {realm}: {_describe(exc)}") from None
        _count(endpoint, "token", response.status_code)
        if response.status_code in (401, 403):
            raise ProbeFailure("unauthorized", f"token service {realm} refused the credentials "
                                               f"({response.status_code})")
        _raise_for(response, endpoint, what=f"token service {realm}")
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError):
            value, lifetime = None, 0.0
        if not isinstance(value, str) or not value:
            raise ProbeFailure("invalid", f"token service {realm} sent no token")
        # Renew a little early, so a token never expires between our check and its use.
        return _Token(value, self._clock() + max(lifetime - 5.0, 1.0))

    async def _send(self, method: str, endpoint: Endpoint, url: str,
                    params: dict[str, str] | None, headers: dict[str, str]) -> httpx.Response:
        try:
            response = await self._client(endpoint).request(method, url, params=params,
                                                             headers=headers)
        except httpx.TransportError as exc:
            raise ProbeFailure("unreachable", f"{endpoint.host}: {_describe(exc)}") from None
        _count(endpoint, method, response.status_code)
        return response

    def _client(self, endpoint: Endpoint) -> httpx.AsyncClient:
        key = (endpoint.host, endpoint.ca, endpoint.skip_verify)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=_tls(endpoint), follow_redirects=True, trust_env=False,
                # The probe's own deadline bounds the whole exchange; these only keep a
                # dead connection from lingering in the pool.
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=self._per_registry * 2,
                                    max_keepalive_connections=self._per_registry),
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
    if endpoint.skip_verify or endpoint.base.startswith("http://"):
        return False  # no TLS, or TLS without verification: no CA to load
    if not endpoint.ca:
        return _system_trust()
    context = ssl.create_default_context()
    for ca in endpoint.ca:
        if not Path(ca).is_file():
            _log.warning("CA file from hosts.toml is missing", path=ca, host=endpoint.host)
            continue
        context.load_verify_locations(cafile=ca)
    return context


def _raise_for(response: httpx.Response, endpoint: Endpoint, what: str = "") -> None:
    status = response.status_code
    where = what or endpoint.host
    if status < 300:
        return
    if status == 429:
        raise ProbeFailure("rate_limited", f"{where} answered 429 Too Many Requests")
    if status in (401, 403):
        raise ProbeFailure("unauthorized", f"{where} refused access ({status})")
    if status == 404:
        raise ProbeFailure("not_found", f"{where}: {response.request.url.path} not found")
    if status >= 500:
        raise ProbeFailure("server_error", f"{where} answered {status}")
    raise ProbeFailure("invalid", f"{where} answered {status}")


def _count(endpoint: Endpoint, method: str, status: int) -> None:
    metrics.UPSTREAM_REQUESTS.labels(endpoint.host, method, str(status)).inc()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
