"""A real CNCF distribution registry (``docker-registry serve``) on a free loopback port."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import bcrypt
import httpx

from tests.harness._proc import ManagedProcess, Service, wait_for_count

if TYPE_CHECKING:
    from tests.harness.tokenauth import TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"

# User-Agent prefix of the harness's own traffic (readiness probes, pushes, deletes);
# ``Registry.requests()`` leaves such requests out unless asked not to.
HARNESS_USER_AGENT = "nodekeeper-harness"
_PROBE_USER_AGENT = f"{HARNESS_USER_AGENT}-probe"

# distribution writes one Apache "combined" line per request to stdout (gorilla/handlers),
# for every request including 401 challenges, next to its JSON (logrus) lines on stderr:
#   127.0.0.1 - - [25/Nov/2026:19:22:24 +0000] "HEAD /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


class RegistryError(RuntimeError):
    """The registry did not start; the message carries its log tail."""


@dataclass(frozen=True)
class RegistryRequest:
    """One request as the registry's access log recorded it."""

    method: str
    uri: str
    status: int
    user_agent: str
    size: int = 0  # bytes of the answer's body

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """An htpasswd file with bcrypt hashes (the only kind distribution accepts)."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{user}:{hashed}\n")
    path.write_text("".join(lines))


def make_tls_files(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1",)) -> TlsFiles:
    """A throwaway CA and a server certificate for ``hosts`` (IPs or DNS names), via openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    sans = ",".join(
        f"IP:{h}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", h) else f"DNS:{h}" for h in hosts
    )
    ext.write_text(
        f"subjectAltName={sans}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert),
         "-days", "2", "-subj", "/CN=nodekeeper test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr),
         "-subj", f"/CN={hosts[0]}"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ]  # fmt: skip
    for argv in commands:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
    return TlsFiles(ca_cert=ca_cert, cert=cert, key=key)


def _q(value: str | Path) -> str:
    # A JSON string is a valid YAML flow scalar.
    return json.dumps(str(value))


