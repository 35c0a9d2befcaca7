"""`nodekeeper doctor` on what needs no running parts; tests/integration/test_doctor.py has
containerd and the API server."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodekeeper.commands import doctor


def test_an_invalid_config_is_the_one_failure(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("kubernetes:\n  kubeconfig: /nonexistent/kubelet.conf\n")
    assert doctor.main(str(config), "default") == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"FAIL config: {config}:2: kubernetes.kubeconfig: "
                           "/nonexistent/kubelet.conf: cannot read")
    assert " -> " in line


def test_local_checks(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  update: always\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"policy_file: {policy}\nstate_dir: {tmp_path / 'state'}\n"
                      f"containerd:\n  hosts_dir: {tmp_path}/certs.d\n"
                      "kubernetes:\n  events: false\n")
    checks = {check.name: check for check in doctor.run(str(config), "default")}
    assert checks["policy"].ok
    assert checks["state dir"].ok
    assert "created at start" in checks["state dir"].detail
    assert checks["hosts dir"].ok
    assert checks["kubernetes events"].ok
    assert checks["kubernetes events"].detail == "off (kubernetes.events: false)"


def test_the_default_kubeconfig_missing_is_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.kubeconfig, "DEFAULT_PATH", str(tmp_path / "kubelet.conf"))
    config = tmp_path / "config.yaml"
    config.write_text("")
    checks = {check.name: check for check in doctor.run(str(config), "default")}
    events = checks["kubernetes events"]
    assert not events.ok
    assert "kubelet.conf: cannot read" in events.detail
    assert "kubernetes.events: false" in events.fix
