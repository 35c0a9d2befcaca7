"""A real Prometheus (Debian's package) on 127.0.0.1, with its own config and storage
under a test's temp dir, started and stopped by PID."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness._proc import ManagedProcess
from tests.harness.registry import free_port


class Prometheus:
    """Scrapes `targets` under job="nodekeeper" every second and evaluates `rule_files`."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: install Debian's prometheus package " \
                       "(scripts/setup.sh)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "nodekeeper",
                                "static_configs": [{"targets": targets}]}],
        }))
        self._process = ManagedProcess([
            binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={self.address}",
            # No console templates: Debian's defaults point at /etc/prometheus.
            f"--web.console.templates={workdir}", f"--web.console.libraries={workdir}",
        ], workdir / "prometheus.log")

    def start(self, timeout: float = 30.0) -> None:
        self._process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.running:
                break
            try:
                if httpx.get(f"http://{self.address}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus did not become ready:\n{self._process.tail()}")

    def stop(self) -> None:
        self._process.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on an invalid expression)."""
        answer = httpx.get(f"http://{self.address}/api/v1/query", params={"query": expr},
                           timeout=10)
        body = answer.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until `expr` returns data."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no data for {expr} within {timeout}s"
            time.sleep(0.5)
        return result

    def rules(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"http://{self.address}/api/v1/rules", timeout=10).json()
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]
