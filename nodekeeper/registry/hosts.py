"""Where containerd would send a registry request, read from its hosts directories.

containerd's CRI `config_path` is a list of roots (`/etc/containerd/certs.d:/etc/docker/
certs.d` from 2.2 on), searched in order. In each root the first directory that exists of
`<host>_<port>_`, `<host>` (port included, as in the image name) and `_default` is the
one used, and the first root that has one wins. In it, `hosts.toml` lists mirrors as
`[host."https://mirror"]` entries, tried in order, then `server`. A directory without a
hosts.toml means the registry itself, with the directory's `*.crt` files as CAs and
`*.cert`/`*.key` pairs as client certificates. Without any directory the registry
itself is used: docker.io means https://registry-1.docker.io, and loopback registries are
plain HTTP.

Files are read once per change (modification time, size, inode). A broken file is a
failure of kind `invalid` for the registries it configures, logged once per change.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from nodekeeper import logs
from nodekeeper.addresses import is_loopback
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.values import Endpoint

DOCKER_HUB_SERVER = "https://registry-1.docker.io"
# hosts.toml files are a few hundred bytes; anything far larger is not one.
MAX_HOSTS_TOML_BYTES = 256 * 1024

_log = logs.get("hosts")


def default_server(domain: str) -> str:
    if domain == "docker.io":
        return DOCKER_HUB_SERVER
    return f"https://{domain}"


def default_host(domain: str) -> str:
    return urlsplit(default_server(domain)).netloc


def default_endpoints(domain: str) -> list[Endpoint]:
    """Where containerd goes for `domain` when no hosts directory says otherwise."""
    if not is_loopback(domain):
        return [_endpoint(default_server(domain), {}, "", Path("."))]
    return [_tls_first(_endpoint(f"https://{domain}", {"skip_verify": True}, "", Path("."))),
            _endpoint(f"http://{domain}", {}, "", Path("."))]


def _tls_first(endpoint: Endpoint) -> Endpoint:
    return dataclasses.replace(endpoint, http_fallback=True)


Signature = tuple[int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class Hosts:
    """containerd's hosts directories, each file read once per change."""

    def __init__(self, roots: Sequence[str | Path]) -> None:
        self.roots = tuple(Path(root) for root in roots)
        self._read: dict[tuple[Path, str], tuple[Signature | None, list[Endpoint] | Failure]] = {}

    def directory(self, domain: str) -> Path | None:
        """The hosts directory containerd would use for `domain`, if any."""
        names = [domain]
        host, colon, port = domain.rpartition(":")
        if colon and port.isdigit():
            names.insert(0, f"{host}_{port}_")
        for root in self.roots:
            for name in (*names, "_default"):
                candidate = root / name
                if candidate.is_dir():
                    return candidate
        return None

    def endpoints(self, domain: str) -> list[Endpoint]:
        """The endpoints to resolve `domain`'s tags against, in containerd's order.
        Raises Failure(invalid) naming the file when it is broken."""
        directory = self.directory(domain)
        if directory is None:
            return default_endpoints(domain)
        path = directory / "hosts.toml"
        # Without a hosts.toml, the directory's listing (its certificates) is what counts.
        signature = _signature(path) or _signature(directory)
        cached = self._read.get((directory, domain))
        if cached is None or cached[0] != signature:
            try:
                found: list[Endpoint] | Failure = _parse(directory, path, domain)
            except Failure as failure:
                found = failure
                _log.error("hosts.toml is broken; its registries fail as invalid until it is "
                           "fixed", path=str(path), registry=domain, error=failure.detail)
            cached = (signature, found)
            self._read[(directory, domain)] = cached
        if isinstance(cached[1], Failure):
            raise cached[1]
        return cached[1]


