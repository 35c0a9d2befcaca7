"""The daemon's settings: read once from config.yaml, validated, then plain typed values.

Command-line flags override the file. Nothing here is re-parsed per request: durations
are seconds, addresses are socket paths.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nodekeeper.addresses import is_loopback, split_host_port
from nodekeeper.errors import SettingsError
from nodekeeper.kube import kubeconfig
from nodekeeper.pull.credentials import Credentials
from nodekeeper.pull.values import Decision
from nodekeeper.settings import Document, Section

DEFAULT_PATH = "/etc/nodekeeper/config.yaml"
CREDENTIALS_LIMIT = 64 * 1024
# The documented example, every comment included, is under 4 KiB.
MAX_CONFIG_BYTES = 256 << 10
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
_PREFIX = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# outage_wait: a pull waits this long at most for a registry endpoint in an outage
# episode; well under any sensible probe_timeout, or the episode would save little.
MAX_FETCH_WAIT = 60.0  # a pull waits for another node's fetch no longer than this
MAX_OUTAGE_WAIT = 1.0
# What can be told on the pod as a Kubernetes Event: the PullImage decisions shown on
# pods, and BEHIND, a running container whose tag has a newer digest (host/behindtag.py).
BEHIND = "behind"
EVENT_DECISIONS = (*(decision.value for decision in Decision.shown_on_pods()), BEHIND)


@dataclass(frozen=True)
class ContainerdConfig:
    address: str = "/run/containerd/containerd.sock"
    namespace: str = "k8s.io"
    # containerd's CRI registry config_path: roots searched in order (registry/hosts.py).
    hosts_dir: tuple[str, ...] = ("/etc/containerd/certs.d",)


@dataclass(frozen=True)
class BackingConfig:
    """The cluster-wide registry that keeps a copy of every image a node pulled."""

    url: str = ""  # empty: no backing registry
    prefix: str = "cache"
    credentials_file: str = ""
    # Read from credentials_file when the config is loaded (check-config reads it too).
    credentials: Credentials | None = None
    ca: str = ""
    allow_http: bool = False
    read: bool = True
    write: bool = True
    max_concurrent_copies: int = 2
    timeout: float = 2.0
    copy_timeout: float = 1800.0
    # The longest a pull waits for another node's fetch of a digest backing lacks, before
    # fetching it upstream itself (0: every node fetches for itself).
    fetch_wait: float = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def cluster(self) -> bool:
        """The nodes share leases on fetches and checks of tags through backing."""
        return self.enabled and self.read and self.write


@dataclass(frozen=True)
class KubernetesConfig:
    """Events on the pod about answers upstream did not confirm."""

    events: bool = True
    # Empty: the kubelet's own (kubeconfig.DEFAULT_PATH), used when readable. A path given
    # here must be readable and valid.
    kubeconfig: str = ""
    node_name: str = ""  # empty: the host name, lowercased, as the kubelet takes it
    event_decisions: tuple[Decision, ...] = (Decision.FALLBACK, Decision.BACKING_FALLBACK)
    behind_events: bool = False  # `behind` among event_decisions
    timeout: float = 5.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    listen: str = "/run/nodekeeper/cri.sock"
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    state_dir: str = "/var/lib/nodekeeper"
    policy_file: str = "/etc/nodekeeper/policy.yaml"
    metrics_address: str = ""
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_grace: float = 10.0
    # The longest a pull waits for a registry endpoint in an outage episode (probe.py).
    outage_wait: float = 0.2
    backing: BackingConfig = field(default_factory=BackingConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    # Where the settings came from, for messages; empty when no file was read.
    source: str = ""


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line; None means 'take the file's value'."""

    listen: str | None = None
    containerd: str | None = None
    state_dir: str | None = None
    policy_file: str | None = None
    metrics_address: str | None = None
    log_level: str | None = None
    log_format: str | None = None


def socket_path(address: str) -> str:
    """Accept 'unix:///run/x.sock', 'unix:/run/x.sock' or '/run/x.sock'; return the path."""
    path = address
    if path.startswith("unix://"):
        path = path[len("unix://"):]
    elif path.startswith("unix:"):
        path = path[len("unix:"):]
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute unix socket path, got {address!r}")
    return os.path.normpath(path)


