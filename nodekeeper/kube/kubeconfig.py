"""A kubeconfig read as client-go reads it, for the one context nodekeeper uses.

Supported: the current context's cluster (`server`, `certificate-authority[-data]`,
`insecure-skip-tls-verify`, `tls-server-name`) and user (`client-certificate[-data]`,
`client-key[-data]`, `token`, `tokenFile`, `exec`). Relative paths are relative to the
kubeconfig's directory; `-data` wins over the file, `tokenFile` over `token`, as in
client-go. Refused with a clear error: `auth-provider` (removed from client-go in 1.26),
basic auth (removed from the API server in 1.19), impersonation, `proxy-url`, and an
exec plugin that insists on a terminal (`interactiveMode: Always`).

`load()` reads every file the kubeconfig names, so an unreadable file is found at load;
`Kubeconfig.changed()` tells when any of them (or the kubeconfig) changed since, which is
how a client notices the kubelet's certificate rotation. Errors name the file, the line
and the key, never the value: tokens and keys must not reach a log line, even malformed.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nodekeeper.addresses import is_loopback

# KubeconfigError is defined with every other exception; callers find it here too.
from nodekeeper.errors import KubeconfigError as KubeconfigError
from nodekeeper.errors import SettingsError
from nodekeeper.settings import Document, Key

DEFAULT_PATH = "/etc/kubernetes/kubelet.conf"
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
# Nothing legitimate in a kubeconfig, or a file it names, comes near this.
MAX_FILE_BYTES = 1 << 20
_UNSUPPORTED_USER = {
    "auth-provider": "auth-provider plugins are not supported (removed from client-go in "
                     "1.26); use an exec plugin",
    "username": "basic authentication is not supported (removed from the API server in 1.19)",
    "password": "basic authentication is not supported (removed from the API server in 1.19)",
    "as": "impersonation is not supported",
    "as-groups": "impersonation is not supported",
    "as-uid": "impersonation is not supported",
    "as-user-extra": "impersonation is not supported",
}


@dataclass(frozen=True)
class Exec:
    """An exec credential plugin: a command that prints an ExecCredential."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = EXEC_API_VERSIONS[0]
    provide_cluster_info: bool = False


@dataclass(frozen=True)
class Kubeconfig:
    path: str
    server: str
    ca_pem: bytes = b""
    insecure: bool = False
    tls_server_name: str = ""
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)
    token: str = field(default="", repr=False)
    exec: Exec | None = None
    # Every file read, with what it looked like, to notice replacement and rotation.
    sources: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def changed(self) -> bool:
        return any(_signature(path) != seen for path, seen in self.sources)


