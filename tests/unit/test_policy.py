"""The policy file: loading errors that point at the line, and rule matching."""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodekeeper.errors import SettingsError
from nodekeeper.failures import Kind
from nodekeeper.pull import policy, regex
from nodekeeper.pull.policy import (
    FALLBACK_REASONS,
    MAX_PROGRAM_TOTAL,
    MAX_RULES,
    MAX_TAG_PATTERNS,
    MAX_TAG_PROGRAM,
    Settings,
    compile_pattern,
)
from nodekeeper.pull.reference import parse
from tests.harness.policies import HOSTILE_TAGS, most_rules

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + hashlib.sha256(b"m").hexdigest()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> policy.Policy:
    return policy.load(write(tmp_path, text))


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the only line containing `needle`."""
    found = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(SettingsError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# -- loading ---------------------------------------------------------------------------------

def test_shipped_policy_loads() -> None:
    loaded = policy.load(REPO / "etc" / "policy.yaml")
    assert loaded.rules
    assert loaded.defaults.label == "defaults"


def test_empty_file_gives_default_settings(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "")
    assert loaded.rules == ()
    assert loaded.defaults.settings == Settings()
    assert loaded.source == str(tmp_path / "policy.yaml")


def test_values_are_read(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, """
defaults:
  update: interval
  interval: 15m
  probe_timeout: 500ms
  fallback_on: [unreachable, timeout]
  auth_fallback: never
rules:
  - match: docker.io/library/postgres
    tags: ['15(\\..*)?']
    update: always
    probe_timeout: 3s
""")
    base = loaded.defaults.settings
    assert base == Settings("interval", 900.0, 0.5, frozenset({Kind.UNREACHABLE, Kind.TIMEOUT}),
                            "never")
    (rule,) = loaded.rules
    assert rule.index == 0
    assert rule.match == "docker.io/library/postgres"
    assert rule.tags == ("15(\\..*)?",)
    assert rule.settings.update == "always"
    assert rule.settings.probe_timeout == 3.0
    assert rule.label == "rules[0] (docker.io/library/postgres)"


def test_rules_inherit_defaults(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, """
defaults:
  update: interval
  interval: 2h
  fallback_on: [timeout]
  auth_fallback: never
rules:
  - match: a.example/**
  - match: b.example/**
    interval: 5m
    fallback_on: [not_found, invalid]
""")
    inherited, overridden = loaded.rules
    assert inherited.settings == loaded.defaults.settings
    assert overridden.settings.interval == 300.0
    assert overridden.settings.fallback_on == frozenset({Kind.NOT_FOUND, Kind.INVALID})
    assert overridden.settings.update == loaded.defaults.settings.update
    assert overridden.settings.auth_fallback == loaded.defaults.settings.auth_fallback


def test_fallback_on_default_is_every_reason(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").defaults.settings.fallback_on == frozenset(FALLBACK_REASONS)
    assert Kind.UNAUTHORIZED not in FALLBACK_REASONS


RULES_WITH_BAD_UPDATE = """\
rules:
  - match: a.example/app
  - match: b.example/app
    update: interval
  - match: c.example/app
    update: sometimes
"""


def test_error_names_file_line_and_rule_index(tmp_path: Path) -> None:
    message = refused(tmp_path, RULES_WITH_BAD_UPDATE)
    line = line_of(RULES_WITH_BAD_UPDATE, "sometimes")
    assert message.startswith(f"{tmp_path / 'policy.yaml'}:{line}: rules[2].update: ")
    assert "'sometimes'" in message
    assert "always" in message
    assert "interval" in message
    assert "never" in message


@pytest.mark.parametrize(
    ("text", "key", "needle", "words"),
    [
        ("rules:\n  - match: a/b\n  - match: c/d\n    updte: always\n",
         "rules[1].updte", "updte", "unknown key"),
        ("defaults:\n  intervall: 1h\n", "defaults.intervall", "intervall", "unknown key"),
        ("defaults: {}\nrule: [a]\n", "rule", "rule:", "unknown key"),
        ("rules:\n  - match: a/b\n    tags: ['1', '(']\n", "rules[0].tags[1]", "tags",
         "regular expression"),
        ("rules:\n  - update: always\n", "rules[0].match", "update", "pattern"),
        ("rules:\n  - match: ''\n", "rules[0].match", "match", "empty"),
        ("rules:\n  - match: a/b**/c\n", "rules[0].match", "match", "whole path segment"),
        ("rules:\n  - match: a//c\n", "rules[0].match", "match", "empty path segment"),
        ("defaults:\n  fallback_on:\n    - timeout\n    - unauthorized\n",
         "defaults.fallback_on[1]", "unauthorized", "expected one of"),
        ("defaults:\n  probe_timeout: 0s\n", "defaults.probe_timeout", "probe_timeout",
         "above 0"),
        ("defaults:\n  probe_timeout: 61s\n", "defaults.probe_timeout", "probe_timeout",
         "at most 60s"),
        ("defaults:\n  update: interval\n  interval: 0s\n", "defaults.interval", "interval: 0",
         "above 0"),
        ("defaults:\n  interval: soon\n", "defaults.interval", "soon", "duration"),
        ("defaults:\n  auth_fallback: always\n", "defaults.auth_fallback", "auth_fallback",
         "known-credentials"),
        ("rules:\n  - match: a/b\n  - just-a-string\n", "rules[1]", "just-a-string",
         "mapping"),
        ("rules: {match: a}\n", "rules", "rules", "list"),
        ("defaults:\n  update: always\n  update: never\n", "defaults.update", "never",
         "twice"),
    ],
)
def test_load_errors_point_at_the_key(tmp_path: Path, text: str, key: str, needle: str,
                                      words: str) -> None:
    message = refused(tmp_path, text)
    line = line_of(text, needle)
    assert message.startswith(f"{tmp_path / 'policy.yaml'}:{line}: {key}: "), message
    assert words in message


