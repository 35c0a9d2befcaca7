"""Where a registry request goes: containerd's hosts directory, or the registry itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodekeeper.addresses import is_loopback
from nodekeeper.errors import SettingsError
from nodekeeper.registry.hosts import Endpoint, endpoints


def hosts_file(hosts_dir: Path, domain: str, text: str) -> Path:
    directory = hosts_dir / domain
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(text)
    return path


# -- no hosts.toml ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("domain", "base", "host"),
    [
        ("docker.io", "https://registry-1.docker.io/v2", "registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io/v2", "ghcr.io"),
        ("registry.example:5000", "https://registry.example:5000/v2", "registry.example:5000"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000/v2", "127.0.0.1:5000"),
        ("127.0.0.1", "http://127.0.0.1/v2", "127.0.0.1"),
        ("127.1.2.3:80", "http://127.1.2.3:80/v2", "127.1.2.3:80"),
        ("localhost:5000", "http://localhost:5000/v2", "localhost:5000"),
        ("localhost", "http://localhost/v2", "localhost"),
        ("[::1]:5000", "http://[::1]:5000/v2", "[::1]:5000"),
        ("10.0.0.1:5000", "https://10.0.0.1:5000/v2", "10.0.0.1:5000"),
        ("localhost.example", "https://localhost.example/v2", "localhost.example"),
    ],
)
def test_default_endpoint(tmp_path: Path, domain: str, base: str, host: str) -> None:
    (found,) = endpoints(tmp_path, domain)
    assert found == Endpoint(base=base, host=host)
    assert "resolve" in found.capabilities
    assert found.namespace == ""


def test_missing_hosts_dir_is_fine(tmp_path: Path) -> None:
    (found,) = endpoints(tmp_path / "absent", "ghcr.io")
    assert found.base == "https://ghcr.io/v2"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.1:5000", True), ("localhost", True),
     ("localhost:1", True), ("[::1]:5000", True), ("::1", True), ("10.0.0.1:5000", False),
     ("example.com", False), ("localhost.example:5000", False), ("[2001:db8::1]:5000", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- hosts.toml ------------------------------------------------------------------------------

def test_mirrors_first_then_server(tmp_path: Path) -> None:
    hosts_file(tmp_path, "docker.io", """
server = "https://registry-1.docker.io"

[host."https://mirror-a.example"]
  capabilities = ["pull", "resolve"]

[host."http://mirror-b.example:5000"]
  capabilities = ["pull", "resolve"]
""")
    found = endpoints(tmp_path, "docker.io")
    assert [e.base for e in found] == [
        "https://mirror-a.example/v2",
        "http://mirror-b.example:5000/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [e.host for e in found] == [
        "mirror-a.example", "mirror-b.example:5000", "registry-1.docker.io"]
    # Mirrors are told which registry is meant; the server is not.
    assert [e.namespace for e in found] == ["docker.io", "docker.io", ""]


def test_server_defaults_to_the_registry(tmp_path: Path) -> None:
    hosts_file(tmp_path, "docker.io", '[host."https://mirror.example"]\n')
    assert [e.base for e in endpoints(tmp_path, "docker.io")] == [
        "https://mirror.example/v2", "https://registry-1.docker.io/v2"]
    hosts_file(tmp_path, "127.0.0.1:5000", '[host."https://mirror.example"]\n')
    assert endpoints(tmp_path, "127.0.0.1:5000")[-1].base == "http://127.0.0.1:5000/v2"


def test_server_replaced(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", 'server = "https://elsewhere.example:8443"\n')
    (found,) = endpoints(tmp_path, "registry.example")
    assert (found.base, found.host) == ("https://elsewhere.example:8443/v2",
                                        "elsewhere.example:8443")


def test_host_without_scheme_is_https(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", '[host."mirror.example"]\n')
    assert endpoints(tmp_path, "registry.example")[0].base == "https://mirror.example/v2"


def test_hosts_without_resolve_are_skipped(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
[host."https://pull-only.example"]
  capabilities = ["pull"]

[host."https://resolver.example"]
  capabilities = ["resolve"]

[host."https://push-only.example"]
  capabilities = ["push"]
""")
    found = endpoints(tmp_path, "registry.example")
    assert [e.host for e in found] == ["resolver.example", "registry.example"]
    assert found[0].capabilities == frozenset({"resolve"})


