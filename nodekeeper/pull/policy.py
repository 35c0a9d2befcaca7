"""The policy file: which images are checked upstream, how often, and when the node's copy
may stand in for an upstream that does not answer.

    defaults: {update: interval, interval: 15m, probe_timeout: 2s, ...}
    rules:
      - match: docker.io/library/postgres     # normalized name; * = one segment, ** = any
        tags: ['15(\\..*)?']                  # optional anchored regular expressions (RE2)
        update: interval
        interval: 1h

The first rule that matches wins; a setting a rule leaves out comes from `defaults`.
What PullImage does with a rule is decision.py's. Pure: loading reads a file, nothing
else does I/O.

Matching is bounded whatever the file says: patterns are matched by RE2 in time linear
in the name or tag, and a policy holds at most MAX_RULES rules and MAX_TAG_PATTERNS tag
patterns, so one PullImage tries at most a few thousand automata of bounded size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from nodekeeper.failures import Kind
from nodekeeper.pull import regex
from nodekeeper.pull.reference import Reference
from nodekeeper.settings import Document, Section

# The largest policy file read: far above any hand-written policy, and parsed in well
# under a second.
MAX_POLICY_BYTES = 1 << 20
MAX_RULES = 1000
MAX_TAG_PATTERNS = 1000
# RE2 instructions per tag pattern: `latest` takes 10, `15(\..*)?` 17,
# `[0-9]+\.[0-9]+\.[0-9]+(-alpine)?` 20, `.{0,127}` 1147. The cap keeps even the first
# match of a 128-character tag (while RE2 builds its automaton) well under a millisecond.
MAX_TAG_PROGRAM = 256
# A repository pattern of 255 literal characters compiles to about 260 instructions.
MAX_NAME_PROGRAM = 1024
# All of a policy's patterns together. A new name or tag can cost RE2 up to about half a
# microsecond per instruction the first time (while it builds its automaton), and one
# PullImage may try every rule: this keeps that under about 10 ms on the event loop.
# A typical rule takes 30-60 (`ghcr.io/org/*` 24, `15(\..*)?` 17).
MAX_PROGRAM_TOTAL = 20_000



class Update(str, enum.Enum):
    """When a tag is checked upstream."""

    ALWAYS = "always"
    INTERVAL = "interval"         # at most once per `interval`
    NEVER = "never"               # the node's copy, once it has one

    def __str__(self) -> str:
        return self.value


class AuthFallback(str, enum.Enum):
    """Whether the node's copy of a private repository may stand in for upstream."""

    KNOWN_CREDENTIALS = "known-credentials"  # for credentials seen to work
    NEVER = "never"

    def __str__(self) -> str:
        return self.value


class BackingPrivateFallback(str, enum.Enum):
    """Whether backing's copy of a private repository may stand in for upstream."""

    DENY = "deny"
    ALLOW = "allow"

    def __str__(self) -> str:
        return self.value

# Upstream failures a rule may choose to cover with the node's copy. `unauthorized` is not
# among them: 401/403 fall back only under auth_fallback, for credentials seen to work.
FALLBACK_REASONS = tuple(kind for kind in Kind if kind is not Kind.UNAUTHORIZED)


@dataclass(frozen=True)
class Settings:
    update: Update = Update.ALWAYS
    interval: float = 900.0
    probe_timeout: float = 2.0
    fallback_on: frozenset[Kind] = frozenset(FALLBACK_REASONS)
    auth_fallback: AuthFallback = AuthFallback.KNOWN_CREDENTIALS
    # A node without a copy may take backing's copy while upstream is down only for
    # repositories seen pullable anonymously, unless this says allow.
    backing_private_fallback: BackingPrivateFallback = BackingPrivateFallback.DENY


@dataclass(frozen=True)
class Rule:
    """One rule; `index` is its position in the file (None for the defaults)."""

    index: int | None
    match: str
    tags: tuple[str, ...]
    settings: Settings
    _name: regex.Pattern = field(repr=False, compare=False)
    _tags: tuple[regex.Pattern, ...] = field(repr=False, compare=False)

    def matches(self, ref: Reference) -> bool:
        return self.matches_utf8(ref.repository.encode(), ref.tag.encode())

    def matches_utf8(self, name: bytes, tag: bytes) -> bool:
        """`matches` for a name and tag encoded once for all the rules they are tried on."""
        if not self._name.fullmatch_utf8(name):
            return False
        if not self._tags:
            return True
        return bool(tag) and any(pattern.fullmatch_utf8(tag) for pattern in self._tags)

    @property
    def program_size(self) -> int:
        return self._name.size + sum(pattern.size for pattern in self._tags)

    @property
    def label(self) -> str:
        return "defaults" if self.index is None else f"rules[{self.index}] ({self.match})"


@dataclass(frozen=True)
class Policy:
    source: str
    defaults: Rule
    rules: tuple[Rule, ...]

    def rule_for(self, ref: Reference) -> Rule:
        name, tag = ref.repository.encode(), ref.tag.encode()
        for rule in self.rules:
            if rule.matches_utf8(name, tag):
                return rule
        return self.defaults


