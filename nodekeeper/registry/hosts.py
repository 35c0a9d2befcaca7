"""Where containerd would send a registry request, read from its hosts directory.

`<hosts_dir>/<host>/hosts.toml` (containerd's CRI registry config_path) lists mirrors as
`[host."https://mirror"]` entries, tried in order, then `server`. Without a file the
registry itself is used: docker.io means https://registry-1.docker.io, and loopback
registries are plain HTTP.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from nodekeeper.addresses import is_loopback
from nodekeeper.errors import SettingsError

DOCKER_HUB_SERVER = "https://registry-1.docker.io"


@dataclass(frozen=True)
class Endpoint:
    """One place to ask: `base` is the API root (…/v2)."""

    base: str
    host: str
    ca: tuple[str, ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    # Mirrors are told which registry is meant, as containerd does (?ns=docker.io).
    namespace: str = ""
    capabilities: frozenset[str] = field(default=frozenset({"pull", "resolve", "push"}))


def _default_server(domain: str) -> str:
    if domain == "docker.io":
        return DOCKER_HUB_SERVER
    return f"{'http' if is_loopback(domain) else 'https'}://{domain}"


def endpoints(hosts_dir: str | Path, domain: str) -> list[Endpoint]:
    """The endpoints to resolve `domain`'s tags against, in the order containerd uses."""
    # containerd names the directory after the host as written, port included.
    path = Path(hosts_dir) / domain / "hosts.toml"
    if not path.is_file():
        path = Path(hosts_dir) / "_default" / "hosts.toml"
    if not path.is_file():
        return [_endpoint(_default_server(domain), {}, "", path.parent)]
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from None
    found = []
    hosts = document.get("host", {})
    if not isinstance(hosts, dict):
        raise SettingsError(f"{path}: host: expected a table of hosts")
    for url, settings in hosts.items():
        if not isinstance(settings, dict):
            raise SettingsError(f"{path}: host.{url!r}: expected a table")
        found.append(_endpoint(url, settings, domain, path.parent))
    server = document.get("server") or _default_server(domain)
    if not isinstance(server, str):
        raise SettingsError(f"{path}: server: expected a URL")
    found.append(_endpoint(server, document, "", path.parent))
    return [endpoint for endpoint in found if "resolve" in endpoint.capabilities]


def _endpoint(url: str, settings: dict[str, Any], namespace: str, directory: Path) -> Endpoint:
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(f"{directory}/hosts.toml: {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if not settings.get("override_path"):
        path += "/v2"
    base = f"{parts.scheme}://{parts.netloc}{path}"
    ca = settings.get("ca", ())
    cas = (ca,) if isinstance(ca, str) else tuple(ca)
    capabilities = settings.get("capabilities", ["pull", "resolve"] if namespace else
                                ["pull", "resolve", "push"])
    headers = settings.get("header", {})
    return Endpoint(
        base=base,
        host=parts.netloc,
        ca=tuple(str(directory / c) if not c.startswith("/") else c for c in cas),
        skip_verify=bool(settings.get("skip_verify", False)),
        headers=tuple((str(k), str(v[0] if isinstance(v, list) else v))
                      for k, v in headers.items()),
        namespace=namespace,
        capabilities=frozenset(capabilities),
    )
