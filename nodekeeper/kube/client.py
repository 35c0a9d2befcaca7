"""A small asyncio client of the Kubernetes API, on httpx, authenticated as a kubeconfig says.

nodekeeper needs three calls (create and patch an Event, ask what it may do), so this is
a few dozen lines instead of the official client (see pyproject.toml for the figures).

Credentials are read when the client is first used and again when any file the
kubeconfig names changes (checked at most every RECHECK_SECONDS; the kubelet rotates its
client certificate in place) or the API server answers 401 (read again once, then the
401 stands). An exec plugin runs with no terminal, its stderr discarded, within
EXEC_TIMEOUT; its credential is kept until it expires or a 401. A client key from a
kubeconfig or a plugin never touches the disk: it reaches OpenSSL through a memfd.
Environment proxies and .netrc are not used (`trust_env=False`). Every failure is an
errors.ApiError with one errors.ApiKind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from nodekeeper import __version__

# ApiError is defined with every other exception; kube/sink.py imports it from here.
from nodekeeper.errors import ApiError as ApiError
from nodekeeper.errors import ApiKind
from nodekeeper.kube import kubeconfig
from nodekeeper.kube.kubeconfig import Exec, Kubeconfig, KubeconfigError

RECHECK_SECONDS = 30.0
EXEC_TIMEOUT = 10.0
MAX_EXEC_OUTPUT = 64 * 1024
MAX_ANSWER = 1 << 20
_MAX_DETAIL = 300
# A credential this close to its expiry is fetched again before use.
_EXPIRY_MARGIN = 10.0
USER_AGENT = f"nodekeeper/{__version__}"


_KINDS = {401: ApiKind.UNAUTHORIZED, 403: ApiKind.FORBIDDEN, 404: ApiKind.NOT_FOUND,
          409: ApiKind.CONFLICT, 429: ApiKind.RATE_LIMITED}


@dataclass(frozen=True)
class _Credential:
    token: str
    cert_pem: bytes
    key_pem: bytes
    expires: float | None  # epoch seconds; None: until the API server refuses it


class _Session:
    """One reading of the kubeconfig and the HTTP client built from it."""

    def __init__(self, config: Kubeconfig, credential: _Credential, timeout: float) -> None:
        self.config = config
        self.credential = credential
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if credential.token:
            headers["Authorization"] = f"Bearer {credential.token}"
        self.http = httpx.AsyncClient(
            base_url=config.server, verify=_tls(config, credential), headers=headers,
            timeout=httpx.Timeout(timeout), trust_env=False,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1))
        self.extensions = ({"sni_hostname": config.tls_server_name}
                           if config.tls_server_name else {})

    def expired(self, now: float) -> bool:
        expires = self.credential.expires
        return expires is not None and now >= expires - _EXPIRY_MARGIN


class Client:
    def __init__(self, path: str, timeout: float, loaded: Kubeconfig | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._loaded = loaded
        self._session: _Session | None = None
        self._checked = 0.0

    @property
    def server(self) -> str:
        return self._session.config.server if self._session else ""

    async def prepare(self) -> None:
        """Read the credentials and build the HTTP client now, without a request."""
        await self._current()

    async def request(self, method: str, path: str, body: Any = None, *,
                      content_type: str = "application/json") -> Any:
        """Send one request; the decoded JSON answer, or ApiError."""
        for attempt in (1, 2):
            session = await self._current()
            try:
                return await asyncio.wait_for(
                    self._send(session, method, path, body, content_type), self.timeout)
            except asyncio.TimeoutError:
                raise ApiError(ApiKind.TIMEOUT, f"no answer from {session.config.server} within "
                                                f"{self.timeout:g}s") from None
            except ApiError as exc:
                if exc.kind is not ApiKind.UNAUTHORIZED or attempt == 2:
                    raise
                # Rotated certificate or token, expired plugin credential: read them again.
                await self._drop_session()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._drop_session()

    async def _drop_session(self) -> None:
        session, self._session, self._loaded = self._session, None, None
        if session is not None:
            await session.http.aclose()

    async def _current(self) -> _Session:
        now = time.monotonic()
        session = self._session
        if session is not None and now - self._checked >= RECHECK_SECONDS:
            self._checked = now
            if session.config.changed():
                await self._drop_session()
                session = None
        if session is not None and session.expired(time.time()):
            await self._drop_session()
            session = None
        if session is None:
            try:
                config = self._loaded or kubeconfig.load(self.path)
            except KubeconfigError as exc:
                raise ApiError(ApiKind.CREDENTIALS, str(exc)) from None
            credential = (await _run_plugin(config, config.exec) if config.exec else
                          _Credential(config.token, config.cert_pem, config.key_pem, None))
            session = _Session(config, credential, self.timeout)
            self._session, self._loaded, self._checked = session, None, now
        return session

    async def _send(self, session: _Session, method: str, path: str, body: Any,
                    content_type: str) -> Any:
        content = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        try:
            async with session.http.stream(method, path, content=content, headers=headers,
                                           extensions=session.extensions) as answer:
                data = bytearray()
                async for chunk in answer.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise ApiError(ApiKind.INVALID, f"answer larger than {MAX_ANSWER} bytes")
        except httpx.TimeoutException:
            raise ApiError(ApiKind.TIMEOUT, f"no answer from {session.config.server} within "
                                            f"{self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ApiError(ApiKind.UNREACHABLE,
                           f"{session.config.server}: {_describe(exc)}"[:_MAX_DETAIL]) from None
        status = answer.status_code
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = None
        if status < 300:
            if decoded is None and data:
                raise ApiError(ApiKind.INVALID, f"{method} {path}: the answer is not JSON", status)
            return decoded
        kind = _KINDS.get(status) or (ApiKind.SERVER_ERROR if status >= 500 else ApiKind.INVALID)
        reason = decoded.get("message") if isinstance(decoded, dict) else None
        detail = f"{method} {path}: {status}" + (f" {reason}" if isinstance(reason, str) else "")
        raise ApiError(kind, detail[:_MAX_DETAIL], status)


def _describe(exc: BaseException) -> str:
    """The innermost cause's text: 'Connection refused', 'certificate verify failed', ..."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc) or type(exc).__name__


