"""Integration-test harness: a private containerd, private registries, small OCI images and
typed gRPC clients, all on loopback and all under a test's temp dir."""

from tests.harness.containerd import (
    Containerd,
    ContainerdError,
    plain_http_hosts_toml,
    tls_hosts_toml,
)
from tests.harness.cri import CriClient, NativeImages, descriptor
from tests.harness.oci import (
    Image,
    Index,
    build_image,
    build_index,
    delete_manifest,
    delete_tag,
    image_ref,
    multi_platform,
    push,
    push_new,
    resolve,
    sha256_digest,
)
from tests.harness.registry import (
    Registry,
    RegistryError,
    RegistryRequest,
    TlsFiles,
    free_port,
    make_tls_files,
    write_htpasswd,
)

__all__ = [
    "Containerd",
    "ContainerdError",
    "CriClient",
    "Image",
    "Index",
    "NativeImages",
    "Registry",
    "RegistryError",
    "RegistryRequest",
    "TlsFiles",
    "build_image",
    "build_index",
    "delete_manifest",
    "delete_tag",
    "descriptor",
    "free_port",
    "image_ref",
    "make_tls_files",
    "multi_platform",
    "plain_http_hosts_toml",
    "push",
    "push_new",
    "resolve",
    "sha256_digest",
    "tls_hosts_toml",
    "write_htpasswd",
]