def test_error_line_is_the_key_line_for_block_values(tmp_path: Path) -> None:
    text = "defaults: {}\nrule:\n  - match: a/b\n"
    message = refused(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'policy.yaml'}:{line_of(text, 'rule:')}: rule: ")


def test_rule_interval_zero_with_interval_inherited(tmp_path: Path) -> None:
    text = "defaults:\n  interval: 0s\nrules:\n  - match: a/b\n    update: interval\n"
    message = refused(tmp_path, text)
    assert "rules[0].interval" in message
    assert f":{line_of(text, 'match: a/b')}:" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping" in refused(tmp_path, "- a\n- b\n")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = "defaults:\n  update: [always\n"
    message = refused(tmp_path, text)
    assert message.startswith(str(tmp_path / "policy.yaml") + ":")
    assert "not valid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        policy.load(tmp_path / "absent.yaml")


# -- patterns --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("docker.io/library/postgres", "docker.io/library/postgres", True),
        ("docker.io/library/postgres", "docker.io/library/postgresql", False),
        ("docker.io/library/postgres", "docker.io/library/postgres/x", False),
        ("docker.io/library/*", "docker.io/library/postgres", True),
        ("docker.io/library/*", "docker.io/library/a/b", False),
        ("docker.io/*/postgres", "docker.io/library/postgres", True),
        ("docker.io/*/postgres", "docker.io/a/b/postgres", False),
        ("ghcr.io/org/app-*", "ghcr.io/org/app-web", True),
        ("ghcr.io/org/app-*", "ghcr.io/org/app-", True),
        ("ghcr.io/org/app-*", "ghcr.io/org/app-web/x", False),
        ("ghcr.io/org/*-web", "ghcr.io/org/app-web", True),
        ("*.example/app", "registry.example/app", True),
        ("*.example/app", "a/b.example/app", False),
        ("**", "docker.io/library/postgres", True),
        ("ghcr.io/**", "ghcr.io/a", True),
        ("ghcr.io/**", "ghcr.io/a/b/c", True),
        ("ghcr.io/**", "ghcr.iox/a", False),
        ("ghcr.io/org/**", "ghcr.io/org", True),
        ("ghcr.io/org/**", "ghcr.io/organisation/a", False),
        ("**/postgres", "docker.io/library/postgres", True),
        ("**/postgres", "docker.io/library/mypostgres", False),
        ("ghcr.io/**/app", "ghcr.io/app", True),
        ("ghcr.io/**/app", "ghcr.io/a/b/app", True),
        ("ghcr.io/**/app", "ghcr.io/a/b/webapp", False),
        ("a.example/x.y", "a.example/xzy", False),  # '.' is literal, not a regex dot
        ("a.example/x+", "a.example/xx", False),
    ],
)
def test_pattern_semantics(pattern: str, name: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(name)) is matches


@pytest.mark.parametrize(
    ("pattern", "name"),
    [("**/**", "docker.io/library/postgres"), ("ghcr.io/**/**", "ghcr.io/a"),
     ("ghcr.io/**/**/app", "ghcr.io/a/app")],
)
def test_consecutive_double_stars_behave_like_one(pattern: str, name: str) -> None:
    assert compile_pattern(pattern).fullmatch(name)


