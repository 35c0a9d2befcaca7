"""Config loading: every bad value is refused with file, line, key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodekeeper import config
from nodekeeper.errors import SettingsError
from nodekeeper.settings import Document, parse_duration

REPO = Path(__file__).resolve().parents[2]


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return config.load(str(path))


def test_shipped_example_is_valid_and_matches_defaults(tmp_path: Path) -> None:
    loaded = config.load(str(REPO / "etc" / "config.yaml"))
    defaults = config.Config()
    for name in ("listen", "containerd", "state_dir", "policy_file", "metrics_address",
                 "log", "shutdown_grace", "outage_wait", "kubernetes"):
        assert getattr(loaded, name) == getattr(defaults, name), name


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").containerd.namespace == "k8s.io"


def test_values_are_typed(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, """
listen: unix:///tmp/x/cri.sock
containerd: {address: "unix:///tmp/ctd.sock", namespace: other}
metrics_address: "127.0.0.1:9745"
shutdown_grace: 1500ms
log: {level: debug, format: console}
""")
    assert loaded.listen == "/tmp/x/cri.sock"
    assert loaded.containerd.address == "/tmp/ctd.sock"
    assert loaded.containerd.namespace == "other"
    assert loaded.shutdown_grace == pytest.approx(1.5)
    assert loaded.log == config.LogConfig("debug", "console")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: relative.sock\n", ":1: listen: expected an absolute unix socket path"),
        ("nonsense: 1\n", ":1: nonsense: unknown key"),
        ("containerd:\n  adress: /x\n", ":2: containerd.adress: unknown key"),
        ("log:\n  level: loud\n", ":2: log.level: expected one of debug, info"),
        ("shutdown_grace: soon\n", ":1: shutdown_grace: expected a duration"),
        ("shutdown_grace: [1]\n", ":1: shutdown_grace: expected a duration"),
        ("outage_wait: 2s\n", ":1: outage_wait: expected a duration of at most 1s"),
        ("outage_wait: -1\n", ":1: outage_wait: expected a duration of 0 or more"),
        ("containerd: 3\n", ":1: containerd: expected a mapping"),
        ("metrics_address: 9745\n", ":1: metrics_address: expected a string"),
        ("metrics_address: nowhere\n", ":1: metrics_address: expected host:port"),
        ("state_dir: var/lib\n", ":1: state_dir: expected an absolute path"),
        ("- a\n- b\n", ":1: (top level): expected a mapping of settings"),
        ("listen: [\n", "not valid YAML"),
        ("log: {}\nlog: {}\n", ":2: log: key given twice"),
        ("backing:\n  url: http://registry.example\n", ":2: backing.url: plain http is"),
        ("backing:\n  url: ftp://x\n", ":2: backing.url: expected https://host"),
        ("backing:\n  url: https://x/path\n", ":2: backing.url: expected https://host"),
        ("backing:\n  prefix: Cache\n", ":2: backing.prefix: expected lowercase"),
        ("backing:\n  timeout: 0s\n", ":2: backing.timeout: expected a duration above 0"),
        ("backing:\n  max_concurrent_copies: 0\n", ":2: backing.max_concurrent_copies"),
        ("backing:\n  fetch_wait: 2m\n", ":2: backing.fetch_wait: expected a duration of at "
         "most 60s"),
        ("backing:\n  fetch_wait: -1\n", ":2: backing.fetch_wait: expected a duration of 0"),
        ("backing:\n  credentials_file: creds.yaml\n", ":2: backing.credentials_file: expected"
         " an absolute path"),
        ("kubernetes:\n  events: auto\n", ":2: kubernetes.events: expected true or false"),
        ("kubernetes:\n  kubeconfig: kubelet.conf\n", ":2: kubernetes.kubeconfig: expected an "
         "absolute path"),
        ("kubernetes:\n  kubeconfig: /nonexistent/kubelet.conf\n", ":2: kubernetes.kubeconfig:"
         " /nonexistent/kubelet.conf: cannot read"),
        ("kubernetes:\n  node_name: Node_A\n", ":2: kubernetes.node_name: expected a node name"),
        ("kubernetes:\n  event_decisions: [fallback, pulled]\n", ":2: kubernetes.event_decisions"
         "[1]: expected one of fallback, backing-fallback, updated, behind, got 'pulled'"),
        ("kubernetes:\n  timeout: 0s\n", ":2: kubernetes.timeout: expected a duration above 0"),
        ("kubernetes:\n  node: a\n", ":2: kubernetes.node: unknown key"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_text(tmp_path, text)
    assert str(tmp_path / "config.yaml") in str(caught.value)
    assert expected in str(caught.value)


def test_backing_settings(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, """
backing:
  url: http://registry.internal:5000/
  allow_http: true
  prefix: nodes/cache
  copy_timeout: 5m
