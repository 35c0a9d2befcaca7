"""Asking a registry for a tag's current digest, within a deadline.

`HEAD /v2/<name>/manifests/<tag>` with every manifest type in Accept, so the digest is
the one containerd records; the digest comes from Docker-Content-Digest, or from hashing
the body of a GET when that header is missing. Failures are failures.Failure: the kind
decides whether the node's copy may stand in.

Hosts are asked in containerd's order, within one deadline for them all. A host that
stays silent or refuses connections is in an outage episode (outage.py) until it answers
again: meanwhile its one probe in flight runs as a task of its own, and each pull waits
for it at most outage_wait, so a black-holed registry costs one probe_timeout per
episode, not one per pull.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

from nodekeeper import logs, metrics
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.reference import Reference
from nodekeeper.pull.values import Endpoint, Location, ProbeResult
from nodekeeper.registry.hosts import Hosts, default_host
from nodekeeper.registry.outage import Ended, Outage, Outages, Started, Step
from nodekeeper.registry.session import Session
from nodekeeper.registry.wire import MAX_MANIFEST_BYTES, classify, read_body, valid_digest

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)
# How long a pull waits for an endpoint in an outage episode (config.py: outage_wait).
DEFAULT_OUTAGE_WAIT = 0.2

_log = logs.get("probe")


class Prober:
    def __init__(self, hosts: Hosts, session: Session, per_registry: int = 8,
                 clock: Callable[[], float] = time.monotonic,
                 outage_wait: float = DEFAULT_OUTAGE_WAIT,
                 on_outage: Callable[[], None] = lambda: None) -> None:
        self._hosts = hosts
        # Told when an episode starts or ends, so that `status` shows it at once.
        self._on_outage = on_outage
        self._session = session
        self._per_registry = per_registry
        self._clock = clock
        self._outage_wait = outage_wait
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._outages = Outages()
        # The probe in flight of each endpoint in an episode, detached from the pull that
        # sent it (that pull waits for it only outage_wait).
        self._in_flight: dict[str, asyncio.Task[ProbeResult]] = {}

    async def close(self) -> None:
        """Cancel the outage probes still in flight."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def probe(self, ref: Reference, credentials: Credentials | None,
                    timeout: float) -> ProbeResult:
        """The digest `ref` names upstream now, or Failure. Takes at most `timeout`; at
        most outage_wait per endpoint in an outage episode."""
        started = self._clock()
        limit = self._limits.setdefault(ref.domain, asyncio.Semaphore(self._per_registry))
        asking: list[str] = []  # the endpoint being asked, when the deadline fires
        kind = "ok"
        try:
            # The deadline covers waiting for a slot too: the kubelet's pull is what waits.
            return await asyncio.wait_for(
                self._probe(limit, ref, credentials, timeout, asking), timeout)
        except asyncio.TimeoutError:
            kind = "timeout"
            where = asking[-1] if asking else ref.domain
            detail = f"no answer from {where} within probe_timeout {timeout:g}s"
            if not asking:
                raise Failure(Kind.TIMEOUT, detail) from None
            self._failed(asking[-1], Kind.TIMEOUT, detail)
            raise self._during_outage(asking[-1], Failure(Kind.TIMEOUT, detail)) from None
        except Exception as exc:  # every outcome is a result or a Failure of one kind
            failure = classify(exc, ref.domain)
            kind = failure.kind.value
            raise failure from None
        finally:
            metrics.PROBE_SECONDS.labels(ref.domain, kind).observe(self._clock() - started)

    def open_outages(self) -> list[Outage]:
        """The endpoints in an outage episode now, oldest first: since when (epoch
        seconds), why (the failure that started it), how many pulls it answered."""
        offset = time.time() - self._clock()
        return [dataclasses.replace(outage, since=outage.since + offset)
                for outage in self._outages.open()]

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
                     credentials: Credentials | None, timeout: float,
                     asking: list[str]) -> ProbeResult:
        first: Failure | None = None
        for host, endpoints in _by_host(self._hosts.endpoints(ref.domain)):
            try:
                return await self._through_outage(limit, host, endpoints, ref, credentials,
                                                  timeout, asking)
            except Failure as failure:
                asking.clear()
                # Like containerd: an unusable mirror hands over to the next host.
                first = first or failure
                if failure.kind in (Kind.UNAUTHORIZED, Kind.RATE_LIMITED):
                    break
        raise first or Failure(
            Kind.INVALID, f"no host in the hosts.toml for {ref.domain} may resolve tags")

    async def _through_outage(self, limit: asyncio.Semaphore, host: str,
                              endpoints: list[Endpoint], ref: Reference,
                              credentials: Credentials | None, timeout: float,
                              asking: list[str]) -> ProbeResult:
        """Ask `host`, unless it is in an outage episode: then wait at most outage_wait
        for the episode's one probe in flight (sent by this pull when there is none)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._outage_wait
        while True:
            step = self._outages.next_step(host)
            if step is Step.ASK:
                async with limit:
                    asking.append(host)
                    found = await self._ask(host, endpoints, ref, credentials)
                    asking.clear()
                    return found
            if step is Step.SEND:
                task = asyncio.create_task(self._outage_probe(host, endpoints, ref,
                                                              credentials, timeout))
                task.add_done_callback(_retrieved)
                self._in_flight[host] = task
            else:
                task = self._in_flight[host]
            # Not holding a slot of `limit`: the wait is for a probe already counted.
            done, _ = await asyncio.wait({task}, timeout=max(until - loop.time(), 0))
            if task in done and step is Step.SEND:
                try:
                    return task.result()  # sent after this pull started: its own answer
                except Failure:
                    self._served(host)
                    raise
            if task not in done:
                outage = self._served(host)
                if outage is not None:
                    # The cause's own words: every pull of the episode tells the pod the
                    # same, so its Events add up to one with a count.
                    raise Failure(outage.kind, outage.detail, outage=host)
            # Another pull's probe ended, or the episode did: look again.

    async def _outage_probe(self, host: str, endpoints: list[Endpoint], ref: Reference,
                            credentials: Credentials | None, timeout: float) -> ProbeResult:
        """The episode's probe, with the full timeout of the pull that sent it."""
        me = asyncio.current_task()
        try:
            return await asyncio.wait_for(self._ask(host, endpoints, ref, credentials, me),
                                          timeout)
        except asyncio.TimeoutError:
            detail = f"no answer from {host} within probe_timeout {timeout:g}s"
            self._failed(host, Kind.TIMEOUT, detail, probe=self._is_outage_probe(host, me))
            raise self._during_outage(host, Failure(Kind.TIMEOUT, detail)) from None
        finally:
            if self._is_outage_probe(host, me):
                del self._in_flight[host]

    async def _ask(self, host: str, endpoints: list[Endpoint], ref: Reference,
                   credentials: Credentials | None,
                   sender: asyncio.Task[Any] | None = None) -> ProbeResult:
        """One host's answer, which says whether it is in an outage."""
        try:
            found = await self._resolve_at(endpoints, ref, credentials)
        except Exception as exc:
            failed = classify(exc, host)
            self._failed(host, failed.kind, failed.detail,
                         probe=self._is_outage_probe(host, sender))
            raise self._during_outage(host, failed) from None
        self._answered(host)
        return found

    async def _resolve_at(self, endpoints: list[Endpoint], ref: Reference,
                          credentials: Credentials | None) -> ProbeResult:
        """One host's endpoints in order: a loopback registry's HTTPS, then plain HTTP when
        no TLS answers there."""
        for endpoint in endpoints[:-1]:
            try:
                return await self._resolve(endpoint, ref, credentials)
            except Failure as failure:
                if not (endpoint.http_fallback and failure.kind is Kind.UNREACHABLE):
                    raise
        return await self._resolve(endpoints[-1], ref, credentials)

    def _during_outage(self, host: str, failure: Failure) -> Failure:
        """`failure`, naming `host`'s outage when it is in one (this failure may have just
        started it)."""
        if failure.outage or self._outages.get(host) is None:
            return failure
        return Failure(failure.kind, failure.detail, outage=host)

    def _is_outage_probe(self, host: str, sender: asyncio.Task[Any] | None) -> bool:
        """Whether `sender` is `host`'s episode probe in flight (and not one left over from
        an episode that ended meanwhile: a new one may have its own in flight)."""
        return sender is not None and self._in_flight.get(host) is sender

    def _failed(self, host: str, kind: Kind, detail: str, probe: bool = False) -> None:
        change = self._outages.failed(host, kind, detail, self._clock(), probe=probe)
        if isinstance(change, Started):
            metrics.OUTAGES.labels(host).set(1)
            _log.warning("registry endpoint in an outage: later pulls wait for it at most "
                         "outage_wait", endpoint=host, kind=kind.value, detail=detail,
                         outage_wait=self._outage_wait)
            self._on_outage()
        elif isinstance(change, Ended):
            self._ended(change)

    def _served(self, host: str) -> Outage | None:
        """This pull goes on without `host`'s answer, because of its episode (if any)."""
        outage = self._outages.served(host)
        if outage is not None:
            metrics.OUTAGE_PULLS.labels(host).inc()
        return outage

    def _answered(self, host: str) -> None:
        change = self._outages.answered(host, self._clock())
        if change is not None:
            self._ended(change)

    def _ended(self, change: Ended) -> None:
        outage = change.outage
        metrics.OUTAGES.labels(outage.endpoint).set(0)
        _log.info("registry endpoint answers again: outage over", endpoint=outage.endpoint,
                  kind=outage.kind.value, detail=outage.detail, pulls_answered=outage.answered,
                  lasted_s=round(change.lasted, 3))
        self._on_outage()

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


def _retrieved(task: asyncio.Task[ProbeResult]) -> None:
    """The episode's probe failing is told through the episode, not as a task whose
    exception was never retrieved."""
    if not task.cancelled():
        task.exception()


def _by_host(endpoints: list[Endpoint]) -> list[tuple[str, list[Endpoint]]]:
    """Endpoints grouped by host, in order: a loopback registry's HTTPS and plain HTTP are
    one host, in or out of an outage together."""
    groups: list[tuple[str, list[Endpoint]]] = []
    for endpoint in endpoints:
        if groups and groups[-1][0] == endpoint.host:
            groups[-1][1].append(endpoint)
        else:
            groups.append((endpoint.host, [endpoint]))
    return groups
