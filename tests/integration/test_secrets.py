"""No credential or token shows anywhere, whatever it is made of: not in the log, not in
an error the kubelet gets, not in the state database, metrics, `status` or `explain`.
Real containerd, real password- and token-protected registries, nodekeeper as the daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from nodekeeper._proto import cri_image_pb2 as cri
from tests.conftest import MakeNodekeeper, MakeRegistry
from tests.harness import (
    BearerAuth,
    Containerd,
    CriClient,
    TokenServer,
    free_port,
    image_ref,
    plain_http_hosts_toml,
    push_new,
    push_new_with_token,
)
from tests.harness.nodekeeper import Nodekeeper, scrape

pytestmark = pytest.mark.integration

# Shaped to slip past naive redaction: quotes, a newline, a backslash, non-ASCII, '='.
GOOD = 'go"od\n-pass\\wörd=='
WRONG = "wr'ong\npass-ü=="
IDENTITY = 'identity-"token"\nwith-ünicode'
REGISTRY_TOKEN = "rt-7q9x\r\nzz-tok-ß"


def forms(secret: str) -> list[str]:
    """The ways a secret could be written out: as is, escaped, and its lines."""
    found = [secret, repr(secret)[1:-1], secret.encode("unicode_escape").decode(),
             *(line for line in secret.splitlines() if len(line) >= 6)]
    return [f for f in found if f]


def shown_anywhere(daemon: Nodekeeper, texts: list[str], secrets: list[str]) -> list[str]:
    state = b"".join(p.read_bytes() for p in (daemon.workdir / "state").glob("*")
                     if p.is_file())
    everything = [daemon.log_text(), *texts]
    return [f for secret in secrets for f in forms(secret)
            if any(f in text for text in everything) or f.encode() in state]


def outcome(client: CriClient, ref: str, auth: cri.AuthConfig | None) -> str:
    try:
        return client.pull(ref, auth=auth)
    except grpc.RpcError as exc:
        return str(exc.details())  # type: ignore[attr-defined]


def test_no_secret_shows_anywhere(make_registry: MakeRegistry, containerd: Containerd,
                                  make_nodekeeper: MakeNodekeeper, tmp_path: Path) -> None:
    metrics_address = f"127.0.0.1:{free_port()}"
    daemon = make_nodekeeper(containerd.address, settings={"metrics_address": metrics_address})
    basic = make_registry(htpasswd={"alice": GOOD})
    containerd.write_hosts_toml(basic.host, plain_http_hosts_toml(basic.host))
    image = push_new(basic.url, "private/app", "1", seed="secrets", auth=("alice", GOOD))
    ref = image_ref(basic.host, "private/app", "1")
    said: list[str] = []
    with TokenServer({"alice": GOOD}, base_dir=tmp_path / "tokens") as tokens:
        token_registry = make_registry(token_auth=tokens)
        containerd.write_hosts_toml(token_registry.host,
                                    plain_http_hosts_toml(token_registry.host))
        push_new_with_token(token_registry.url, "private/app", "1", BearerAuth("alice", GOOD),
                            seed="secrets-token")
        token_ref = image_ref(token_registry.host, "private/app", "1")
        attempts = [
            (ref, cri.AuthConfig(username="alice", password=GOOD)),
            (ref, cri.AuthConfig(username="alice", password=WRONG)),
            (token_ref, cri.AuthConfig(username="alice", password=GOOD)),
            (token_ref, cri.AuthConfig(username="alice", password=WRONG)),
            (token_ref, cri.AuthConfig(identity_token=IDENTITY)),
            (token_ref, cri.AuthConfig(registry_token=REGISTRY_TOKEN)),
        ]
        with CriClient(daemon.socket) as kubelet:
            said += [outcome(kubelet, r, a) for r, a in attempts]
            assert said[0] == image.config_digest
            basic.stop()
            said += [outcome(kubelet, r, a) for r, a in attempts[:2]]
    assert said[2] != said[3]  # the right password worked, the wrong one did not
    config = str(daemon.config_path)
    cli = [sys.executable, "-m", "nodekeeper"]
    for command in (["status"], ["explain", ref], ["explain", token_ref]):
        said.append(subprocess.run([*cli, *command, "--config", config], capture_output=True,
                                   text=True, timeout=30, check=True).stdout)
    said.append(repr(scrape(metrics_address)))
    daemon.stop()
    assert shown_anywhere(daemon, said, [GOOD, WRONG, IDENTITY, REGISTRY_TOKEN]) == []
