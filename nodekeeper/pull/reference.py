"""Image references, parsed and normalized exactly as containerd's CRI plugin does.

The kubelet sends the image as written in the pod (`postgres:15`, `ghcr.io/a/b@sha256:…`).
containerd normalizes it: a name without a domain gets `docker.io`, a single path
component on docker.io gets `library/`, a missing tag becomes `latest`, and a reference
with both a tag and a digest keeps only the digest. Policy rules match the normalized
name, so `postgres` and `docker.io/library/postgres` are the same image.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
MAX_NAME_LENGTH = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(rf"^{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # ASCII only, as in Go
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class InvalidReference(ValueError):
    """The string is not an image reference; the message says why."""


@dataclass(frozen=True)
class Reference:
    """A normalized reference: domain, repository path, and a tag or a digest."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """`docker.io/library/postgres`: what policy rules match and containerd records."""
        return f"{self.domain}/{self.path}"

    @property
    def pinned(self) -> bool:
        """A digest reference names immutable content: there is nothing to check upstream."""
        return bool(self.digest)

    def __str__(self) -> str:
        return (f"{self.repository}@{self.digest}" if self.digest
                else f"{self.repository}:{self.tag}")

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, digest=digest)


def is_image_id(text: str) -> bool:
    """`sha256:<64 hex>`: an image ID (config digest), not a name."""
    return bool(_SHA256.match(text))


# A node's pods name a few hundred references, and every PullImage parses one: remembered,
# the parse is a dictionary lookup. Only valid references are kept (an exception is not),
# and a valid one is at most a few hundred characters, so the cache stays under 2 MB.
@functools.lru_cache(maxsize=4096)
def parse(text: str) -> Reference:
    """Parse and normalize like containerd (distribution's ParseDockerRef)."""
    if not text:
        raise InvalidReference("image reference is empty")
    if text != text.strip() or any(ch.isspace() for ch in text):
        raise InvalidReference(f"image reference {text!r} contains white space")
    remainder, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidReference(f"invalid digest {digest!r} in {text!r}")
    algorithm, _, encoded = digest.partition(":")
    if digest and algorithm not in _DIGEST_HEX_LENGTH:
        raise InvalidReference(f"unsupported digest algorithm {algorithm!r} in {text!r}")
    if digest and (len(encoded) != _DIGEST_HEX_LENGTH[algorithm] or encoded != encoded.lower()):
        raise InvalidReference(f"invalid {algorithm} digest {digest!r}: expected "
                               f"{_DIGEST_HEX_LENGTH[algorithm]} lowercase hex characters")
    name, tag = remainder, ""
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        name, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {text!r}")
    if not name:
        raise InvalidReference(f"image reference {text!r} has no repository name")
    if _HEX64.match(name):
        raise InvalidReference(
            f"invalid repository name {name!r}: a 64-character hex string is an image ID"
        )
    domain, path = _split_domain(name)
    if not _DOMAIN.match(domain):
        raise InvalidReference(f"invalid registry host {domain!r} in {text!r}")
    if path.lower() != path:
        raise InvalidReference(f"repository name {path!r} must be lowercase")
    for component in path.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise InvalidReference(f"invalid repository path component {component!r} in {text!r}")
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if digest:
        return Reference(domain, path, digest=digest)
    return Reference(domain, path, tag=tag or "latest")


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    is_domain = slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_domain:
        domain, path = DOCKER_HUB, name
    else:
        domain, path = first, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path