def _tls(config: Kubeconfig, credential: _Credential) -> ssl.SSLContext:
    try:
        if config.ca_pem:
            pem = b"-----BEGIN" in config.ca_pem
            context = ssl.create_default_context(
                cadata=config.ca_pem.decode("ascii", "replace") if pem else config.ca_pem)
        else:
            context = ssl.create_default_context()
    except (ssl.SSLError, ValueError):
        raise ApiError(ApiKind.CREDENTIALS, f"{config.path}: certificate-authority holds no "
                                            "usable certificate") from None
    if config.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if credential.cert_pem:
        try:
            with _memfd(credential.cert_pem) as cert, _memfd(credential.key_pem) as key:
                context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError):
            raise ApiError(ApiKind.CREDENTIALS, f"{config.path}: the client certificate and key "
                                                "do not load (not PEM, or not a pair)") from None
    return context


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from, backed by memory only."""
    fd = os.memfd_create("nodekeeper-tls", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


async def _run_plugin(config: Kubeconfig, plugin: Exec) -> _Credential:
    """Run an exec credential plugin as client-go does, without a terminal."""
    spec: dict[str, Any] = {"interactive": False}
    if plugin.provide_cluster_info:
        spec["cluster"] = {"server": config.server,
                           "certificate-authority-data":
                               base64.b64encode(config.ca_pem).decode() if config.ca_pem else "",
                           "insecure-skip-tls-verify": config.insecure,
                           "tls-server-name": config.tls_server_name}
    info = {"apiVersion": plugin.api_version, "kind": "ExecCredential", "spec": spec}
    env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
    what = f"{config.path}: exec plugin {plugin.command}"
    try:
        # A session of its own, so that on a timeout its children end with it.
        process = await asyncio.create_subprocess_exec(
            plugin.command, *plugin.args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True)
    except OSError as exc:
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: cannot run: {exc.strerror or exc}") from None
    try:
        output = await asyncio.wait_for(_read_limited(process), EXEC_TIMEOUT)
    except asyncio.TimeoutError:
        raise ApiError(ApiKind.CREDENTIALS,
                       f"{what}: no credential within {EXEC_TIMEOUT:g}s") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            # wait() also waits for stdout to close; a child that left the session may
            # hold it, and is not worth waiting for.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 1.0)
    if output is None:
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: printed more than {MAX_EXEC_OUTPUT} bytes")
    if process.returncode != 0:
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: exited with status {process.returncode}")
    return _credential(output, plugin, what)


async def _read_limited(process: asyncio.subprocess.Process) -> bytes | None:
    assert process.stdout is not None
    data = bytearray()
    while chunk := await process.stdout.read(MAX_EXEC_OUTPUT):
        data += chunk
        if len(data) > MAX_EXEC_OUTPUT:
            return None
    await process.wait()
    return bytes(data)


def _credential(output: bytes, plugin: Exec, what: str) -> _Credential:
    """The credential in an ExecCredential; errors never quote the output (it holds it)."""
    try:
        document = json.loads(output)
    except ValueError:
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: did not print an ExecCredential") from None
    if not (isinstance(document, dict) and document.get("kind") == "ExecCredential"
            and document.get("apiVersion") == plugin.api_version
            and isinstance(document.get("status"), dict)):
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: did not print an ExecCredential "
                                            f"{plugin.api_version} with a status")
    status = document["status"]
    token = status.get("token") or ""
    cert = status.get("clientCertificateData") or ""
    key = status.get("clientKeyData") or ""
    if not all(isinstance(value, str) for value in (token, cert, key)) or (
            not token and not (cert and key)):
        raise ApiError(ApiKind.CREDENTIALS, f"{what}: the ExecCredential holds neither a token "
                                            "nor a client certificate and key")
    expires = None
    stamp = status.get("expirationTimestamp")
    if stamp:
        try:
            expires = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ApiError(ApiKind.CREDENTIALS,
                           f"{what}: expirationTimestamp is not an RFC 3339 time") from None
    return _Credential(token, cert.encode(), key.encode(), expires)
