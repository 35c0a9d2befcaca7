"""Credentials from a PullImage request, and the keyed fingerprints nodekeeper keeps."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodekeeper.pull.credentials import ANONYMOUS, Credentials, fingerprint

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REPO = "registry.example/team/app"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- from_fields -----------------------------------------------------------------------------

def test_nothing_given_is_anonymous() -> None:
    assert Credentials.from_fields() is None
    assert Credentials.from_fields(server_address="https://registry.example") is None
    assert Credentials.from_fields(password="only-a-password") is None


def test_username_and_password_win_over_everything() -> None:
    creds = Credentials.from_fields(username="alice", password="pw", auth=b64("bob:other"),
                                    identity_token="idt", server_address="https://r.example")
    assert creds is not None
    assert (creds.username, creds.password) == ("alice", "pw")
    assert creds.server_address == "https://r.example"
    assert creds.secret_material() == "basic\0alice\0pw"


def test_identity_token_alone() -> None:
    creds = Credentials.from_fields(identity_token="idt")
    assert creds is not None
    assert (creds.username, creds.password, creds.identity_token) == ("", "", "idt")
    assert creds.secret_material() == "identity\0idt"


def test_identity_token_wins_over_auth() -> None:
    creds = Credentials.from_fields(identity_token="idt", auth=b64("bob:pw"))
    assert creds is not None
    assert creds.username == ""
    assert creds.secret_material() == "identity\0idt"


@pytest.mark.parametrize(
    ("user", "password"),
    [("bob", "pw"), ("bob", "p:w:with:colons"), ("bob", ""), ("b\u00f6b", "p\u00e4ss")],
)
def test_auth_is_base64_user_colon_password(user: str, password: str) -> None:
    creds = Credentials.from_fields(auth=b64(f"{user}:{password}"))
    assert creds is not None
    assert (creds.username, creds.password) == (user, password)


@pytest.mark.parametrize("auth", ["not base64!", "//8=", "YQ", "YWJj\n"])
def test_bad_base64_auth_is_no_credentials(auth: str) -> None:
    assert Credentials.from_fields(auth=auth) is None


def test_registry_token_is_kept() -> None:
    creds = Credentials.from_fields(registry_token="rt")
    assert creds is not None
    assert creds.registry_token == "rt"
    assert creds.secret_material() == "registry\0rt"


# -- applies_to ------------------------------------------------------------------------------

def test_without_server_address_applies_everywhere() -> None:
    creds = Credentials("u", "p")
    for host in ("registry-1.docker.io", "127.0.0.1:5000", "ghcr.io"):
        assert creds.applies_to(host)


@pytest.mark.parametrize(
    ("server_address", "host", "applies"),
    [
        ("https://registry.example", "registry.example", True),
        ("https://registry.example/v2/", "registry.example", True),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", True),
        ("https://127.0.0.1:5000", "127.0.0.1", False),
        ("https://registry.example", "other.example", False),
        ("https://registry.example", "registry.example:5000", False),
        # Without a scheme the URL host is empty: never matches, as in containerd.
        ("registry.example", "registry.example", False),
        ("127.0.0.1:5000", "127.0.0.1:5000", False),
    ],
)
def test_server_address_host_must_match(server_address: str, host: str, applies: bool) -> None:
    assert Credentials("u", "p", server_address=server_address).applies_to(host) is applies


# -- secrets stay secret ---------------------------------------------------------------------

def test_repr_and_str_hide_secrets() -> None:
    creds = Credentials("alice", "hunter2-pw", "identity-tok", "registry-tok",
                        "https://r.example")
    for shown in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "alice" in shown
        for secret in ("hunter2-pw", "identity-tok", "registry-tok"):
            assert secret not in shown


def test_fingerprint_of_nothing_is_anonymous() -> None:
    assert fingerprint(KEY, REPO, None) == ANONYMOUS
    assert fingerprint(OTHER_KEY, "other/repo", None) == ANONYMOUS


def test_fingerprint_is_stable_and_keyed() -> None:
    creds = Credentials("alice", "pw")
    first = fingerprint(KEY, REPO, creds)
    assert first == fingerprint(KEY, REPO, Credentials("alice", "pw"))
    assert first != fingerprint(OTHER_KEY, REPO, creds)
    assert first != fingerprint(KEY, REPO + "2", creds)
    assert first != ANONYMOUS


def test_fingerprint_ignores_server_address_but_not_the_secret() -> None:
    plain = fingerprint(KEY, REPO, Credentials("alice", "pw"))
    assert plain == fingerprint(KEY, REPO, Credentials("alice", "pw", server_address="https://x"))
    assert plain != fingerprint(KEY, REPO, Credentials("alice", "pw2"))
    assert plain != fingerprint(KEY, REPO, Credentials("alice2", "pw"))


def test_fingerprint_separates_kinds_of_secret() -> None:
    prints = {
        fingerprint(KEY, REPO, Credentials(identity_token="t")),
        fingerprint(KEY, REPO, Credentials(registry_token="t")),
        fingerprint(KEY, REPO, Credentials(username="t")),
    }
    assert len(prints) == 3


texts = st.text(min_size=1, max_size=20)


@given(texts, texts, st.binary(min_size=16, max_size=64), st.binary(min_size=16, max_size=64),
       texts, texts)
def test_fingerprint_properties(user: str, password: str, key: bytes, other_key: bytes,
                                repo: str, other_repo: str) -> None:
    creds = Credentials(user, password)
    value = fingerprint(key, repo, creds)
    assert value == fingerprint(key, repo, creds)
    assert value != ANONYMOUS
    assert len(value) == 64
    assert set(value) <= set("0123456789abcdef")
    if other_key != key:
        assert value != fingerprint(other_key, repo, creds)
    if other_repo != repo:
        assert value != fingerprint(key, other_repo, creds)


@given(st.text(alphabet="ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ!?*", min_size=1, max_size=30))
def test_fingerprint_never_contains_the_password(password: str) -> None:
    # The alphabet has no hex digits, so any occurrence would be a leak, not chance.
    assert password not in fingerprint(KEY, REPO, Credentials("alice", password))