class Registry(Service):
    """One registry private to a test: filesystem storage, deletes enabled, own log.

    The port is chosen once, so ``stop()`` then ``start()`` (or ``restart()``) brings the same
    registry, with the same content, back at the same address.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        htpasswd: dict[str, str] | None = None,
        tls: bool = False,
        port: int | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        binary: str = REGISTRY_BIN,
        token_auth: TokenServer | None = None,
    ) -> None:
        if htpasswd is not None and token_auth is not None:
            raise ValueError("a registry takes htpasswd or token_auth, not both")
        self.token_auth = token_auth
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.base_dir / "storage"
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self.htpasswd_path = self.base_dir / "htpasswd" if htpasswd is not None else None
        self.users = dict(htpasswd) if htpasswd is not None else None
        self.port = port if port is not None else free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = make_tls_files(self.base_dir / "tls") if tls else None
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._log_offset = 0
        self._proc = ManagedProcess(
            [binary, "serve", str(self.config_path)], self.log_path, cwd=self.base_dir
        )

    # -- configuration -------------------------------------------------------------------

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the server certificate (TLS registries only)."""
        return None if self.tls is None else self.tls.ca_cert

    @property
    def auth(self) -> tuple[str, str] | None:
        """The first htpasswd user as (username, password), for pushes."""
        if not self.users:
            return None
        return next(iter(self.users.items()))

    def render_config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: json",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {_q(self.storage_dir)}",
            "  delete:",
            "    enabled: true",
            "  cache:",
            "    blobdescriptor: inmemory",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {_q(self.host)}",
            '  secret: "nodekeeper-harness-secret"',
        ]
        if self.tls is not None:
            lines += [
                "  tls:",
                f"    certificate: {_q(self.tls.cert)}",
                f"    key: {_q(self.tls.key)}",
            ]
        if self.htpasswd_path is not None:
            lines += [
                "auth:",
                "  htpasswd:",
                '    realm: "nodekeeper-test"',
                f"    path: {_q(self.htpasswd_path)}",
            ]
        if self.token_auth is not None:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {_q(self.token_auth.realm)}",
                f"    service: {_q(self.token_auth.service)}",
                f"    issuer: {_q(self.token_auth.issuer)}",
                f"    rootcertbundle: {_q(self.token_auth.cert_path)}",
            ]
        return "\n".join(lines) + "\n"

    def verify(self) -> ssl.SSLContext | bool:
        """What to pass as httpx's ``verify`` for this registry."""
        if self.tls is None:
            return True
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.htpasswd_path is not None and self.users is not None:
            write_htpasswd(self.htpasswd_path, self.users)
        self.config_path.write_text(self.render_config())
        self._proc.start()
        try:
            self._wait_ready()
        except BaseException:
            self._proc.stop(self.stop_timeout)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer"
        headers = {"User-Agent": _PROBE_USER_AGENT}
        with httpx.Client(verify=self.verify(), timeout=1.0, headers=headers) as client:
            while True:
                code = self._proc.returncode
                if code is not None:
                    raise RegistryError(
                        f"registry exited with status {code} during start;"
                        f" log tail:\n{self._proc.tail()}"
                    )
                try:
                    resp = client.get(f"{self.url}/v2/")
                    if resp.status_code in (200, 401):
                        return
                    last_error = f"GET /v2/ answered {resp.status_code}"
                except httpx.HTTPError as e:
                    last_error = repr(e)
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"registry not ready after {self.start_timeout}s ({last_error});"
                        f" log tail:\n{self._proc.tail()}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout``; returns once the process is gone."""
        self._proc.stop(self.stop_timeout)

    def kill(self) -> None:
        self._proc.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung registry)."""
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    close = stop

    def log_tail(self, max_bytes: int = 6000) -> str:
        return self._proc.tail(max_bytes)


    # -- observation and tampering -------------------------------------------------------

    def clear_requests(self) -> None:
        """Forget requests logged so far: ``requests()`` then counts only later ones."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0

    def requests(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        include_harness: bool = False,
    ) -> list[RegistryRequest]:
        """Requests from the access log (since ``clear_requests()``), oldest first.

        The harness's own traffic (probes, pushes) is left out unless ``include_harness``.
        Note that with htpasswd auth every challenged request appears twice (401, then the
        retry): filter on ``status`` to count logical requests.
        The line is written as the response completes; a caller that just got its answer
        may poll briefly (see ``wait_for_requests``).
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            return []
        found = []
        for raw in data.decode("utf-8", errors="replace").splitlines():
            m = _ACCESS_LINE.match(raw)
            if m is None:
                continue
            req = RegistryRequest(
                method=m["method"],
                uri=m["uri"],
                status=int(m["status"]),
                user_agent=m["agent"],
                size=0 if m["size"] == "-" else int(m["size"]),
            )
            if not include_harness and req.user_agent.startswith(HARNESS_USER_AGENT):
                continue
            if method is not None and req.method != method.upper():
                continue
            if path_contains is not None and path_contains not in req.path:
                continue
            if status is not None and req.status != status:
                continue
            found.append(req)
        return found

    def wait_for_requests(
        self,
        count: int,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        timeout: float = 5.0,
    ) -> list[RegistryRequest]:
        """Poll until at least ``count`` matching requests are logged; return them all."""
        return wait_for_count(
            lambda: self.requests(method, path_contains, status=status), count, timeout)

    def remove_tag(self, repo: str, tag: str) -> None:
        """Delete one tag in storage, leaving its manifest and other tags (the HTTP API of
        distribution 2.8 can only delete a manifest, with every tag pointing at it)."""
        tag_dir = self.storage_dir / "docker/registry/v2/repositories" / repo / "_manifests/tags"
        shutil.rmtree(tag_dir / tag)
