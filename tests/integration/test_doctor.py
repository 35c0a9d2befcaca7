"""`nodekeeper doctor` against a real containerd and a real kube-apiserver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Containerd, free_port
from tests.harness.apiserver import ApiServer

pytestmark = pytest.mark.integration


def doctor(tmp_path: Path, containerd_address: str, kubeconfig: Path | str,
           **kubernetes: Any) -> tuple[int, list[str]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  update: always\n")
    config = tmp_path / "config.yaml"
    settings: dict[str, Any] = {
        "containerd": {"address": containerd_address,
                       "hosts_dir": str(tmp_path / "certs.d")},
        "state_dir": str(tmp_path / "state"),
        "policy_file": str(policy),
        "kubernetes": {"kubeconfig": str(kubeconfig), **kubernetes},
    }
    config.write_text(yaml.safe_dump(settings))
    done = subprocess.run([sys.executable, "-m", "nodekeeper", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stderr == ""
    return done.returncode, done.stdout.splitlines()


def test_a_healthy_node(tmp_path: Path, containerd: Containerd, apiserver: ApiServer) -> None:
    (tmp_path / "state").mkdir()
    hosts = tmp_path / "certs.d" / "registry.example:5000"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text('server = "https://registry.example:5000"\n')
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    code, lines = doctor(tmp_path, containerd.address, kubeconfig,
                         node_name=apiserver.node_name)
    assert code == 0, lines
    assert [line.split(":")[0] for line in lines] == [
        "OK   config", "OK   policy", "OK   containerd", "OK   state dir", "OK   hosts dir",
        "OK   kubernetes API", "OK   kubernetes node name", "OK   kubernetes create events",
        "OK   kubernetes patch events"]
    assert f"system:node:{apiserver.node_name} may create Events in default" in lines[7]
    assert "1 hosts.toml" in lines[4]


def test_each_failure_says_what_to_do(tmp_path: Path, apiserver: ApiServer) -> None:
    (tmp_path / "state").write_text("a file where the directory should be")
    hosts = tmp_path / "certs.d" / "registry.example"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text("server = [\n")
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig",
                                            user={"token": apiserver.stranger_token})
    code, lines = doctor(tmp_path, str(tmp_path / "absent.sock"), kubeconfig)
    assert code == 1
    failed = {line.split(":")[0][5:]: line for line in lines if line.startswith("FAIL")}
    assert set(failed) == {"containerd", "state dir", "hosts dir", "kubernetes create events",
                           "kubernetes patch events"}, lines
    assert all(" -> " in line for line in failed.values())
    assert "stranger may not create Events in default" in failed["kubernetes create events"]
    assert "hosts.toml" in failed["hosts dir"]
    assert apiserver.stranger_token not in "\n".join(lines)


def test_a_node_name_other_than_the_identity(tmp_path: Path, containerd: Containerd,
                                             apiserver: ApiServer) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf")
    code, lines = doctor(tmp_path, containerd.address, kubeconfig, node_name="node-b")
    assert code == 1
    (failed,) = [line for line in lines if line.startswith("FAIL")]
    assert failed.startswith(f"FAIL kubernetes node name: the kubeconfig is "
                             f"system:node:{apiserver.node_name}, but Events would name node "
                             "'node-b'")
    assert failed.endswith(f"-> set kubernetes.node_name: {apiserver.node_name}")


def test_an_unreachable_api_server(tmp_path: Path, containerd: Containerd,
                                   apiserver: ApiServer) -> None:
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubelet.conf",
                                            server=f"https://127.0.0.1:{free_port()}")
    code, lines = doctor(tmp_path, containerd.address, kubeconfig)
    assert code == 1
    (failed,) = [line for line in lines if line.startswith("FAIL")]
    assert failed.startswith("FAIL kubernetes API: https://127.0.0.1:")
    assert "Connection refused" in failed or "connect" in failed.lower()
