"""The Kubernetes client's credential handling: exec plugins and TLS material.

Requests against a real API server are in tests/integration/test_kube_events.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nodekeeper.errors import ApiError, ApiKind
from nodekeeper.kube import client
from nodekeeper.kube.client import _Credential
from nodekeeper.kube.kubeconfig import Exec, Kubeconfig
from tests.harness.registry import make_tls_files

SECRET = "s3cr3t-exec-token-0123456789"
V1 = "client.authentication.k8s.io/v1"
CONFIG = Kubeconfig(path="/etc/kubernetes/kubelet.conf", server="https://api:6443")


def credential_output(status: dict[str, object], api_version: str = V1) -> bytes:
    return json.dumps({"apiVersion": api_version, "kind": "ExecCredential",
                       "status": status}).encode()


def test_an_exec_credential_with_a_token_and_expiry() -> None:
    got = client._credential(credential_output(
        {"token": SECRET, "expirationTimestamp": "2030-01-02T03:04:05Z"}), Exec("x"), "x")
    assert got.token == SECRET
    assert got.expires == pytest.approx(1893553445.0)


def test_an_exec_credential_with_a_client_certificate() -> None:
    got = client._credential(credential_output(
        {"clientCertificateData": "CERT", "clientKeyData": "KEY"}), Exec("x"), "x")
    assert (got.cert_pem, got.key_pem, got.token, got.expires) == (b"CERT", b"KEY", "", None)


@pytest.mark.parametrize(("output", "expected"), [
    (SECRET.encode(), "did not print an ExecCredential"),
    (credential_output({"token": SECRET}, "client.authentication.k8s.io/v1beta1"),
     "did not print an ExecCredential client.authentication.k8s.io/v1"),
    (credential_output({"clientKeyData": SECRET}), "holds neither a token"),
    (credential_output({"token": [SECRET]}), "holds neither a token"),
    (credential_output({"token": SECRET, "expirationTimestamp": SECRET}),
     "expirationTimestamp is not an RFC 3339 time"),
])
def test_a_bad_exec_credential_is_refused_without_echoing_it(output: bytes,
                                                              expected: str) -> None:
    with pytest.raises(ApiError) as caught:
        client._credential(output, Exec("x"), "plugin x")
    assert caught.value.kind is ApiKind.CREDENTIALS
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)


def script(tmp_path: Path, body: str) -> Exec:
    path = tmp_path / "plugin"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o700)
    return Exec(str(path), args=("--flag",), env=(("EXTRA", "yes"),))


async def test_a_plugin_is_run_without_a_terminal(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    plugin = script(tmp_path, f'echo "$1 $EXTRA $KUBERNETES_EXEC_INFO" > {seen}\n'
                              f"echo '{credential_output({'token': SECRET}).decode()}'")
    got = await client._run_plugin(CONFIG, plugin)
    assert got.token == SECRET
    flag, extra, info = seen.read_text().split(" ", 2)
    assert (flag, extra) == ("--flag", "yes")
    assert json.loads(info) == {"apiVersion": V1, "kind": "ExecCredential",
                                "spec": {"interactive": False}}


# The timeout is short only where the plugin never answers; elsewhere a busy machine may
# take its time starting a shell.
@pytest.mark.parametrize(("body", "timeout", "expected"), [
    ("exit 3", 20, "exited with status 3"),
    ("sleep 30", 0.1, "no credential within 0.1s"),
    ("head -c 100000 /dev/zero", 20, "printed more than 65536 bytes"),
    (f"echo {SECRET} >&2; exit 1", 20, "exited with status 1"),
])
async def test_a_failing_plugin_is_bounded_and_quiet(tmp_path: Path, body: str, timeout: float,
                                                     expected: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "EXEC_TIMEOUT", timeout)
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        await client._run_plugin(CONFIG, script(tmp_path, body))
    assert time.monotonic() - started < 25  # not for as long as the plugin runs (30 s)
    assert caught.value.kind is ApiKind.CREDENTIALS
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)


async def test_a_plugin_that_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="cannot run"):
        await client._run_plugin(CONFIG, Exec(str(tmp_path / "absent")))


def test_a_client_key_is_loaded_from_memory(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    pair = _Credential("", tls.cert.read_bytes(), tls.key.read_bytes(), None)
    context = client._tls(CONFIG.__class__(path="k", server="https://api",
                                           ca_pem=tls.ca_cert.read_bytes()), pair)
    assert context.verify_mode.name == "CERT_REQUIRED"
    other = make_tls_files(tmp_path / "other")
    mismatched = _Credential("", tls.cert.read_bytes(), other.key.read_bytes(), None)
    with pytest.raises(ApiError, match="do not load"):
        client._tls(CONFIG, mismatched)


def test_a_ca_that_is_not_a_certificate(tmp_path: Path) -> None:
    broken = Kubeconfig(path="k", server="https://api", ca_pem=b"-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ApiError, match="certificate-authority holds no usable certificate"):
        client._tls(broken, _Credential("", b"", b"", None))