def load(path: str | None = None, overrides: Overrides | None = None) -> Config:
    """Read and validate the config file, then apply command-line overrides.

    With path None the default file is read when it exists; a path given explicitly
    must exist.
    """
    if path is None and not os.path.exists(DEFAULT_PATH):
        config = Config()
    else:
        config = parse(Document.read(path or DEFAULT_PATH, MAX_CONFIG_BYTES))
    return _apply(config, overrides or Overrides())


def parse(doc: Document) -> Config:
    root = doc.root()
    defaults = Config()
    ctd = root.section("containerd")
    containerd = ContainerdConfig(
        address=_socket(ctd, "address", defaults.containerd.address),
        namespace=_nonempty(ctd, "namespace", defaults.containerd.namespace),
        hosts_dir=_paths(ctd, "hosts_dir", defaults.containerd.hosts_dir),
    )
    ctd.finish()
    log_section = root.section("log")
    log = LogConfig(
        level=log_section.choice("level", LOG_LEVELS, defaults.log.level),
        format=log_section.choice("format", LOG_FORMATS, defaults.log.format),
    )
    log_section.finish()
    backing = _backing(root.section("backing"))
    kubernetes = _kubernetes(root.section("kubernetes"))
    config = Config(
        listen=_socket(root, "listen", defaults.listen),
        containerd=containerd,
        state_dir=_absolute(root, "state_dir", defaults.state_dir),
        policy_file=_absolute(root, "policy_file", defaults.policy_file),
        metrics_address=_host_port(root, "metrics_address", defaults.metrics_address),
        log=log,
        shutdown_grace=root.duration("shutdown_grace", defaults.shutdown_grace),
        outage_wait=_outage_wait(root, defaults.outage_wait),
        backing=backing,
        kubernetes=kubernetes,
        source=doc.path,
    )
    root.finish()
    return config


def _outage_wait(section: Section, default: float) -> float:
    value = section.duration("outage_wait", default)
    if value > MAX_OUTAGE_WAIT:
        raise section.error("outage_wait", f"expected a duration of at most "
                                           f"{MAX_OUTAGE_WAIT:g}s, got {value:g}s")
    return value


def _backing(section: Section) -> BackingConfig:
    default = BackingConfig()
    url = section.string("url", default.url).rstrip("/")
    allow_http = section.boolean("allow_http", default.allow_http)
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise section.error("url", f"expected https://host[:port], got {url!r}")
        if parts.scheme == "http" and not (allow_http or is_loopback(parts.netloc)):
            raise section.error("url", "plain http is allowed only for loopback registries "
                                       "or with allow_http: true")
    prefix = section.string("prefix", default.prefix).strip("/")
    if prefix and not _PREFIX.match(prefix):
        raise section.error("prefix", f"expected lowercase path segments, got {prefix!r}")
    credentials_file = _absolute(section, "credentials_file", "", optional=True)
    try:
        credentials = read_credentials(credentials_file)
    except SettingsError as exc:
        raise section.error("credentials_file", str(exc)) from None
    backing = BackingConfig(
        url=url,
        prefix=prefix,
        credentials_file=credentials_file,
        credentials=credentials,
        ca=_absolute(section, "ca", "", optional=True),
        allow_http=allow_http,
        read=section.boolean("read", default.read),
        write=section.boolean("write", default.write),
        max_concurrent_copies=section.integer("max_concurrent_copies",
                                              default.max_concurrent_copies, minimum=1),
        timeout=section.duration("timeout", default.timeout),
        copy_timeout=section.duration("copy_timeout", default.copy_timeout),
        fetch_wait=section.duration("fetch_wait", default.fetch_wait),
    )
    if backing.timeout <= 0:
        raise section.error("timeout", "expected a duration above 0")
    if backing.fetch_wait > MAX_FETCH_WAIT:
        raise section.error("fetch_wait", f"expected a duration of at most "
                                          f"{MAX_FETCH_WAIT:g}s, got {backing.fetch_wait:g}s")
    section.finish()
    return backing