def compile_pattern(pattern: str) -> regex.Pattern:
    """A repository pattern as a regular expression: `*` is any part of one path segment,
    `**` is any number of whole segments, including none (`a/**` matches `a`)."""
    if not pattern:
        raise ValueError("the pattern is empty")
    segments = pattern.split("/")
    # `**/**` means no more than `**`.
    segments = [s for i, s in enumerate(segments)
                if not (s == "**" and i > 0 and segments[i - 1] == "**")]
    expression = ""
    for position, segment in enumerate(segments):
        first, last = position == 0, position == len(segments) - 1
        if segment == "**":
            if first:
                expression += ".+" if last else "(?:[^/]+/)*"
            else:
                expression += "(?:/[^/]+)*" if last else "/(?:[^/]+/)*"
            continue
        if "**" in segment:
            raise ValueError(f"'**' must be a whole path segment, got {segment!r}")
        if not segment:
            raise ValueError(f"empty path segment in {pattern!r}")
        if not first and segments[position - 1] != "**":
            expression += "/"
        expression += "[^/]*".join(regex.escape(piece) for piece in segment.split("*"))
    return regex.Pattern(expression, MAX_NAME_PROGRAM)


def load(path: str | Path) -> Policy:
    return parse(Document.read(path, MAX_POLICY_BYTES))


def parse(doc: Document) -> Policy:
    root = doc.root()
    defaults_section = root.section("defaults")
    base = _settings(defaults_section, Settings())
    defaults_section.finish()
    defaults = Rule(None, "**", (), base, compile_pattern("**"), ())
    rules: list[Rule] = []
    tag_patterns = program = 0
    for section in root.sections("rules"):
        if len(rules) == MAX_RULES:
            raise doc.error(section.key, f"more than {MAX_RULES} rules; merge rules with "
                                         "`*`, `**` or several tag patterns")
        rule = _rule(section, base)
        tag_patterns += len(rule.tags)
        if tag_patterns > MAX_TAG_PATTERNS:
            raise doc.error((*section.key, "tags"),
                            f"more than {MAX_TAG_PATTERNS} tag patterns in the policy")
        program += rule.program_size
        if program > MAX_PROGRAM_TOTAL:
            raise doc.error(section.key, f"the policy's patterns compile to more than "
                                         f"{MAX_PROGRAM_TOTAL} RE2 instructions in all; "
                                         "merge rules, or simplify their patterns")
        rules.append(rule)
    root.finish()
    return Policy(doc.path, defaults, tuple(rules))


def _rule(section: Section, base: Settings) -> Rule:
    index = section.key[-1]
    assert isinstance(index, int)
    if not section.has("match"):
        raise section.error("match", "every rule needs a repository pattern to match")
    match = section.string("match", "")
    try:
        name = compile_pattern(match)
    except ValueError as exc:
        raise section.error("match", str(exc)) from None
    tags = tuple(section.strings("tags"))
    compiled = []
    for position, tag in enumerate(tags):
        try:
            compiled.append(regex.Pattern(tag, MAX_TAG_PROGRAM))
        except regex.PatternError as exc:
            raise section.doc.error(
                (*section.key, "tags", position),
                f"not a regular expression RE2 matches in linear time: {exc}") from None
    settings = _settings(section, base)
    section.finish()
    return Rule(index, match, tags, settings, name, tuple(compiled))


def _settings(section: Section, base: Settings) -> Settings:
    update = _choice(section, "update", Update, base.update)
    interval = section.duration("interval", base.interval)
    if update is Update.INTERVAL and interval <= 0:
        raise section.error("interval", "update: interval needs an interval above 0")
    probe_timeout = section.duration("probe_timeout", base.probe_timeout)
    if not 0 < probe_timeout <= 60:
        raise section.error("probe_timeout", "expected a duration above 0 and at most 60s")
    names = {kind.value: kind for kind in FALLBACK_REASONS}
    fallback_on = []
    for position, reason in enumerate(section.strings(
            "fallback_on", sorted(kind.value for kind in base.fallback_on))):
        if reason not in names:
            raise section.doc.error(
                (*section.key, "fallback_on", position),
                f"expected one of {', '.join(names)}, got {reason!r}",
            )
        fallback_on.append(names[reason])
    auth_fallback = _choice(section, "auth_fallback", AuthFallback, base.auth_fallback)
    backing_private = _choice(section, "backing_private_fallback", BackingPrivateFallback,
                              base.backing_private_fallback)
    return Settings(update, interval, probe_timeout, frozenset(fallback_on), auth_fallback,
                    backing_private)


_Choice = TypeVar("_Choice", Update, AuthFallback, BackingPrivateFallback)


def _choice(section: Section, name: str, options: type[_Choice], default: _Choice) -> _Choice:
    return options(section.choice(name, [option.value for option in options], default.value))
