"""kubeconfig parsing: what client-go reads, refused clearly otherwise, never echoing secrets."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodekeeper.kube import kubeconfig
from nodekeeper.kube.kubeconfig import KubeconfigError

SECRET = "s3cr3t-token-value-0123456789"
CA = b"-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n"
CERT = b"-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN EC PRIVATE KEY-----\nkey\n-----END EC PRIVATE KEY-----\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any],
          **top: Any) -> str:
    document = {
        "apiVersion": "v1", "kind": "Config", "current-context": "system:node:a@kubernetes",
        "clusters": [{"name": "other", "cluster": {"server": "https://elsewhere"}},
                     {"name": "kubernetes", "cluster": cluster}],
        "contexts": [{"name": "system:node:a@kubernetes",
                      "context": {"cluster": "kubernetes", "user": "system:node:a"}}],
        "users": [{"name": "system:node:a", "user": user}],
        **top,
    }
    path = tmp_path / "kubelet.conf"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


def test_kubeadm_kubelet_conf(tmp_path: Path) -> None:
    # kubeadm: CA inline, the rotating client certificate and key in one file.
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "kubelet-client-current.pem").write_bytes(CERT + KEY)
    path = write(tmp_path,
                 {"server": "https://10.0.0.1:6443/", "certificate-authority-data": b64(CA)},
                 {"client-certificate": "pki/kubelet-client-current.pem",
                  "client-key": str(pki / "kubelet-client-current.pem")})
    loaded = kubeconfig.load(path)
    assert loaded.server == "https://10.0.0.1:6443"
    assert loaded.ca_pem == CA
    assert loaded.cert_pem == loaded.key_pem == CERT + KEY
    assert loaded.token == ""
    assert loaded.exec is None
    assert not loaded.changed()
    assert str(pki / "kubelet-client-current.pem") in dict(loaded.sources)


def test_rotation_and_replacement_are_noticed(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(CERT + KEY)
    path = write(tmp_path, {"server": "https://api:6443", "certificate-authority-data": b64(CA)},
                 {"client-certificate": "cert.pem", "client-key": "cert.pem"})
    loaded = kubeconfig.load(path)
    rotated = tmp_path / "new.pem"
    rotated.write_bytes(CERT + KEY + b"\n")
    os.replace(rotated, tmp_path / "cert.pem")
    assert loaded.changed()


def test_data_wins_over_file_and_token_file_over_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"{SECRET}\n")
    path = write(tmp_path, {"server": "https://api:6443", "certificate-authority": "absent.pem",
                            "certificate-authority-data": b64(CA)},
                 {"token": "ignored", "tokenFile": "token"})
    loaded = kubeconfig.load(path)
    assert loaded.ca_pem == CA
    assert loaded.token == SECRET


def test_base64_may_be_wrapped(tmp_path: Path) -> None:
    wrapped = "\n".join(b64(CA)[i:i + 20] for i in range(0, len(b64(CA)), 20))
    path = write(tmp_path, {"server": "https://api", "certificate-authority-data": wrapped},
                 {"token": SECRET})
    assert kubeconfig.load(path).ca_pem == CA


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": "https://api"},
                 {"token": SECRET, "client-certificate-data": b64(CERT),
                  "client-key-data": b64(KEY)})
    text = repr(kubeconfig.load(path))
    assert SECRET not in text
    assert "PRIVATE" not in text


def test_exec_plugin(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": "https://api"}, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "./bin/get-token",
        "args": ["token", "-i", "cluster"], "env": [{"name": "AWS_REGION", "value": "x"}],
        "provideClusterInfo": True}})
    plugin = kubeconfig.load(path).exec
    assert plugin is not None
    assert plugin.command == str(tmp_path / "bin" / "get-token")
    assert plugin.args == ("token", "-i", "cluster")
    assert plugin.env == (("AWS_REGION", "x"),)
    assert plugin.provide_cluster_info
    bare = write(tmp_path, {"server": "https://api"}, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": "aws",
        "interactiveMode": "Never"}})
    assert kubeconfig.load(bare).exec == kubeconfig.Exec(command="aws")


@pytest.mark.parametrize(
    ("cluster", "user", "top", "expected"),
    [
        ({"server": "https://api"}, {}, {"current-context": ""}, ":3: current-context: no "
         "current-context is set"),
        ({"server": "https://api"}, {}, {"current-context": "absent"}, "contexts: no context "
         "named 'absent'"),
        ({"server": "ftp://api"}, {}, {}, "clusters[1].cluster.server: expected https://"),
        ({}, {}, {}, "clusters[1].cluster.server: expected https://"),
        ({"server": "http://api.example:8080"}, {}, {}, "plain http is accepted only for a "
         "loopback"),
        ({"server": "https://api", "proxy-url": "http://proxy"}, {}, {}, "proxy-url is not "
         "supported"),
        ({"server": "https://api", "insecure-skip-tls-verify": "yes"}, {}, {},
         "insecure-skip-tls-verify: expected true or false"),
        ({"server": "https://api", "certificate-authority": "absent.pem"}, {}, {},
         "clusters[1].cluster.certificate-authority: cannot read "),
        ({"server": "https://api"}, {"client-certificate-data": b64(CERT)}, {},
         "client-certificate and client-key go together"),
        ({"server": "https://api"}, {"auth-provider": {"name": "gcp"}}, {},
         "users[0].user.auth-provider: auth-provider plugins are not supported"),
        ({"server": "https://api"}, {"username": "u", "password": SECRET}, {},
         "basic authentication is not supported"),
        ({"server": "https://api"}, {"as": "admin"}, {}, "impersonation is not supported"),
        ({"server": "https://api"}, {"exec": {"command": "x"}}, {},
         "exec.apiVersion: expected one of client.authentication.k8s.io/v1"),
        ({"server": "https://api"}, {"exec": {"apiVersion": "client.authentication.k8s.io/v1"}},
         {}, "exec.command: an exec plugin needs a command"),
        ({"server": "https://api"}, {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                              "command": "x", "interactiveMode": "Always"}},
         {}, "exec.interactiveMode: a plugin that needs a terminal"),
        ({"server": "https://api"}, {"token": SECRET, "exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": "x"}}, {},
         "exec cannot be combined"),
        ({"server": "https://api"}, {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                              "command": "x", "env": [{"name": "A"}]}}, {},
         "exec.env[0]: expected name: and value: strings"),
        ({"server": "https://api"}, {"client-key-data": SECRET + "!",
                                     "client-certificate-data": b64(CERT)}, {},
         "users[0].user.client-key-data: not valid base64"),
        ({"server": "https://api"}, {"token": 12345678901234567890}, {},
         "users[0].user.token: expected a string"),
    ],
)
def test_refused_with_file_line_and_key(tmp_path: Path, cluster: dict[str, Any],
                                        user: dict[str, Any], top: dict[str, Any],
                                        expected: str) -> None:
    path = write(tmp_path, cluster, user, **top)
    with pytest.raises(KubeconfigError) as caught:
        kubeconfig.load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:")
    assert expected in text
    assert SECRET not in text
    assert "12345678901234567890" not in text


def test_unreadable_and_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="cannot read"):
        kubeconfig.load(str(tmp_path / "absent"))
    bad = tmp_path / "bad"
    bad.write_text(f"users: [token: {SECRET}\n")
    with pytest.raises(KubeconfigError, match="not valid YAML") as caught:
        kubeconfig.load(str(bad))
    assert SECRET not in str(caught.value)
    bad.write_text("- a list\n")
    with pytest.raises(KubeconfigError, match="expected a kubeconfig"):
        kubeconfig.load(str(bad))