""")
    assert loaded.backing.enabled
    assert loaded.backing.url == "http://registry.internal:5000"
    assert loaded.backing.prefix == "nodes/cache"
    assert loaded.backing.copy_timeout == 300
    assert load_text(tmp_path, "backing:\n  url: http://127.0.0.1:5000\n").backing.enabled
    assert not config.Config().backing.enabled


@pytest.mark.parametrize(("text", "fetch_wait", "cluster"), [
    ("", 5.0, True),
    ("  fetch_wait: 0s\n", 0.0, True),
    ("  fetch_wait: 1500ms\n", 1.5, True),
    ("  write: false\n", 5.0, False),     # leases and shared checks need both
    ("  read: false\n", 5.0, False),
])
def test_the_cluster_shares_through_a_backing_read_and_written(
        tmp_path: Path, text: str, fetch_wait: float, cluster: bool) -> None:
    loaded = load_text(tmp_path, "backing:\n  url: http://127.0.0.1:5000\n" + text).backing
    assert (loaded.fetch_wait, loaded.cluster) == (pytest.approx(fetch_wait), cluster)
    assert not config.Config().backing.cluster


def test_backing_credentials_are_read_with_the_config(tmp_path: Path) -> None:
    creds = tmp_path / "backing.yaml"
    creds.write_text("username: node\npassword: s3cret\n")
    loaded = load_text(tmp_path, f"backing:\n  url: http://127.0.0.1:5000\n"
                                 f"  credentials_file: {creds}\n")
    assert loaded.backing.credentials is not None
    assert loaded.backing.credentials.username == "node"
    assert "s3cret" not in repr(loaded)


@pytest.mark.parametrize("content", [None, "password: only\n", "username: [1]\n", "{",
                                     "username: node\npassword: 12345\n"])
def test_a_bad_backing_credentials_file_fails_the_config(tmp_path: Path,
                                                         content: str | None) -> None:
    # check-config loads the same way: an unreadable file fails it, not the first pull.
    creds = tmp_path / "backing.yaml"
    if content is not None:
        creds.write_text(content)
    with pytest.raises(SettingsError) as caught:
        load_text(tmp_path, f"backing:\n  url: http://127.0.0.1:5000\n"
                            f"  credentials_file: {creds}\n")
    message = str(caught.value)
    assert ":3: backing.credentials_file:" in message
    assert str(creds) in message
    assert "only" not in message
    assert "12345" not in message


def test_hosts_dir_takes_containerds_forms(tmp_path: Path) -> None:
    for text, expected in [
        ("/etc/containerd/certs.d", ("/etc/containerd/certs.d",)),
        ("/etc/containerd/certs.d:/etc/docker/certs.d",
         ("/etc/containerd/certs.d", "/etc/docker/certs.d")),
        ("[/a, /b]", ("/a", "/b")),
    ]:
        loaded = load_text(tmp_path, f"containerd:\n  hosts_dir: {text}\n")
        assert loaded.containerd.hosts_dir == expected
    for bad in ("relative/dir", "[]", "[/a, 3]", "/a:relative"):
        with pytest.raises(SettingsError, match=r"containerd\.hosts_dir"):
            load_text(tmp_path, f"containerd:\n  hosts_dir: {bad}\n")


def test_kubernetes_settings(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""
current-context: node
contexts: [{name: node, context: {cluster: c, user: u}}]
clusters: [{name: c, cluster: {server: "https://10.0.0.1:6443"}}]
users: [{name: u, user: {token: x}}]
""")
    loaded = load_text(tmp_path, f"""
kubernetes:
  kubeconfig: {kubeconfig}
  node_name: worker-1.example
  event_decisions: [fallback, updated, fallback]
  timeout: 2s
""")
    assert loaded.kubernetes == config.KubernetesConfig(
        events=True, kubeconfig=str(kubeconfig), node_name="worker-1.example",
        event_decisions=("fallback", "updated"), timeout=2.0)
    defaults = config.Config().kubernetes
    assert (defaults.events, defaults.kubeconfig) == (True, "")
    assert defaults.event_decisions == ("fallback", "backing-fallback")


def test_kubeconfig_is_not_read_while_events_are_off(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "kubernetes:\n  events: false\n  kubeconfig: /nonexistent\n")
    assert not loaded.kubernetes.events


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        config.load(str(tmp_path / "absent.yaml"))


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: /a.sock\nlog: {level: error}\nmetrics_address: '127.0.0.1:1'\n")
    flags = config.Overrides(listen="unix:///b.sock", containerd="/c.sock", log_level="debug",
                             metrics_address="")
    loaded = config.load(str(path), flags)
    assert loaded.listen == "/b.sock"
    assert loaded.containerd.address == "/c.sock"
    assert loaded.log.level == "debug"
    assert loaded.metrics_address == ""


def test_bad_flag_is_an_error() -> None:
    with pytest.raises(SettingsError, match="command line"):
        config.load(None, config.Overrides(listen="relative"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1w", "-1s", "1 s5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_error_on_list_item_points_at_its_line() -> None:
    doc = Document("p.yaml", "rules:\n  - a: 1\n  - b: 2\n")
    section = list(doc.root().sections("rules"))[1]
    assert str(section.error("b", "bad")) == "p.yaml:3: rules[1].b: bad"