_segment_chars = "abcdefghijklmnopqrstuvwxyz0123456789._-:"
segments = st.text(alphabet=_segment_chars, min_size=1, max_size=8)
names = st.lists(segments, min_size=1, max_size=5).map("/".join)


@given(names)
def test_literal_pattern_matches_only_its_name(name: str) -> None:
    compiled = compile_pattern(name)
    assert compiled.fullmatch(name)
    assert not compiled.fullmatch(name + "x")
    assert not compiled.fullmatch(name + "/x")
    assert not compiled.fullmatch("x/" + name)


@given(names)
def test_double_star_matches_any_name(name: str) -> None:
    assert compile_pattern("**").fullmatch(name)


@given(st.lists(segments, min_size=2, max_size=5), st.data())
def test_star_is_exactly_one_segment(parts: list[str], data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(parts) - 1))
    pattern = "/".join([*parts[:at], "*", *parts[at + 1:]])
    compiled = compile_pattern(pattern)
    assert compiled.fullmatch("/".join(parts))
    replacement = data.draw(segments)
    assert compiled.fullmatch("/".join([*parts[:at], replacement, *parts[at + 1:]]))
    # Two segments in its place: '*' never crosses '/'.
    crossing = [*parts[:at], replacement, replacement, *parts[at + 1:]]
    assert not compiled.fullmatch("/".join(crossing))


@given(st.lists(segments, min_size=1, max_size=5), st.data())
def test_star_within_a_segment_stays_within_it(parts: list[str], data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(parts) - 1))
    segment = parts[at]
    cut = data.draw(st.integers(0, len(segment)))
    pattern = "/".join([*parts[:at], segment[:cut] + "*", *parts[at + 1:]])
    compiled = compile_pattern(pattern)
    assert compiled.fullmatch("/".join(parts))
    longer = [*parts[:at], segment + "/x", *parts[at + 1:]]
    assert not compiled.fullmatch("/".join(longer))


@given(st.lists(segments, min_size=1, max_size=3), st.lists(segments, max_size=3),
       st.lists(segments, min_size=1, max_size=3))
def test_double_star_in_the_middle_spans_any_number_of_segments(
        head: list[str], middle: list[str], tail: list[str]) -> None:
    compiled = compile_pattern("/".join([*head, "**", *tail]))
    assert compiled.fullmatch("/".join([*head, *middle, *tail]))
    # The name must still end with the literal tail.
    assert not compiled.fullmatch("/".join([*head, *middle, *tail]) + "x")


@given(st.lists(segments, min_size=1, max_size=3), st.lists(segments, max_size=3))
def test_trailing_double_star_includes_the_prefix_itself(head: list[str], rest: list[str]
                                                        ) -> None:
    compiled = compile_pattern("/".join([*head, "**"]))
    assert compiled.fullmatch("/".join([*head, *rest]))
    assert not compiled.fullmatch("/".join(head) + "x")


def test_compile_pattern_refuses_bad_patterns() -> None:
    for bad in ("", "a/**b", "**x/a", "a//b", "a/"):
        with pytest.raises(ValueError, match=r"\S"):
            compile_pattern(bad)


# -- choosing a rule -------------------------------------------------------------------------

FIRST_MATCH = """
defaults:
  update: never
rules:
  - match: docker.io/library/postgres
    tags: ['15(\\..*)?']
    update: interval
    interval: 1h
  - match: docker.io/library/*
    update: always
  - match: "**"
    tags: [latest]
    update: always
    probe_timeout: 5s
"""


@pytest.mark.parametrize(
    ("image", "index"),
    [
        ("postgres:15", 0),
        ("postgres:15.4", 0),
        ("postgres:150", 1),  # tags are anchored: '15(\..*)?' does not match 150
        ("postgres:16", 1),
        ("postgres", 1),  # the first match wins, though the latest rule matches too
        ("redis:7", 1),
        ("ghcr.io/a/b", 2),
        ("ghcr.io/a/b:v1", None),
        ("user/app:v1", None),
        (f"ghcr.io/a/b@{DIGEST}", None),  # a rule with tags never matches a digest
        (f"postgres@{DIGEST}", 1),
        (f"postgres:15@{DIGEST}", 1),
    ],
)
def test_first_matching_rule_wins(tmp_path: Path, image: str, index: int | None) -> None:
    loaded = load_text(tmp_path, FIRST_MATCH)
    rule = loaded.rule_for(parse(image))
    assert rule.index == index
    if index is None:
        assert rule is loaded.defaults
    else:
        assert rule is loaded.rules[index]