def _parse(directory: Path, path: Path, domain: str) -> list[Endpoint]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_HOSTS_TOML_BYTES + 1)
    except FileNotFoundError:
        return [_endpoint(default_server(domain), _cert_files(directory), "", directory)]
    except OSError as exc:
        raise Failure(Kind.INVALID, f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_HOSTS_TOML_BYTES:
        raise Failure(Kind.INVALID, f"{path}: larger than {MAX_HOSTS_TOML_BYTES} bytes")
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Failure(Kind.INVALID, f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise Failure(Kind.INVALID, f"{path}: not valid TOML: {exc}") from None
    hosts = document.get("host", {})
    if not isinstance(hosts, dict):
        raise Failure(Kind.INVALID, f"{path}: host: expected a table of hosts")
    found = []
    for url, settings in hosts.items():
        if not isinstance(settings, dict):
            raise Failure(Kind.INVALID, f"{path}: host.{url!r}: expected a table")
        found.append(_endpoint(url, settings, domain, directory))
    server = document.get("server")
    if not server and is_loopback(domain):
        # No server named: the registry itself, over HTTPS then HTTP, as without a file.
        found.append(_tls_first(_endpoint(f"https://{domain}",
                                          {**document, "skip_verify": True}, "", directory)))
        server = f"http://{domain}"
    if not isinstance(server or "", str):
        raise Failure(Kind.INVALID, f"{path}: server: expected a URL")
    found.append(_endpoint(server or default_server(domain), document, "", directory))
    return [endpoint for endpoint in found if "resolve" in endpoint.capabilities]


def _cert_files(directory: Path) -> dict[str, Any]:
    """containerd's reading of a directory without hosts.toml (docker's certs.d layout)."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
    except OSError:
        return {}
    cas = [name for name in names if name.endswith(".crt")]
    clients = [[name, name[:-len(".cert")] + ".key"] for name in names
               if name.endswith(".cert") and name[:-len(".cert")] + ".key" in names]
    return {"ca": cas, "client": clients}


def _endpoint(url: str, settings: dict[str, Any], namespace: str, directory: Path) -> Endpoint:
    where = directory / "hosts.toml"
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Failure(Kind.INVALID, f"{where}: {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if not settings.get("override_path"):
        path += "/v2"
    base = f"{parts.scheme}://{parts.netloc}{path}"
    capabilities = settings.get("capabilities", ["pull", "resolve"] if namespace else
                                ["pull", "resolve", "push"])
    headers = settings.get("header", {})
    if (not isinstance(capabilities, list) or not isinstance(headers, dict)
            or not all(isinstance(c, str) for c in capabilities)):
        raise Failure(Kind.INVALID, f"{where}: {url}: capabilities must be a list of "
                                    "strings and header a table")
    return Endpoint(
        base=base,
        host=parts.netloc,
        ca=tuple(_path(directory, c, where) for c in _strings(settings.get("ca", ()), where)),
        skip_verify=bool(settings.get("skip_verify", False)),
        headers=tuple((str(k), str(v[0] if isinstance(v, list) and v else v))
                      for k, v in headers.items()),
        namespace=namespace,
        capabilities=frozenset(capabilities),
        client=_clients(settings.get("client", ()), directory, where),
    )


def _strings(value: object, where: Path) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise Failure(Kind.INVALID, f"{where}: expected a path or a list of paths, got "
                                f"{type(value).__name__}")


def _clients(value: object, directory: Path, where: Path) -> tuple[tuple[str, str], ...]:
    """`client = "both.pem"`, `["cert", "key"]`, or `[["cert", "key"], ...]`."""
    if isinstance(value, str):
        return ((_path(directory, value, where), ""),)
    if isinstance(value, list | tuple) and len(value) == 2 and all(
            isinstance(v, str) for v in value):
        value = [value]
    pairs = []
    for pair in value if isinstance(value, list | tuple) else [value]:
        if not (isinstance(pair, list | tuple) and 1 <= len(pair) <= 2
                and all(isinstance(v, str) for v in pair)):
            raise Failure(Kind.INVALID, f"{where}: client: expected a certificate path or "
                                        "[certificate, key] pairs")
        pairs.append((_path(directory, pair[0], where),
                      _path(directory, pair[1], where) if len(pair) == 2 else ""))
    return tuple(pairs)


def _path(directory: Path, name: str, where: Path) -> str:
    if not name:
        raise Failure(Kind.INVALID, f"{where}: an empty path")
    return name if name.startswith("/") else str(directory / name)
