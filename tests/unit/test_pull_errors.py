"""containerd's answers to a failed pull, classified into the failure kinds a probe uses."""

from __future__ import annotations

import pytest

from nodekeeper.containerd.client import classify_pull_error
from nodekeeper.errors import ContainerdError

PULL = 'failed to pull and unpack image "{0}": failed to resolve reference "{0}": '
LOCAL = "127.0.0.1:5000/team/app:1.0"
HUB = "docker.io/library/postgres:15"


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (PULL.format(LOCAL) + "unexpected status from HEAD request to "
         "http://127.0.0.1:5000/v2/team/app/manifests/1.0: 429 Too Many Requests",
         "rate_limited"),
        (PULL.format(HUB) + "unexpected status from HEAD request to "
         "https://registry-1.docker.io/v2/library/postgres/manifests/15: 401 Unauthorized",
         "unauthorized"),
        (PULL.format(LOCAL) + "unexpected status from HEAD request to "
         "http://127.0.0.1:5000/v2/team/app/manifests/1.0: 403 Forbidden", "unauthorized"),
        (PULL.format(HUB) + "failed to fetch anonymous token: unexpected status from GET "
         "request to https://auth.docker.io/token?scope=repository%3Alibrary%2Fpostgres%3Apull"
         "&service=registry.docker.io: 401 Unauthorized", "unauthorized"),
        (PULL.format(LOCAL) + f"{LOCAL}: not found", "not_found"),
        (PULL.format(LOCAL) + "unexpected status from HEAD request to "
         "http://127.0.0.1:5000/v2/team/app/manifests/1.0: 500 Internal Server Error",
         "server_error"),
        (PULL.format(LOCAL) + "unexpected status from HEAD request to "
         "http://127.0.0.1:5000/v2/team/app/manifests/1.0: 503 Service Unavailable",
         "server_error"),
        (PULL.format(LOCAL) + "failed to do request: Head "
         '"http://127.0.0.1:5000/v2/team/app/manifests/1.0": '
         "dial tcp 127.0.0.1:5000: connect: connection refused", "unreachable"),
        (PULL.format("registry.example/app:1") + "failed to do request: Head "
         '"https://registry.example/v2/app/manifests/1": dial tcp: lookup registry.example '
         "on 127.0.0.53:53: no such host", "unreachable"),
        (PULL.format(LOCAL) + "failed to do request: Head "
         '"http://127.0.0.1:5000/v2/team/app/manifests/1.0": EOF', "unreachable"),
        (PULL.format(LOCAL) + "failed to do request: Head "
         '"http://127.0.0.1:5000/v2/team/app/manifests/1.0": read tcp '
         "127.0.0.1:41234->127.0.0.1:5000: read: connection reset by peer", "unreachable"),
        (PULL.format(LOCAL) + "failed to do request: Head "
         '"http://127.0.0.1:5000/v2/team/app/manifests/1.0": context deadline exceeded',
         "timeout"),
    ],
)
def test_classify_pull_error(message: str, kind: str) -> None:
    assert classify_pull_error(ContainerdError("UNKNOWN", message)) == kind


@pytest.mark.parametrize(
    "message",
    [
        PULL.format("registry.example:4043/app:1") + 'failed to do request: Head '
        '"https://registry.example:4043/v2/app/manifests/1": dial tcp 10.0.0.7:4043: '
        "connect: connection refused",
        'failed to pull and unpack image "docker.io/library/postgres:15": failed to copy: '
        "httpReadSeeker: failed open: failed to do request: Get \"https://production."
        "cloudflare.docker.com/registry-v2/docker/registry/v2/blobs/sha256/7a/7a401b2c/data"
        '": dial tcp: lookup production.cloudflare.docker.com: no such host',
    ],
)
def test_classify_pull_error_ignores_numbers_inside_ports_and_digests(message: str) -> None:
    assert classify_pull_error(ContainerdError("UNKNOWN", message)) == "unreachable"


def test_classify_pull_access_denied_is_unauthorized() -> None:
    message = (PULL.format("docker.io/library/private:latest") + "pull access denied, "
               "repository does not exist or may require authorization: server message: "
               "insufficient_scope: authorization failed")
    assert classify_pull_error(ContainerdError("UNKNOWN", message)) == "unauthorized"


def test_not_found_code_is_not_found_whatever_the_words() -> None:
    assert classify_pull_error(ContainerdError("NOT_FOUND", "something odd")) == "not_found"


def test_unknown_words_are_a_server_error() -> None:
    assert classify_pull_error(ContainerdError("UNKNOWN", "something odd")) == "server_error"