def test_rule_matches_the_normalized_name(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "rules:\n  - match: docker.io/library/postgres\n")
    for image in ("postgres", "docker.io/postgres", "index.docker.io/library/postgres:1"):
        assert loaded.rule_for(parse(image)).index == 0
    assert loaded.rule_for(parse("ghcr.io/library/postgres")).index is None


def test_tag_patterns_are_regular_expressions(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "rules:\n  - match: '**'\n    tags: ['v[0-9]+', 'stable']\n")
    (rule,) = loaded.rules
    assert rule.matches(parse("a/b:v12"))
    assert rule.matches(parse("a/b:stable"))
    assert not rule.matches(parse("a/b:v12-rc"))
    assert not rule.matches(parse("a/b:unstable"))
    assert not rule.matches(parse(f"a/b@{DIGEST}"))


# -- linear-time matching --------------------------------------------------------------------
# Costs are measured in this thread's CPU time: other processes on the machine do not count.
# The bounds are far above what matching costs (microseconds; bench/responsiveness.py
# reports the figures) and far below what backtracking would: seconds for (a+)+$ on 28
# a's, doubling with each one more.
SLOW_MATCH_S = 0.25

BACKTRACKING = ["(a+)+$", "(a|aa)+$", "(a*)*b", "(.*a){12}", "([a-z0-9]+[.-]?)+x$",
                "(?:a|a?)+b", "(\\w+\\.?)*!"]


def slowest_match_us(pattern: str, tags: list[str]) -> tuple[float, float]:
    """(first, median of the rest) microseconds for fullmatch of `pattern` over `tags`."""
    compiled = regex.Pattern(pattern, MAX_TAG_PROGRAM)
    times = []
    for tag in tags:
        started = time.thread_time()
        compiled.fullmatch(tag)
        times.append((time.thread_time() - started) * 1e6)
    return times[0], statistics.median(times[1:])


@pytest.mark.parametrize("pattern", BACKTRACKING)
def test_backtracking_patterns_match_in_linear_time(pattern: str) -> None:
    # With Python's re, (a+)+$ takes seconds on 28 a's and a '-', doubling per character.
    tags = ["a" * 28 + "-", "a" * 127 + "-", "a" * 128,
            *("".join(random.Random(n).choice("a.-_x0") for _ in range(128))
              for n in range(20))]
    first, typical = slowest_match_us(pattern, tags)
    assert first < SLOW_MATCH_S * 1e6
    assert typical < SLOW_MATCH_S * 1e6 / 10


def test_the_most_complex_pattern_allowed_matches_in_linear_time() -> None:
    # Counted repetitions cost the most: this one is just under the cap.
    pattern = "([a-c]{0,3}[.-]?){25}"
    assert regex.Pattern(pattern).size <= MAX_TAG_PROGRAM
    tags = ["".join(random.Random(n).choice("abc.-") for _ in range(128)) for n in range(60)]
    first, typical = slowest_match_us(pattern, tags)
    assert first < SLOW_MATCH_S * 1e6
    assert typical < SLOW_MATCH_S * 1e6 / 10


def test_a_hostile_tag_through_a_loaded_policy(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "rules:\n  - match: '**'\n    tags: ['(a+)+$']\n")
    started = time.thread_time()
    assert loaded.rule_for(parse("ghcr.io/a/b:" + "a" * 28 + "-")) is loaded.defaults
    assert loaded.rule_for(parse("ghcr.io/a/b:" + "a" * 120)) is loaded.rules[0]
    assert time.thread_time() - started < SLOW_MATCH_S


@pytest.mark.parametrize(
    ("tag", "words"),
    [("(a)\\1", "invalid escape sequence"), ("v(?=1)", "invalid perl operator"),
     ("a{1001}", "invalid repetition size"), ("\\Z", "invalid escape"),
     ("v{,3}", "{0,n}"), (".{0,127}", "too complex: compiles to 1147 instructions")],
)
def test_patterns_re2_cannot_take_are_refused_naming_the_rule(tmp_path: Path, tag: str,
                                                              words: str) -> None:
    text = f"rules:\n  - match: a/b\n  - match: c/d\n    tags:\n      - ok\n      - '{tag}'\n"
    message = refused(tmp_path, text)
    where = f"{tmp_path / 'policy.yaml'}:{line_of(text, tag)}: rules[1].tags[1]: "
    assert message.startswith(where), message
    assert words in message
    assert "linear time" in message


def test_refused_patterns_do_not_reach_stderr(tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, "rules:\n  - match: a/b\n    tags: ['(']\n")
    assert capfd.readouterr().err == ""


