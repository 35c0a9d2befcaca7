"""A real kube-apiserver over a real etcd, on loopback, with a node identity.

Identities (tokens.csv, and a client certificate the API server's client CA signed):

  admin      group system:masters, to set the cluster up and read back what was posted
  node       system:node:<node_name> in group system:nodes, as the kubelet authenticates
  stranger   an authenticated user nobody granted anything: the API server answers 403

Authorization is `Node,RBAC` with the NodeRestriction admission plugin, as in a kubeadm
cluster. No controller-manager runs, so `start()` creates the ServiceAccount
default/default that creating a Pod needs.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness._proc import ManagedProcess, Service
from tests.harness.nodebins import binary as node_binary
from tests.harness.registry import TlsFiles, free_port, make_tls_files

ETCD_BIN = "/usr/bin/etcd"
APISERVER = "kube-apiserver-1.36.2/kube-apiserver"
NODE_NAME = "node-a"


class ApiServerError(RuntimeError):
    """etcd or the API server did not start; the message carries the log tail."""


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")


def make_client_cert(tls: TlsFiles, directory: Path, name: str, groups: tuple[str, ...],
                     ) -> ClientCert:
    """A client certificate for user `name` in `groups` (CN and O), signed by tls's CA."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = name.replace(":", "_")
    key, csr, cert = (directory / f"{stem}.key", directory / f"{stem}.csr",
                      directory / f"{stem}.pem")
    ext = directory / f"{stem}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")
    subject = "".join(f"/O={group}" for group in groups) + f"/CN={name}"
    _run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject])
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(tls.ca_cert),
          "-CAkey", str(tls.ca_cert.parent / "ca.key"), "-CAcreateserial", "-out", str(cert),
          "-days", "2", "-extfile", str(ext)])
    return ClientCert(cert, key)