def _signature(path: str) -> tuple[int, int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return info.st_mtime_ns, info.st_size, info.st_ino


class _Reader:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.base = Path(doc.path).parent
        self.sources: dict[str, tuple[int, int, int]] = {doc.path: _signature(doc.path)}

    def error(self, key: Key, message: str) -> KubeconfigError:
        return KubeconfigError(str(self.doc.error(key, message)))

    def mapping(self, value: Any, key: Key) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, "expected a mapping")
        return value

    def string(self, values: dict[str, Any], name: str, key: Key) -> str:
        value = values.get(name, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error((*key, name), "expected a string")
        return value

    def boolean(self, values: dict[str, Any], name: str, key: Key) -> bool:
        value = values.get(name, False)
        if not isinstance(value, bool):
            raise self.error((*key, name), "expected true or false")
        return value

    def named(self, kind: str, name: str) -> tuple[dict[str, Any], Key]:
        """The `kind` entry (cluster, user or context) called `name`."""
        listing = self.doc.value.get(f"{kind}s")
        if not isinstance(listing, list):
            raise self.error((f"{kind}s",), f"expected a list of {kind}s")
        for index, entry in enumerate(listing):
            if isinstance(entry, dict) and entry.get("name") == name:
                key: Key = (f"{kind}s", index, kind)
                return self.mapping(entry.get(kind), key), key
        raise self.error((f"{kind}s",), f"no {kind} named {name!r}")

    def read(self, path: str, key: Key) -> bytes:
        resolved = str(self.base / os.path.expanduser(path))
        try:
            with open(resolved, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise self.error(key, f"cannot read {resolved}: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise self.error(key, f"{resolved} is larger than {MAX_FILE_BYTES} bytes")
        self.sources[resolved] = _signature(resolved)
        return data

    def material(self, values: dict[str, Any], name: str, key: Key) -> bytes:
        """`<name>-data` (base64) if given, else the file `<name>` names, else b''."""
        data = self.string(values, f"{name}-data", key)
        if data:
            try:
                # Line breaks are allowed, as Go's decoder skips them.
                return base64.b64decode("".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                raise self.error((*key, f"{name}-data"), "not valid base64") from None
        path = self.string(values, name, key)
        return self.read(path, (*key, name)) if path else b""


def load(path: str) -> Kubeconfig:
    """Read the kubeconfig at `path` and every file it names, for its current context."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KubeconfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise KubeconfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KubeconfigError(f"{path}: not UTF-8 text") from None
    try:
        doc = Document(path, text)
    except SettingsError as exc:
        raise KubeconfigError(str(exc)) from None
    if not isinstance(doc.value, dict):
        raise KubeconfigError(f"{path}: expected a kubeconfig (a mapping)")
    return _parse(_Reader(doc))


def _parse(reader: _Reader) -> Kubeconfig:
    top = reader.doc.value
    current = reader.string(top, "current-context", ())
    if not current:
        raise reader.error(("current-context",), "no current-context is set")
    context, context_key = reader.named("context", current)
    cluster_name = reader.string(context, "cluster", context_key)
    user_name = reader.string(context, "user", context_key)
    if not cluster_name:
        raise reader.error((*context_key, "cluster"), "the current context names no cluster")
    cluster, cluster_key = reader.named("cluster", cluster_name)
    user: dict[str, Any] = {}
    user_key: Key = ()
    if user_name:
        user, user_key = reader.named("user", user_name)

    server = reader.string(cluster, "server", cluster_key).rstrip("/")
    parts = urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise reader.error((*cluster_key, "server"), "expected https://host[:port]")
    if parts.scheme == "http" and not is_loopback(parts.netloc):
        raise reader.error((*cluster_key, "server"),
                           "plain http is accepted only for a loopback API server")
    if cluster.get("proxy-url"):
        raise reader.error((*cluster_key, "proxy-url"), "proxy-url is not supported")

    for name, why in _UNSUPPORTED_USER.items():
        if user.get(name):
            raise reader.error((*user_key, name), why)
    token_file = reader.string(user, "tokenFile", user_key)
    token = (reader.read(token_file, (*user_key, "tokenFile")).decode("utf-8", "replace")
             if token_file else reader.string(user, "token", user_key)).strip()
    cert = reader.material(user, "client-certificate", user_key)
    key = reader.material(user, "client-key", user_key)
    if bool(cert) != bool(key):
        raise reader.error(user_key, "client-certificate and client-key go together; "
                                     "only one of them is given")
    plugin = _exec(reader, user.get("exec"), (*user_key, "exec"))
    if plugin is not None and (token or cert):
        raise reader.error((*user_key, "exec"),
                           "exec cannot be combined with a token or a client certificate here")
    return Kubeconfig(
        path=reader.doc.path,
        server=server,
        ca_pem=reader.material(cluster, "certificate-authority", cluster_key),
        insecure=reader.boolean(cluster, "insecure-skip-tls-verify", cluster_key),
        tls_server_name=reader.string(cluster, "tls-server-name", cluster_key),
        cert_pem=cert,
        key_pem=key,
        token=token,
        exec=plugin,
        sources=tuple(reader.sources.items()),
    )


def _exec(reader: _Reader, value: Any, key: Key) -> Exec | None:
    if value is None:
        return None
    values = reader.mapping(value, key)
    api_version = reader.string(values, "apiVersion", key)
    if api_version not in EXEC_API_VERSIONS:
        raise reader.error((*key, "apiVersion"), f"expected one of {', '.join(EXEC_API_VERSIONS)}")
    command = reader.string(values, "command", key)
    if not command:
        raise reader.error((*key, "command"), "an exec plugin needs a command")
    if reader.string(values, "interactiveMode", key) == "Always":
        raise reader.error((*key, "interactiveMode"),
                           "a plugin that needs a terminal cannot run in a daemon")
    # client-go runs a command given with a directory relative to the kubeconfig.
    if os.sep in command and not os.path.isabs(command):
        command = str(reader.base / command)
    args = values.get("args") or []
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise reader.error((*key, "args"), "expected a list of strings")
    env: list[tuple[str, str]] = []
    for index, entry in enumerate(values.get("env") or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("value"), str)):
            raise reader.error((*key, "env", index), "expected name: and value: strings")
        env.append((entry["name"], entry["value"]))
    return Exec(command=command, args=tuple(args), env=tuple(env), api_version=api_version,
                provide_cluster_info=reader.boolean(values, "provideClusterInfo", key))
