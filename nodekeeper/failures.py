"""The one vocabulary for what went wrong outside nodekeeper.

Every failure of a registry (upstream or backing), of a token service, or of containerd's
own pull is one `Kind`. The kind decides what PullImage does next (policy `fallback_on`,
the security rule), and it is the value of the `kind` label and log field:

    unreachable   no connection (refused, reset, DNS, TLS)
    timeout       no answer within the deadline that applied (the message names it)
    server_error  5xx
    rate_limited  429, or Docker Hub's ratelimit-remaining of 0 when a pull is needed
    not_found     404: the tag, manifest, blob or repository is gone
    unauthorized  401/403 after trying the credentials that apply
    invalid       an answer that makes no sense (malformed, oversized, wrong digest,
                  a broken hosts.toml); also anything not yet classified

`Failure` carries a kind and a message that is safe to show: it names hosts, paths and
digests, never credentials or tokens; and, when the registry endpoint was not asked again
because it is in an outage episode (registry/outage.py), that endpoint.
"""

from __future__ import annotations

import enum


class Kind(str, enum.Enum):
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    INVALID = "invalid"

    @property
    def unavailable(self) -> bool:
        """The registry did not answer at all: the kubelet says RegistryUnavailable."""
        return self in (Kind.UNREACHABLE, Kind.TIMEOUT)

    def __str__(self) -> str:
        return self.value


class Failure(Exception):
    """Something outside nodekeeper failed in a known way."""

    def __init__(self, kind: Kind, detail: str, outage: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.outage = outage
