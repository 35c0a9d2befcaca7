"""Backing registry naming and credentials, without a registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodekeeper.config import BackingConfig, read_credentials
from nodekeeper.errors import SettingsError
from nodekeeper.pull.reference import parse
from nodekeeper.registry import Session
from nodekeeper.registry.backing import Backing
from nodekeeper.registry.copy import Copier

DIGEST = "sha256:" + "c" * 64


def make(**settings: object) -> Backing:
    session = Session()
    return Backing(BackingConfig(url="https://backing.example:5443", **settings),  # type: ignore[arg-type]
                   session, Copier(session))


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("postgres:15", "cache/docker.io/library/postgres"),
        ("127.0.0.1:5000/team/app:1", "cache/127.0.0.1_5000/team/app"),
        ("Registry.Example/app:1", "cache/registry.example/app"),
        ("ghcr.io/org/app@" + DIGEST, "cache/ghcr.io/org/app"),
    ],
)
def test_repository_names(image: str, repository: str) -> None:
    assert make().repository(parse(image)) == repository


def test_prefix_may_be_empty_and_names_carry_the_digest() -> None:
    backing = make(prefix="")
    ref = parse("nginx:1")
    assert backing.repository(ref) == "docker.io/library/nginx"
    assert backing.name(ref, DIGEST) == f"backing.example:5443/docker.io/library/nginx@{DIGEST}"


def test_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "creds.yaml"
    path.write_text("username: node\npassword: s3cret\n")
    creds = read_credentials(str(path))
    assert creds is not None
    assert (creds.username, creds.password) == ("node", "s3cret")
    assert "s3cret" not in repr(creds)
    assert read_credentials("") is None


@pytest.mark.parametrize("text", ["- a\n", "password: only\n", "username: [1]\n", "{"])
def test_bad_credentials_file_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "creds.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        read_credentials(str(path))
    assert str(path) in str(caught.value)
    assert "only" not in str(caught.value)


def test_missing_credentials_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read backing credentials"):
        read_credentials(str(tmp_path / "absent.yaml"))