def read_credentials(path: str) -> Credentials | None:
    """`username:` and `password:` from a YAML file readable by root only, read as
    boundedly as any settings file. Errors never quote the file: it holds a secret."""
    if not path:
        return None
    try:
        document = Document.read(path, CREDENTIALS_LIMIT).value
    except SettingsError:
        raise SettingsError(f"{path}: cannot read backing credentials (unreadable, larger "
                            f"than {CREDENTIALS_LIMIT} bytes, or not valid YAML without "
                            "anchors)") from None
    if (not isinstance(document, dict) or not isinstance(document.get("username"), str)
            or not document["username"]
            or not isinstance(document.get("password", ""), str)):
        raise SettingsError(f"{path}: expected 'username:' and 'password:' strings")
    return Credentials(document["username"], document.get("password", ""))


def _kubernetes(section: Section) -> KubernetesConfig:
    default = KubernetesConfig()
    events = section.boolean("events", default.events)
    path = _absolute(section, "kubeconfig", default.kubeconfig, optional=True)
    node_name = section.string("node_name", default.node_name)
    if node_name and not _NODE_NAME.match(node_name):
        raise section.error("node_name", f"expected a node name (a lowercase DNS name), "
                                         f"got {node_name[:80]!r}")
    named = section.strings("event_decisions",
                            [decision.value for decision in default.event_decisions])
    for index, decision in enumerate(named):
        if decision not in EVENT_DECISIONS:
            raise section.doc.error((*section.key, "event_decisions", index),
                                    f"expected one of {', '.join(EVENT_DECISIONS)}, "
                                    f"got {decision[:80]!r}")
    decisions = [Decision(decision) for decision in named if decision != BEHIND]
    behind = BEHIND in named
    timeout = section.duration("timeout", default.timeout)
    if timeout <= 0:
        raise section.error("timeout", "expected a duration above 0")
    section.finish()
    if events and path:
        try:
            kubeconfig.load(path)
        except kubeconfig.KubeconfigError as exc:
            raise section.error("kubeconfig", str(exc)) from None
    return KubernetesConfig(events=events, kubeconfig=path, node_name=node_name,
                            event_decisions=tuple(dict.fromkeys(decisions)), behind_events=behind,
                            timeout=timeout)


def _apply(config: Config, flags: Overrides) -> Config:
    try:
        listen = socket_path(flags.listen) if flags.listen is not None else config.listen
        address = (socket_path(flags.containerd) if flags.containerd is not None
                   else config.containerd.address)
        if flags.metrics_address:
            split_host_port(flags.metrics_address)
    except ValueError as exc:
        raise SettingsError(f"command line: {exc}") from None
    return dataclasses.replace(
        config,
        listen=listen,
        containerd=dataclasses.replace(config.containerd, address=address),
        state_dir=flags.state_dir or config.state_dir,
        policy_file=flags.policy_file or config.policy_file,
        metrics_address=(config.metrics_address if flags.metrics_address is None
                         else flags.metrics_address),
        log=LogConfig(level=flags.log_level or config.log.level,
                      format=flags.log_format or config.log.format),
    )


def _socket(section: Section, name: str, default: str) -> str:
    value = section.string(name, default)
    try:
        return socket_path(value)
    except ValueError as exc:
        raise section.error(name, str(exc)) from None


def _absolute(section: Section, name: str, default: str, optional: bool = False) -> str:
    value = section.string(name, default)
    if optional and not value:
        return value
    if not value.startswith("/"):
        raise section.error(name, f"expected an absolute path, got {value!r}")
    return value


def _paths(section: Section, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of absolute paths, or one string of them joined by ':' as containerd's
    config_path is written."""
    value = section.raw(name, list(default))
    if isinstance(value, str):
        value = [part for part in value.split(":") if part]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise section.error(name, "expected a path, a list of paths, or paths joined by ':'")
    for path in value:
        if not path.startswith("/"):
            raise section.error(name, f"expected absolute paths, got {path!r}")
    return tuple(value)


def _nonempty(section: Section, name: str, default: str) -> str:
    value = section.string(name, default)
    if not value:
        raise section.error(name, "must not be empty")
    return value


def _host_port(section: Section, name: str, default: str) -> str:
    value = section.string(name, default)
    if value:
        try:
            split_host_port(value)
        except ValueError as exc:
            raise section.error(name, str(exc)) from None
    return value