def test_repository_patterns_take_any_character_literally() -> None:
    for literal in ("a.example/x+y", "a.example/(x)", "a.example/[x]", "a.example/x\\y",
                    "a.example/x{2}", "a.example/^x$", "a.example/x|y"):
        assert compile_pattern(literal).fullmatch(literal)
    assert not compile_pattern("a.example/x|y").fullmatch("y")


def test_repository_patterns_with_many_stars_match_in_linear_time() -> None:
    compiled = compile_pattern("ghcr.io/" + "*a" * 60 + "/x")
    name = "ghcr.io/" + "a" * 200 + "b/x"
    started = time.thread_time()
    for _ in range(20):
        assert not compiled.fullmatch(name)
    assert (time.thread_time() - started) / 20 < SLOW_MATCH_S / 10


def test_a_repository_pattern_too_large_is_refused(tmp_path: Path) -> None:
    text = f"rules:\n  - match: a/{'x' * 2000}\n"
    message = refused(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'policy.yaml'}:2: rules[0].match: too complex")


def test_rule_count_is_capped(tmp_path: Path) -> None:
    rules = "".join(f"  - match: r{n}.example/app\n" for n in range(MAX_RULES + 1))
    message = refused(tmp_path, "rules:\n" + rules)
    line = MAX_RULES + 2
    assert message.startswith(f"{tmp_path / 'policy.yaml'}:{line}: rules[{MAX_RULES}]: ")
    assert f"more than {MAX_RULES} rules" in message
    assert len(load_text(tmp_path, "rules:\n" + rules[:rules.rindex("  - ")]).rules) \
        == MAX_RULES


def test_tag_pattern_count_is_capped(tmp_path: Path) -> None:
    per_rule = 100
    rules = "".join(f"  - match: r{n}.example/app\n    tags: [{', '.join(['v1'] * per_rule)}]\n"
                    for n in range(MAX_TAG_PATTERNS // per_rule + 1))
    message = refused(tmp_path, "rules:\n" + rules)
    assert f"rules[{MAX_TAG_PATTERNS // per_rule}].tags: more than {MAX_TAG_PATTERNS}" \
        in message


def test_matching_the_largest_policy_stays_cheap(tmp_path: Path) -> None:
    """Every rule's name matches and every tag pattern fails: the most work one PullImage
    can cause."""
    per_rule = MAX_TAG_PATTERNS // MAX_RULES
    rules = "".join(f"  - match: '**'\n    tags: [{', '.join(['(a+)+$'] * per_rule)}]\n"
                    for _ in range(MAX_RULES))
    loaded = load_text(tmp_path, "rules:\n" + rules)
    ref = parse("ghcr.io/org/app:" + "a" * 120 + "-")
    loaded.rule_for(ref)
    started = time.thread_time()
    assert loaded.rule_for(ref) is loaded.defaults
    assert time.thread_time() - started < SLOW_MATCH_S


def test_the_patterns_of_a_policy_have_a_budget(tmp_path: Path) -> None:
    pattern = "(a{0,12}){10}"  # 244 instructions, under the cap for one pattern
    per_rule = compile_pattern("**").size + regex.Pattern(pattern).size
    fit = MAX_PROGRAM_TOTAL // per_rule
    rules = "".join(f"  - match: '**'\n    tags: ['{pattern}']\n" for _ in range(fit + 1))
    message = refused(tmp_path, "rules:\n" + rules)
    assert f"rules[{fit}]: the policy's patterns compile to more than" in message
    assert len(load_text(tmp_path, "rules:\n" + rules[:rules.rindex("  - ")]).rules) == fit


def test_a_fresh_hostile_tag_through_the_most_rules_allowed_stays_cheap(
        tmp_path: Path) -> None:
    """Every rule tried, every automaton built anew: the most one PullImage can cost.
    (The largest policy's rules without its filler: the same matching, a quicker load.)"""
    loaded = load_text(tmp_path, most_rules(match="**"))
    slowest = 0.0
    # At 128 characters, longer than any of its counted patterns can match: no rule does.
    for tag in [*(t for t in HOSTILE_TAGS if len(t) == 128),
                *("a" + "".join(random.Random(n).choice("abc.-") for _ in range(126)) + "z"
                  for n in range(5))]:
        started = time.thread_time()
        assert loaded.rule_for(parse(f"127.0.0.1:5000/app:{tag}")) is loaded.defaults
        slowest = max(slowest, time.thread_time() - started)
    assert slowest < SLOW_MATCH_S
