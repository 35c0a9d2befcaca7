"""Reference parsing: normalized as containerd (distribution's ParseDockerRef) normalizes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nodekeeper.pull.reference import (
    DOCKER_HUB,
    MAX_NAME_LENGTH,
    InvalidReference,
    Reference,
    is_image_id,
    parse,
)

DIGEST = "sha256:" + hashlib.sha256(b"manifest").hexdigest()
OTHER_DIGEST = "sha256:" + hashlib.sha256(b"other").hexdigest()


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("postgres", "docker.io", "library/postgres", "latest", ""),
        ("postgres:15", "docker.io", "library/postgres", "15", ""),
        ("postgres:15.4-alpine", "docker.io", "library/postgres", "15.4-alpine", ""),
        ("user/app", "docker.io", "user/app", "latest", ""),
        ("user/app:v1", "docker.io", "user/app", "v1", ""),
        ("docker.io/postgres", "docker.io", "library/postgres", "latest", ""),
        ("docker.io/library/postgres:15", "docker.io", "library/postgres", "15", ""),
        ("index.docker.io/x", "docker.io", "library/x", "latest", ""),
        ("index.docker.io/user/x:1", "docker.io", "user/x", "1", ""),
        ("localhost/a", "localhost", "a", "latest", ""),
        ("localhost:5000/a", "localhost:5000", "a", "latest", ""),
        ("127.0.0.1:5000/a/b:tag", "127.0.0.1:5000", "a/b", "tag", ""),
        ("[::1]:5000/a:1", "[::1]:5000", "a", "1", ""),
        ("ghcr.io/a/b", "ghcr.io", "a/b", "latest", ""),
        (f"ghcr.io/a/b@{DIGEST}", "ghcr.io", "a/b", "", DIGEST),
        (f"postgres@{DIGEST}", "docker.io", "library/postgres", "", DIGEST),
        # A tag and a digest: the tag is dropped, only the digest is used.
        (f"ghcr.io/a/b:1.0@{DIGEST}", "ghcr.io", "a/b", "", DIGEST),
        # Upper case in the first segment makes it a domain, as in distribution.
        ("Registry/app", "Registry", "app", "latest", ""),
        # One segment with a port but no slash: a docker.io name with a tag.
        ("localhost:5000", "docker.io", "library/localhost", "5000", ""),
        ("ghcr.io/a_b__c-d--e.f/x", "ghcr.io", "a_b__c-d--e.f/x", "latest", ""),
    ],
)
def test_normalization(text: str, domain: str, path: str, tag: str, digest: str) -> None:
    ref = parse(text)
    assert ref == Reference(domain, path, tag, digest)
    assert ref.repository == f"{domain}/{path}"
    assert ref.pinned is bool(digest)


def test_str_is_the_normalized_form() -> None:
    assert str(parse("postgres")) == "docker.io/library/postgres:latest"
    assert str(parse(f"ghcr.io/a/b:1@{DIGEST}")) == f"ghcr.io/a/b@{DIGEST}"


def test_with_digest_drops_the_tag() -> None:
    ref = parse("ghcr.io/a/b:1")
    pinned = ref.with_digest(DIGEST)
    assert (pinned.repository, pinned.tag, pinned.digest) == (ref.repository, "", DIGEST)
    assert pinned.pinned
    assert not ref.pinned


@pytest.mark.parametrize(
    "text",
    [
        "",
        " postgres",
        "postgres ",
        "post gres",
        "postgres:\t15",
        "postgres\n",
        "Postgres",
        "docker.io/library/Postgres",
        "ghcr.io/Org/app",
        "ghcr.io/org/app:",
        "postgres:-15",
        "postgres:.15",
        "postgres:" + "a" * 129,
        "postgres:a/b",
        "postgres@sha256:abc",
        "postgres@sha256:" + "A" * 64,
        "postgres@sha256:" + "0" * 63,
        "postgres@sha256:" + "0" * 65,
        "postgres@notadigest",
        "postgres@:" + "0" * 64,
        "0" * 64,
        hashlib.sha256(b"x").hexdigest(),
        ":15",
        "@" + DIGEST,
        "/app",
        "app/",
        "a//b",
        "ghcr.io/a/-b",
        "ghcr.io/a/b-",
        "ghcr.io/a/b___c",
        "ghcr.io/a/b..c",
        "-registry.example/app",
        "registry-.example/app",
        "registry.example:port/app",
        "r\u00e9gistry.example/app",
        "ghcr.io/caf\u00e9",
    ],
)
def test_invalid_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse(text)


def test_error_messages_say_why() -> None:
    with pytest.raises(InvalidReference, match="empty"):
        parse("")
    with pytest.raises(InvalidReference, match="white space"):
        parse("postgres 15")
    with pytest.raises(InvalidReference, match="lowercase"):
        parse("ghcr.io/Org/app")
    with pytest.raises(InvalidReference, match="image ID"):
        parse("a" * 64)


def test_name_length_limit_counts_the_normalized_name() -> None:
    domain = "registry.example"
    fits = "a" * (MAX_NAME_LENGTH - len(domain) - 1)
    assert parse(f"{domain}/{fits}").repository == f"{domain}/{fits}"
    with pytest.raises(InvalidReference, match="longer"):
        parse(f"{domain}/{fits}a")
    # On docker.io the implicit "library/" counts too.
    hub_room = MAX_NAME_LENGTH - len(f"{DOCKER_HUB}/library/")
    assert len(parse("b" * hub_room).repository) == MAX_NAME_LENGTH
    with pytest.raises(InvalidReference):
        parse("b" * (hub_room + 1))


def test_tag_length_limit() -> None:
    assert parse("app:" + "t" * 128).tag == "t" * 128
    with pytest.raises(InvalidReference):
        parse("app:" + "t" * 129)


def test_other_digest_algorithms_with_enough_hex_parse() -> None:
    digest = "sha512:" + hashlib.sha512(b"m").hexdigest()
    assert parse(f"app@{digest}").digest == digest


@pytest.mark.parametrize("tag", ["\u00e9t\u00e9", "\u0661\u0662", "v\uff11"])
def test_non_ascii_tags_are_refused(tag: str) -> None:
    with pytest.raises(InvalidReference):
        parse(f"postgres:{tag}")


def test_is_image_id() -> None:
    assert is_image_id(DIGEST)
    assert not is_image_id(DIGEST.upper())
    assert not is_image_id(DIGEST[:-1])
    assert not is_image_id(DIGEST.removeprefix("sha256:"))
    assert not is_image_id("postgres:15")


# -- properties ------------------------------------------------------------------------------

_LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_alnum = st.text(alphabet=_LOWER_ALNUM, min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    pieces = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 2))):
        pieces += [draw(_separator), draw(_alnum)]
    component = "".join(pieces)
    assume(len(component) != 64)  # a lone 64-char component could be all hex
    return component


_DOMAIN_ALNUM = _LOWER_ALNUM + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_domain_component = st.one_of(
    st.text(alphabet=_DOMAIN_ALNUM, min_size=1, max_size=1),
    st.tuples(st.text(alphabet=_DOMAIN_ALNUM, min_size=1, max_size=1),
              st.text(alphabet=_DOMAIN_ALNUM + "-", max_size=6),
              st.text(alphabet=_DOMAIN_ALNUM, min_size=1, max_size=1)).map("".join),
)


@st.composite
def domains(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["dotted", "localhost", "ipv4", "ported"]))
    if kind == "localhost":
        base = "localhost"
    elif kind == "ipv4":
        base = ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    else:
        labels = draw(st.lists(_domain_component, min_size=2, max_size=3))
        base = ".".join(labels)
    if kind == "ported" or draw(st.booleans()):
        base += f":{draw(st.integers(1, 65535))}"
    return base


_TAG_START = _DOMAIN_ALNUM + "_"
tags = st.tuples(st.text(alphabet=_TAG_START, min_size=1, max_size=1),
                 st.text(alphabet=_TAG_START + ".-", max_size=20)).map("".join)
digests = st.binary(min_size=1, max_size=16).map(
    lambda data: "sha256:" + hashlib.sha256(data).hexdigest()
)


@st.composite
def references(draw: st.DrawFn) -> str:
    parts = draw(st.lists(path_components(), min_size=1, max_size=3))
    path = "/".join(parts)
    domain = draw(st.one_of(st.none(), domains(), st.sampled_from(
        ["docker.io", "index.docker.io"])))
    # Without a domain, a first segment that looks like one would be taken for one.
    assume(domain is not None or len(parts) == 1
           or ("." not in parts[0] and parts[0] != "localhost"))
    text = path if domain is None else f"{domain}/{path}"
    if draw(st.booleans()):
        text += ":" + draw(tags)
    if draw(st.booleans()):
        text += "@" + draw(digests)
    return text


@given(references())
def test_parse_is_idempotent(text: str) -> None:
    ref = parse(text)
    again = parse(str(ref))
    assert again == ref
    assert str(again) == str(ref)


@given(references())
def test_normalized_reference_invariants(text: str) -> None:
    ref = parse(text)
    assert ref.domain
    assert ref.path
    assert ref.repository.startswith(ref.domain + "/")
    assert bool(ref.tag) != bool(ref.digest)  # exactly one of them
    assert ref.pinned == bool(ref.digest)
    assert ref.domain != "index.docker.io"
    if ref.domain == DOCKER_HUB:
        assert "/" in ref.path
    if "@" in text:
        assert ref.digest == text.rsplit("@", 1)[1]
    elif ":" not in text.rsplit("/", 1)[-1]:
        assert ref.tag == "latest"


@given(path_components(), st.one_of(st.none(), tags))
def test_name_without_domain_goes_to_docker_hub_library(component: str, tag: str | None) -> None:
    text = component if tag is None else f"{component}:{tag}"
    ref = parse(text)
    assert ref.domain == DOCKER_HUB
    assert ref.path == f"library/{component}"
    assert ref.tag == (tag or "latest")


@given(domains(), st.lists(path_components(), min_size=1, max_size=3))
def test_explicit_domain_is_kept(domain: str, components: list[str]) -> None:
    path = "/".join(components)
    ref = parse(f"{domain}/{path}")
    assert (ref.domain, ref.path) == (domain, path)


@given(references(), tags, digests)
def test_tag_and_digest_keeps_only_the_digest(text: str, tag: str, digest: str) -> None:
    name = parse(text).repository
    both = parse(f"{name}:{tag}@{digest}")
    assert both == parse(f"{name}@{digest}")
    assert both.tag == ""


@given(st.lists(path_components(), min_size=1, max_size=3), st.data())
def test_upper_case_in_the_repository_is_refused(components: list[str], data: st.DataObject
                                                ) -> None:
    path = "/".join(components)
    letters = [i for i, ch in enumerate(path) if ch.isalpha()]
    assume(letters)
    at = data.draw(st.sampled_from(letters))
    upper = path[:at] + path[at].upper() + path[at + 1:]
    with pytest.raises(InvalidReference):
        parse(f"ghcr.io/{upper}")


@given(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_64_hex_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidReference):
        parse(name)


@given(references(), st.sampled_from([" ", "\t", "\n", "\r", "\u00a0"]), st.data())
def test_white_space_anywhere_is_refused(text: str, space: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(text)))
    with pytest.raises(InvalidReference):
        parse(text[:at] + space + text[at:])


def test_different_digests_are_different_references() -> None:
    assert parse(f"app@{DIGEST}") != parse(f"app@{OTHER_DIGEST}")
