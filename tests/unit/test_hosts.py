"""Where a registry request goes: containerd's hosts directory, or the registry itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from nodekeeper.addresses import is_loopback
from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.edges import Endpoint
from nodekeeper.registry.hosts import Hosts


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
        ("10.0.0.1:5000", "https://10.0.0.1:5000/v2", "10.0.0.1:5000"),
        ("localhost.example", "https://localhost.example/v2", "localhost.example"),
    ],
)
def test_default_endpoint(tmp_path: Path, domain: str, base: str, host: str) -> None:
    (found,) = Hosts([tmp_path]).endpoints(domain)
    assert found == Endpoint(base=base, host=host)
    assert "resolve" in found.capabilities
    assert found.namespace == ""


@pytest.mark.parametrize("domain", ["127.0.0.1:5000", "127.0.0.1", "127.1.2.3:80",
                                    "localhost:5000", "localhost", "[::1]:5000"])
def test_a_loopback_registry_is_tried_over_https_first_then_http(tmp_path: Path,
                                                                domain: str) -> None:
    # As containerd 1.7 and 2.x: HTTPS without verification, then plain HTTP.
    tls, plain = Hosts([tmp_path]).endpoints(domain)
    assert (tls.base, tls.skip_verify) == (f"https://{domain}/v2", True)
    assert (plain.base, plain.skip_verify) == (f"http://{domain}/v2", False)
    assert tls.host == plain.host == domain


def test_missing_hosts_dir_is_fine(tmp_path: Path) -> None:
    (found,) = Hosts([tmp_path / "absent"]).endpoints("ghcr.io")
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
    found = Hosts([tmp_path]).endpoints("docker.io")
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
    assert [e.base for e in Hosts([tmp_path]).endpoints("docker.io")] == [
        "https://mirror.example/v2", "https://registry-1.docker.io/v2"]
    hosts_file(tmp_path, "127.0.0.1:5000", '[host."https://mirror.example"]\n')
    assert [e.base for e in Hosts([tmp_path]).endpoints("127.0.0.1:5000")][-2:] == [
        "https://127.0.0.1:5000/v2", "http://127.0.0.1:5000/v2"]


def test_server_replaced(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", 'server = "https://elsewhere.example:8443"\n')
    (found,) = Hosts([tmp_path]).endpoints("registry.example")
    assert (found.base, found.host) == ("https://elsewhere.example:8443/v2",
                                        "elsewhere.example:8443")


def test_host_without_scheme_is_https(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", '[host."mirror.example"]\n')
    assert Hosts([tmp_path]).endpoints("registry.example")[0].base == "https://mirror.example/v2"


def test_hosts_without_resolve_are_skipped(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
[host."https://pull-only.example"]
  capabilities = ["pull"]

[host."https://resolver.example"]
  capabilities = ["resolve"]

[host."https://push-only.example"]
  capabilities = ["push"]
""")
    found = Hosts([tmp_path]).endpoints("registry.example")
    assert [e.host for e in found] == ["resolver.example", "registry.example"]
    assert found[0].capabilities == frozenset({"resolve"})