class ApiServer(Service):
    """etcd and kube-apiserver private to a test, both under `base_dir`."""

    def __init__(self, base_dir: Path, *, node_name: str = NODE_NAME,
                 start_timeout: float = 60.0) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_hex(16)
        self.node_token = secrets.token_hex(16)
        self.stranger_token = secrets.token_hex(16)
        self._etcd_port, self._peer_port = free_port(), free_port()
        self.tls = make_tls_files(self.base_dir / "pki")
        self.node_cert = make_client_cert(self.tls, self.base_dir / "pki",
                                          f"system:node:{node_name}", ("system:nodes",))
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None

    @property
    def ca_cert(self) -> Path:
        return self.tls.ca_cert

    # -- lifecycle -----------------------------------------------------------------------

    def _write_inputs(self) -> Path:
        pki = self.base_dir / "pki"
        tokens = self.base_dir / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n'
            f'{self.node_token},system:node:{self.node_name},node-uid,"system:nodes"\n'
            f"{self.stranger_token},stranger,stranger-uid\n")
        tokens.chmod(0o600)
        sa_key = pki / "sa.key"
        if not sa_key.exists():
            _run(["openssl", "genrsa", "-out", str(sa_key), "2048"])
        return sa_key

    def start(self) -> None:
        binary = node_binary(APISERVER)
        sa_key = self._write_inputs()
        etcd_url = f"http://127.0.0.1:{self._etcd_port}"
        peer_url = f"http://127.0.0.1:{self._peer_port}"
        self._etcd = ManagedProcess(
            [ETCD_BIN, "--name", "harness", "--data-dir", str(self.base_dir / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"harness={peer_url}"],
            self.base_dir / "etcd.log")
        self._etcd.start()
        # Its own lifecycle Events go to kube-system, out of the tests' namespaces; env
        # execs the server, so the PID stays the one the harness stops.
        self._apiserver = ManagedProcess(
            ["/usr/bin/env", "POD_NAMESPACE=kube-system", "POD_NAME=kube-apiserver",
             str(binary),
             "--etcd-servers", etcd_url,
             "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
             "--secure-port", str(self.port),
             "--tls-cert-file", str(self.tls.cert), "--tls-private-key-file", str(self.tls.key),
             "--client-ca-file", str(self.tls.ca_cert),
             "--token-auth-file", str(self.base_dir / "tokens.csv"),
             "--authorization-mode", "Node,RBAC",
             "--enable-admission-plugins", "NodeRestriction",
             "--service-account-key-file", str(sa_key),
             "--service-account-signing-key-file", str(sa_key),
             "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
             "--service-cluster-ip-range", "10.0.0.0/24",
             "--endpoint-reconciler-type", "none",
             "--cert-dir", str(self.base_dir / "serving")],
            self.base_dir / "apiserver.log")
        self._apiserver.start()
        self._wait_ready()
        self.create("/api/v1/namespaces/default/serviceaccounts",
                    {"metadata": {"name": "default"}}, exist_ok=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        with self.client(self.admin_token) as client:
            while time.monotonic() < deadline:
                for part, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
                    if proc is None or not proc.running:
                        raise ApiServerError(
                            f"{part} exited ({None if proc is None else proc.returncode}):\n"
                            f"{'' if proc is None else proc.tail()}")
                try:
                    answer = client.get("/readyz")
                    if answer.status_code == 200:
                        return
                    last = f"/readyz {answer.status_code}: {answer.text[-500:]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        assert self._apiserver is not None
        raise ApiServerError(f"kube-apiserver not ready after {self.start_timeout}s ({last}):\n"
                             f"{self._apiserver.tail()}")

    def close(self) -> None:
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                proc.stop()

    # -- clients and objects ---------------------------------------------------------------

    def client(self, token: str, *, timeout: float = 10.0) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.ca_cert))
        return httpx.Client(base_url=self.url, verify=verify, timeout=timeout,
                            headers={"Authorization": f"Bearer {token}"})

    def create(self, path: str, body: dict[str, Any], *, exist_ok: bool = False,
               ) -> dict[str, Any]:
        with self.client(self.admin_token) as client:
            answer = client.post(path, json=body)
        if answer.status_code == 409 and exist_ok:
            return {}
        if answer.status_code >= 300:
            raise ApiServerError(f"POST {path}: {answer.status_code} {answer.text}")
        created: dict[str, Any] = answer.json()
        return created

    def create_pod(self, namespace: str, name: str, *, node: str | None = None,
                   ) -> dict[str, Any]:
        """A Pod bound to `node` (the harness's node by default), as the scheduler leaves it."""
        if namespace != "default":
            self.create("/api/v1/namespaces", {"metadata": {"name": namespace}}, exist_ok=True)
            self.create(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                        {"metadata": {"name": "default"}}, exist_ok=True)
        return self.create(f"/api/v1/namespaces/{namespace}/pods", {
            "metadata": {"name": name},
            "spec": {"nodeName": node or self.node_name,
                     "containers": [{"name": "app", "image": "postgres:15"}]},
        })

    def events(self, namespace: str, **selector: str) -> list[dict[str, Any]]:
        """core/v1 Events in `namespace` matching a field selector (key=value pairs;
        dots in keys written as double underscores: involvedObject__uid=...)."""
        fields = ",".join(f"{key.replace('__', '.')}={value}" for key, value in selector.items())
        with self.client(self.admin_token) as client:
            answer = client.get(f"/api/v1/namespaces/{namespace}/events",
                                params={"fieldSelector": fields} if fields else None)
        if answer.status_code != 200:
            raise ApiServerError(f"listing events: {answer.status_code} {answer.text}")
        items: list[dict[str, Any]] = answer.json()["items"]
        return items

    def write_kubeconfig(self, path: Path, *, user: dict[str, Any] | None = None,
                         server: str | None = None) -> Path:
        """A kubeconfig for the node identity (its client certificate unless `user` is
        given), pointing at this API server or at `server` (a proxy in front of it)."""
        document = {
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "harness", "cluster": {
                "server": server or self.url, "certificate-authority": str(self.ca_cert)}}],
            "users": [{"name": "node", "user": user or {
                "client-certificate": str(self.node_cert.cert),
                "client-key": str(self.node_cert.key)}}],
            "contexts": [{"name": "node", "context": {"cluster": "harness", "user": "node"}}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document))
        path.chmod(0o600)
        return path


def dump(items: list[dict[str, Any]]) -> str:
    """Events as one string, for assertions that something appears nowhere in them."""
    return json.dumps(items, sort_keys=True)