def test_server_without_resolve_is_skipped(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
capabilities = ["pull"]

[host."https://mirror.example"]
""")
    assert [e.host for e in endpoints(tmp_path, "registry.example")] == ["mirror.example"]


def test_tls_settings(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "registry.example", """
server = "https://registry.example"
ca = "server-ca.pem"

[host."https://relative.example"]
  ca = "mirror-ca.pem"

[host."https://absolute.example"]
  ca = ["/etc/certs/a.pem", "b.pem"]
  skip_verify = true
""")
    relative, absolute, server = endpoints(tmp_path, "registry.example")
    assert relative.ca == (str(path.parent / "mirror-ca.pem"),)
    assert not relative.skip_verify
    assert absolute.ca == ("/etc/certs/a.pem", str(path.parent / "b.pem"))
    assert absolute.skip_verify
    assert server.ca == (str(path.parent / "server-ca.pem"),)
    assert not server.skip_verify


def test_override_path(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
[host."https://mirror.example/custom/v2/registry.example"]
  override_path = true

[host."https://prefixed.example/prefix/"]
""")
    overridden, prefixed, _server = endpoints(tmp_path, "registry.example")
    assert overridden.base == "https://mirror.example/custom/v2/registry.example"
    assert overridden.host == "mirror.example"
    assert prefixed.base == "https://prefixed.example/prefix/v2"


def test_headers(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
[host."https://mirror.example"]
  [host."https://mirror.example".header]
    x-one = "1"
    x-list = ["first", "second"]
""")
    mirror = endpoints(tmp_path, "registry.example")[0]
    assert dict(mirror.headers) == {"x-one": "1", "x-list": "first"}


def test_default_directory_is_the_fallback(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "_default", """
ca = "default-ca.pem"

[host."https://mirror.example"]
""")
    mirror, server = endpoints(tmp_path, "ghcr.io")
    assert mirror.base == "https://mirror.example/v2"
    assert mirror.namespace == "ghcr.io"
    assert server.base == "https://ghcr.io/v2"
    assert server.ca == (str(path.parent / "default-ca.pem"),)
    # A host's own directory takes precedence over _default.
    hosts_file(tmp_path, "ghcr.io", 'server = "https://ghcr.io"\n')
    (only,) = endpoints(tmp_path, "ghcr.io")
    assert only.base == "https://ghcr.io/v2"


def test_directory_without_hosts_toml_uses_the_default(tmp_path: Path) -> None:
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "ca.crt").write_text("")
    (found,) = endpoints(tmp_path, "ghcr.io")
    assert found.base == "https://ghcr.io/v2"


@pytest.mark.parametrize(
    "text",
    [
        'server = "https://x\n',
        "[host.\n",
        "server = https://unquoted\n",
        '[host."https://a"]\n[host."https://a"]\n',
    ],
)
def test_malformed_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = hosts_file(tmp_path, "registry.example", text)
    with pytest.raises(SettingsError) as info:
        endpoints(tmp_path, "registry.example")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "host = 1\n",
        'host = "x"\n',
        "server = 5\n",
        '[host]\n"https://a" = 1\n',
        'server = "ftp://registry.example"\n',
        '[host."unix:///run/registry.sock"]\n',
    ],
)
def test_wrong_shapes_are_settings_errors(tmp_path: Path, text: str) -> None:
    path = hosts_file(tmp_path, "registry.example", text)
    with pytest.raises(SettingsError) as info:
        endpoints(tmp_path, "registry.example")
    assert str(path.parent) in str(info.value)


def test_unreadable_bytes_are_a_settings_error(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "registry.example", "")
    path.write_bytes(b"server = \"\xff\xfe\"\n")
    with pytest.raises(SettingsError, match=r"hosts\.toml"):
        endpoints(tmp_path, "registry.example")