def test_server_without_resolve_is_skipped(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", """
capabilities = ["pull"]

[host."https://mirror.example"]
""")
    assert [e.host for e in Hosts([tmp_path]).endpoints("registry.example")] == ["mirror.example"]


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
    relative, absolute, server = Hosts([tmp_path]).endpoints("registry.example")
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
    overridden, prefixed, _server = Hosts([tmp_path]).endpoints("registry.example")
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
    mirror = Hosts([tmp_path]).endpoints("registry.example")[0]
    assert dict(mirror.headers) == {"x-one": "1", "x-list": "first"}


def test_default_directory_is_the_fallback(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "_default", """
ca = "default-ca.pem"

[host."https://mirror.example"]
""")
    mirror, server = Hosts([tmp_path]).endpoints("ghcr.io")
    assert mirror.base == "https://mirror.example/v2"
    assert mirror.namespace == "ghcr.io"
    assert server.base == "https://ghcr.io/v2"
    assert server.ca == (str(path.parent / "default-ca.pem"),)
    # A host's own directory takes precedence over _default.
    hosts_file(tmp_path, "ghcr.io", 'server = "https://ghcr.io"\n')
    (only,) = Hosts([tmp_path]).endpoints("ghcr.io")
    assert only.base == "https://ghcr.io/v2"


def test_directory_without_hosts_toml_uses_the_default(tmp_path: Path) -> None:
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "ca.crt").write_text("")
    (found,) = Hosts([tmp_path]).endpoints("ghcr.io")
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
    with pytest.raises(Failure) as info:
        Hosts([tmp_path]).endpoints("registry.example")
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
    with pytest.raises(Failure) as info:
        Hosts([tmp_path]).endpoints("registry.example")
    assert str(path.parent) in str(info.value)


def test_unreadable_bytes_are_a_settings_error(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "registry.example", "")
    path.write_bytes(b"server = \"\xff\xfe\"\n")
    with pytest.raises(Failure, match=r"hosts\.toml"):
        Hosts([tmp_path]).endpoints("registry.example")


# -- containerd's order, and reading once per change -----------------------------------------

def test_roots_are_searched_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "containerd", tmp_path / "docker"
    hosts_file(second, "ghcr.io", 'server = "https://second.example"\n')
    assert Hosts([first, second]).endpoints("ghcr.io")[-1].host == "second.example"
    hosts_file(first, "ghcr.io", 'server = "https://first.example"\n')
    assert Hosts([first, second]).endpoints("ghcr.io")[-1].host == "first.example"


def test_a_default_directory_in_an_earlier_root_wins(tmp_path: Path) -> None:
    # As containerd: each root is asked for host_port_, host, then _default.
    first, second = tmp_path / "a", tmp_path / "b"
    hosts_file(first, "_default", 'server = "https://default.example"\n')
    hosts_file(second, "ghcr.io", 'server = "https://ghcr.example"\n')
    assert Hosts([first, second]).endpoints("ghcr.io")[-1].host == "default.example"


def test_the_port_form_of_the_directory_comes_first(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example:5000", 'server = "https://plain.example"\n')
    hosts_file(tmp_path, "registry.example_5000_", 'server = "https://port.example"\n')
    assert Hosts([tmp_path]).endpoints("registry.example:5000")[-1].host == "port.example"


def test_certificates_of_a_directory_without_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "registry.example"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "orphan.cert"):
        (directory / name).write_text("")
    (found,) = Hosts([tmp_path]).endpoints("registry.example")
    assert found.ca == (str(directory / "ca.crt"),)
    assert found.client == ((str(directory / "client.cert"), str(directory / "client.key")),)


@pytest.mark.parametrize(("text", "client"), [
    ('client = "both.pem"\n', (("both.pem", ""),)),
    ('client = ["c.pem", "k.pem"]\n', (("c.pem", "k.pem"),)),
    ('client = [["c.pem", "k.pem"], ["d.pem"]]\n', (("c.pem", "k.pem"), ("d.pem", ""))),
])
def test_client_certificates(tmp_path: Path, text: str,
                             client: tuple[tuple[str, str], ...]) -> None:
    path = hosts_file(tmp_path, "registry.example", 'server = "https://registry.example"\n'
                      + text)
    (found,) = Hosts([tmp_path]).endpoints("registry.example")
    assert found.client == tuple((str(path.parent / c), str(path.parent / k) if k else "")
                                 for c, k in client)


def test_a_file_is_read_once_per_change(tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "registry.example", 'server = "https://one.example"\n')
    hosts = Hosts([tmp_path])
    assert hosts.endpoints("registry.example")[-1].host == "one.example"
    opened = []
    original = Path.open

    def counting(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(self)
        return original(self, *args, **kwargs)  # type: ignore[call-overload]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", counting)
        for _ in range(3):
            assert hosts.endpoints("registry.example")[-1].host == "one.example"
        assert opened == []
        path.write_text('server = "https://two.example"\n')
        opened.clear()
        assert hosts.endpoints("registry.example")[-1].host == "two.example"
        assert opened == [path]


def test_a_broken_file_fails_its_registry_as_invalid_and_is_logged_once(
        tmp_path: Path) -> None:
    path = hosts_file(tmp_path, "registry.example", "[host.\n")
    hosts = Hosts([tmp_path])
    with structlog.testing.capture_logs() as logged:
        for _ in range(3):
            with pytest.raises(Failure) as failure:
                hosts.endpoints("registry.example")
            assert failure.value.kind is Kind.INVALID
            assert str(path) in failure.value.detail
    assert [e["event"] for e in logged].count(
        "hosts.toml is broken; its registries fail as invalid until it is fixed") == 1
    path.write_text('server = "https://fixed.example"\n')
    assert hosts.endpoints("registry.example")[-1].host == "fixed.example"


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    hosts_file(tmp_path, "registry.example", "# " + "x" * 300_000 + "\n")
    with pytest.raises(Failure, match="larger than"):
        Hosts([tmp_path]).endpoints("registry.example")
