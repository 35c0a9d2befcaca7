"""The .deb and .rpm as built by packaging/build.sh: lint-clean, complete, self-contained.

Installing them under a booted systemd is the system test's job; here the packages are
built, linted and taken apart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run(*command: str, cwd: Path = REPO) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def packages() -> tuple[Path, Path]:
    run("bash", "packaging/build.sh")
    [deb] = (REPO / "dist").glob("nodekeeper_*_amd64.deb")
    [rpm] = (REPO / "dist").glob("nodekeeper-*.x86_64.rpm")
    return deb, rpm


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_lintian_is_clean(packages: tuple[Path, Path], arch: str) -> None:
    [deb] = (REPO / "dist").glob(f"nodekeeper_*_{arch}.deb")
    output = run("lintian", "--tag-display-limit", "0", str(deb))
    problems = [line for line in output.splitlines() if line[:2] in ("E:", "W:")]
    assert problems == []


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_rpmlint_reports_no_errors(packages: tuple[Path, Path], arch: str) -> None:
    [rpm] = (REPO / "dist").glob(f"nodekeeper-*.{arch}.rpm")
    output = run("rpmlint", "-c", "packaging/rpmlint.toml", str(rpm))
    assert " 0 errors," in output


def test_deb_contents_and_conffiles(packages: tuple[Path, Path], tmp_path: Path) -> None:
    listing = run("dpkg-deb", "-c", str(packages[0]))
    for path in ("./usr/bin/nodekeeper", "./lib/systemd/system/nodekeeper.service",
                 "./etc/nodekeeper/config.yaml", "./etc/nodekeeper/policy.yaml",
                 "./usr/share/doc/nodekeeper/README.md", "./usr/share/doc/nodekeeper/copyright",
                 "./usr/share/doc/nodekeeper/changelog.Debian.gz",
                 "./usr/share/doc/nodekeeper/examples/kubelet-config.yaml",
                 "./usr/share/man/man1/nodekeeper.1.gz",
                 "./usr/share/nodekeeper/nodekeeper-alerts.yaml",
                 "./usr/share/nodekeeper/nodekeeper-dashboard.json"):
        assert path in listing, path
    # The extensions named for each CPython the launcher may pick.
    for version in ("310", "311", "312"):
        for extension in ("grpc/_cython/cygrpc", "yaml/_yaml", "re2/_re2"):
            path = (f"./usr/lib/nodekeeper/vendor/{extension}.cpython-{version}"
                    "-x86_64-linux-gnu.so")
            assert path in listing, path
    run("dpkg-deb", "-e", str(packages[0]), str(tmp_path / "control"))
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    assert conffiles == ["/etc/nodekeeper/config.yaml", "/etc/nodekeeper/policy.yaml"]
    postinst = (tmp_path / "control" / "postinst").read_text()
    assert "check-config" in postinst  # a broken config is reported, not restarted into


def test_rpm_files_and_scripts(packages: tuple[Path, Path]) -> None:
    files = run("rpm", "-qlp", str(packages[1])).split()
    assert "/usr/bin/nodekeeper" in files
    assert "/usr/lib/systemd/system/nodekeeper.service" in files
    assert "/usr/share/nodekeeper/nodekeeper-alerts.yaml" in files
    assert "/usr/share/nodekeeper/nodekeeper-dashboard.json" in files
    config = run("rpm", "-qcp", str(packages[1])).split()
    assert config == ["/etc/nodekeeper/config.yaml", "/etc/nodekeeper/policy.yaml"]
    scripts = run("rpm", "-qp", "--scripts", str(packages[1]))
    assert "systemctl enable --now nodekeeper.service" in scripts
    assert "try-restart" in scripts


def test_runs_on_the_distribution_python_without_pip(packages: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """The vendored tree imports on Debian's own python3, outside any virtualenv."""
    run("dpkg-deb", "-x", str(packages[0]), str(tmp_path))
    home = tmp_path / "usr/lib/nodekeeper"
    code = (f"import sys; sys.path[:0] = ['{home}/app', '{home}/vendor']; "
            "from nodekeeper.cli import main; import nodekeeper.daemon, grpc, httpx, re2; "
            "import yaml; assert yaml.__with_libyaml__; "
            "sys.exit(main(['check-policy', sys.argv[1]]))")
    output = run("/usr/bin/python3", "-s", "-E", "-c", code,
                 str(tmp_path / "etc/nodekeeper/policy.yaml"))
    assert "OK, 2 rules" in output


def test_rpm_installs_into_a_scratch_root(packages: tuple[Path, Path], tmp_path: Path) -> None:
    """rpm itself lays the files down (no scripts, and the root has no Python to depend on)."""
    root = tmp_path / "root"
    root.mkdir()
    run("rpm", "--root", str(root), "--initdb")
    run("rpm", "--root", str(root), "-i", "--nodeps", "--noscripts", str(packages[1]))
    assert (root / "usr/bin/nodekeeper").stat().st_mode & 0o111
    assert (root / "etc/nodekeeper/policy.yaml").read_text() == (
        REPO / "etc/policy.yaml").read_text()
    assert (root / "usr/lib/nodekeeper/vendor/grpc/_cython").is_dir()


def test_arm64_deb_carries_the_extensions_for_each_python(packages: tuple[Path, Path]) -> None:
    [deb] = (REPO / "dist").glob("nodekeeper_*_arm64.deb")
    listing = run("dpkg-deb", "-c", str(deb))
    for version in ("310", "311", "312"):
        for extension in ("grpc/_cython/cygrpc", "yaml/_yaml", "re2/_re2"):
            path = (f"./usr/lib/nodekeeper/vendor/{extension}.cpython-{version}"
                    "-aarch64-linux-gnu.so")
            assert path in listing, path
