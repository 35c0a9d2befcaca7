"""Asking a registry for a tag's current digest, within a deadline.

`HEAD /v2/<name>/manifests/<tag>` with every manifest type in Accept, so the digest is
the one containerd records; the digest comes from Docker-Content-Digest, or from hashing
the body of a GET when that header is missing. Failures are failures.Failure: the kind
decides whether the node's copy may stand in.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from nodekeeper import metrics
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import Endpoint, Location, ProbeResult
from nodekeeper.registry.hosts import Hosts, default_host
from nodekeeper.registry.session import Session
from nodekeeper.registry.wire import MAX_MANIFEST_BYTES, classify, read_body, valid_digest

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)


class Prober:
    def __init__(self, hosts: Hosts, session: Session, per_registry: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._hosts = hosts
        self._session = session
        self._per_registry = per_registry
        self._clock = clock
        self._limits: dict[str, asyncio.Semaphore] = {}

    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        """The digest `ref` names upstream now, or Failure. Takes at most `timeout`."""
        started = self._clock()
        limit = self._limits.setdefault(ref.domain, asyncio.Semaphore(self._per_registry))
        kind = "ok"
        try:
            # The deadline covers waiting for a slot too: the kubelet's pull is what waits.
            return await asyncio.wait_for(self._probe(limit, ref, credentials), timeout)
        except asyncio.TimeoutError:
            kind = "timeout"
            raise Failure(Kind.TIMEOUT, f"no answer from {ref.domain} within "
                                          f"probe_timeout {timeout:g}s") from None
        except Exception as exc:  # every outcome is a result or a Failure of one kind
            failure = classify(exc, ref.domain)
            kind = failure.kind.value
            raise failure from None
        finally:
            metrics.PROBE_SECONDS.labels(ref.domain, kind).observe(self._clock() - started)

    def default_host(self, ref: Reference) -> str:
        return default_host(ref.domain)

    def applicable(self, ref: Reference, credentials: Credentials | None
                   ) -> Credentials | None:
        """The credentials containerd would use for `ref`'s registry: those whose
        server_address, when set, names one of the hosts it resolves tags at."""
        if credentials is None or not credentials.server_address:
            return credentials
        try:
            hosts = [endpoint.host for endpoint in self._hosts.endpoints(ref.domain)]
        except Failure:
            return None  # the probe will say why; nothing can be verified meanwhile
        return credentials if any(credentials.applies_to(host) for host in hosts) else None

    async def _probe(self, limit: asyncio.Semaphore, ref: Reference,
                     credentials: Credentials | None) -> ProbeResult:
        async with limit:
            first: Failure | None = None
            for endpoint in self._hosts.endpoints(ref.domain):
                try:
                    return await self._resolve(endpoint, ref, credentials)
                except Failure as failure:
                    if endpoint.http_fallback and failure.kind is Kind.UNREACHABLE:
                        continue  # no TLS there: plain HTTP, next, gives the answer
                    # Like containerd: an unusable mirror hands over to the next host.
                    first = first or failure
                    if failure.kind in (Kind.UNAUTHORIZED, Kind.RATE_LIMITED):
                        break
            raise first or Failure(
                Kind.INVALID, f"no host in the hosts.toml for {ref.domain} may resolve tags")

    async def _resolve(self, endpoint: Endpoint, ref: Reference,
                       credentials: Credentials | None) -> ProbeResult:
        creds = credentials if credentials and credentials.applies_to(endpoint.host) else None
        url = f"{endpoint.base}/{ref.path}/manifests/{ref.digest or ref.tag}"
        params = {"ns": endpoint.namespace} if endpoint.namespace else None
        scope = f"repository:{ref.path}:pull"
        headers = {"Accept": ACCEPT}
        response = await self._session.request("HEAD", endpoint, url, creds=creds, scope=scope,
                                               params=params, headers=headers)
        digest = response.headers.get("docker-content-digest", "").strip()
        if not digest:
            response = await self._session.request("GET", endpoint, url, creds=creds,
                                                   scope=scope, params=params, headers=headers,
                                                   stream=True)
            body = await read_body(response, MAX_MANIFEST_BYTES,
                                   f"the manifest from {endpoint.host}")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if not valid_digest(digest):
            raise Failure(Kind.INVALID, f"{endpoint.host} answered a Docker-Content-Digest "
                                        f"that is not a digest: {digest[:80]!r}")
        if ref.digest and digest != ref.digest:
            raise Failure(Kind.INVALID, f"{endpoint.host} answered {digest} for {ref.digest}")
        remaining = response.headers.get("ratelimit-remaining", "").split(";", 1)[0].strip()
        return ProbeResult(digest, endpoint.host, authenticated=creds is not None,
                           pull_quota_spent=remaining == "0",
                           source=Location(endpoint, ref.path, creds))
