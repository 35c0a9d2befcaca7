"""`nodekeeper doctor`: finds in seconds what would cost an operator an hour.

One line per check, OK or FAIL, a FAIL saying what to do; exit status 1 on any FAIL. It
changes nothing: the state directory is probed with a file removed at once, and the
Kubernetes checks ask the API server what the identity is and may do (SelfSubjectReview,
SelfSubjectAccessReview) without posting an Event.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nodekeeper import config as configuration
from nodekeeper.containerd.client import Containerd
from nodekeeper.errors import ApiError, ApiKind, KubeconfigError, NodekeeperError, SettingsError
from nodekeeper.failures import Failure
from nodekeeper.kube import kubeconfig
from nodekeeper.kube.client import Client
from nodekeeper.pull import policy
from nodekeeper.registry import hosts

CONTAINERD_TIMEOUT = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix and not self.ok else text


def run(config_path: str | None, namespace: str) -> list[Check]:
    try:
        config = configuration.load(config_path)
    except SettingsError as exc:
        return [Check("config", False, str(exc), "correct the file; the daemon refuses to "
                                                 "start with it")]
    checks = [Check("config", True, config.source or
                    f"no {configuration.DEFAULT_PATH}, the defaults apply")]
    checks.append(_policy(config))
    checks.append(_containerd(config))
    checks.append(_state_dir(config.state_dir))
    checks.append(_hosts_dir(config.containerd.hosts_dir))
    checks.extend(asyncio.run(_kubernetes(config.kubernetes, namespace)))
    return checks


def main(config_path: str | None, namespace: str) -> int:
    checks = run(config_path, namespace)
    for check in checks:
        print(check.line())
    return 0 if all(check.ok for check in checks) else 1


def _policy(config: configuration.Config) -> Check:
    try:
        loaded = policy.load(config.policy_file)
    except SettingsError as exc:
        return Check("policy", False, str(exc),
                     f"correct {config.policy_file}; nodekeeper check-policy shows the same")
    return Check("policy", True, f"{config.policy_file}, {len(loaded.rules)} rules")


def _containerd(config: configuration.Config) -> Check:
    address = config.containerd.address
    fix = "start containerd, or set containerd.address to its socket"
    if not os.path.exists(address):
        return Check("containerd", False, f"no socket at {address}", fix)

    async def ask() -> None:
        containerd = Containerd(address, config.containerd.namespace)
        try:
            await containerd.cri("ImageFsInfo", b"", timeout=CONTAINERD_TIMEOUT)
        finally:
            await containerd.close()

    try:
        asyncio.run(ask())
    except NodekeeperError as exc:
        return Check("containerd", False, f"{address}: {exc}",
                     f"{fix}; its CRI plugin must be enabled (the kubelet calls ImageFsInfo "
                     "at connect)")
    return Check("containerd", True, f"{address} answers CRI ImageFsInfo")


def _state_dir(path: str) -> Check:
    directory = Path(path)
    if not directory.exists():
        parent = next((p for p in directory.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return Check("state dir", True, f"{path} absent; it is created at start")
        return Check("state dir", False, f"{path} absent and {parent} is not writable",
                     "create it (mode 0700), or set state_dir")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("state dir", False, f"{path} is not writable: {exc.strerror or exc}",
                     "run as the daemon's user, or set state_dir to a writable directory")
    return Check("state dir", True, f"{path} writable")


def _hosts_dir(roots: tuple[str, ...]) -> Check:
    shown = ":".join(roots)
    present = [Path(root) for root in roots if Path(root).exists()]
    if not present:
        return Check("hosts dir", True, f"{shown} absent: registries are asked directly, "
                                        "as containerd does without it")
    reader = hosts.Hosts(roots)
    found = 0
    for root in present:
        try:
            names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        except OSError as exc:
            return Check("hosts dir", False, f"{root} is not readable: {exc.strerror or exc}",
                         "make it readable, or set containerd.hosts_dir")
        for name in names:
            found += (root / name / "hosts.toml").is_file()
            try:
                reader.endpoints(name if name != "_default" else "registry.invalid")
            except Failure as exc:
                return Check("hosts dir", False, exc.detail,
                             "correct the file: containerd would not read it either")
    return Check("hosts dir", True, f"{shown}, {found} hosts.toml")


async def _kubernetes(settings: configuration.KubernetesConfig,
                      namespace: str) -> list[Check]:
    if not settings.events:
        return [Check("kubernetes events", True, "off (kubernetes.events: false)")]
    path = settings.kubeconfig or kubeconfig.DEFAULT_PATH
    try:
        loaded = kubeconfig.load(path)
    except KubeconfigError as exc:
        return [Check("kubernetes events", False, f"off: {exc}",
                      "set kubernetes.kubeconfig to the kubelet's kubeconfig (kubeadm: "
                      "/etc/kubernetes/kubelet.conf, EKS: /var/lib/kubelet/kubeconfig), or "
                      "kubernetes.events: false")]
    client = Client(path, settings.timeout, loaded)
    node = settings.node_name or socket.gethostname().lower()
    checks: list[Check] = []
    try:
        user = await _identity(client)
        checks.append(Check("kubernetes API", True, f"{loaded.server} answers"))
        checks.append(_node_name(user, node, settings))
        for verb in ("create", "patch"):
            checks.append(await _may(client, user or "the identity", verb, namespace))
    except ApiError as exc:
        checks.append(_api_failure(exc, loaded.server, path))
    finally:
        await client.close()
    return checks


async def _identity(client: Client) -> str:
    """Who the API server takes the kubeconfig for ('' before Kubernetes 1.28)."""
    try:
        review = await client.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                      {"apiVersion": "authentication.k8s.io/v1",
                                       "kind": "SelfSubjectReview"})
    except ApiError as exc:
        if exc.kind is ApiKind.NOT_FOUND:
            return ""
        raise
    user = review.get("status", {}).get("userInfo", {}).get("username", "")
    return user if isinstance(user, str) else ""


def _node_name(user: str, node: str, settings: configuration.KubernetesConfig) -> Check:
    prefix = "system:node:"
    where = "kubernetes.node_name" if settings.node_name else "the host name"
    if user.startswith(prefix) and user[len(prefix):] != node:
        return Check("kubernetes node name", False,
                     f"the kubeconfig is {user}, but Events would name node {node!r} "
                     f"({where})", f"set kubernetes.node_name: {user[len(prefix):]}")
    return Check("kubernetes node name", True,
                 f"{node} ({where}), identity {user or 'not reported by this API server'}")


async def _may(client: Client, user: str, verb: str, namespace: str) -> Check:
    review = await client.request(
        "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
         "spec": {"resourceAttributes": {"namespace": namespace, "verb": verb,
                                         "group": "", "resource": "events"}}})
    status = review.get("status", {}) if isinstance(review, dict) else {}
    name = f"kubernetes {verb} events"
    if status.get("allowed") is True:
        return Check(name, True, f"{user} may {verb} Events in {namespace}")
    why = status.get("reason") or status.get("evaluationError") or "no rule allows it"
    return Check(name, False, f"{user} may not {verb} Events in {namespace}: {why}",
                 "use the kubelet's own kubeconfig (the Node authorizer lets nodes post "
                 "Events), or grant create and patch on events to this identity")


def _api_failure(exc: ApiError, server: str, path: str) -> Check:
    fixes = {
        ApiKind.UNAUTHORIZED: "the API server does not accept these credentials: an expired "
                              "client certificate or a revoked token; use the kubelet's "
                              "current kubeconfig",
        ApiKind.CREDENTIALS: f"correct {path} or what it names",
        ApiKind.FORBIDDEN: "the identity may not even ask what it may do; use the kubelet's "
                           "kubeconfig",
    }
    detail = exc.detail if exc.detail.startswith(server) else f"{server}: {exc.detail}"
    return Check("kubernetes API", False, detail,
                 fixes.get(exc.kind, "check the server address, the network path and the CA "
                                     "in the kubeconfig"))
