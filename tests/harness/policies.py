"""Policy files at the limits nodekeeper accepts, to load while measuring what loading costs."""

from __future__ import annotations

from nodekeeper.pull import policy, regex
from nodekeeper.pull.policy import MAX_POLICY_BYTES, MAX_PROGRAM_TOTAL, MAX_RULES
from nodekeeper.settings import MAX_NODES

# Patterns that backtrack exponentially in Python's re, and patterns near the size cap
# that give RE2 the most automaton states to build.
HOSTILE_PATTERNS = ("(a+)+$", "(a|aa)+$", "(a*)*b", "([a-z0-9]+[.-]?)+x$",
                    "([a-c]{0,3}[.-]?){25}", "(a{0,12}){10}", "(.*a.*b.*c){9}")
# For (a+)+$: 28 characters took Python's re 5 s, doubling with each one more.
HOSTILE_TAGS = ("a" * 28 + "-", "a" * 127 + "-", "a" + "b.c-" * 31 + "abz")


def largest_policy(defaults: str = "defaults:\n  update: always\n",
                   match: str = "registry-{n}.example/**") -> str:
    """A valid policy as large as allowed on every count at once: the rules of
    most_rules(), just under MAX_NODES YAML values, padded with a comment to
    MAX_POLICY_BYTES. Rule n matches `match` with n filled in; with `**` every rule is
    tried on every pull, and their tag patterns match no tag of letters and digits that
    ends in neither a, b, c nor x (`v1`, `hourly-3`), so `defaults` decides."""
    rules = _rules(match)
    per_rule = 10  # mapping, match, tags (key, list, one item), update, fallback_on
    budget = MAX_NODES - 4 - defaults.count(":") * 2  # document, rules key and list
    fallbacks = budget // len(rules) - per_rule
    assert fallbacks > 0
    listed = ", ".join(["unreachable"] * fallbacks)
    text = defaults + "rules:\n" + "".join(f"{rule}    fallback_on: [{listed}]\n"
                                           for rule in rules)
    pad = MAX_POLICY_BYTES - len(text.encode()) - 3
    assert pad >= 0, "the rules alone are over the size limit"
    return text + "#" + "x" * pad + "\n"


def most_rules(defaults: str = "defaults:\n  update: always\n",
               match: str = "registry-{n}.example/**") -> str:
    """The rules of largest_policy() alone, without its filler values and padding: the
    same matching work for a pull, loaded in a thirtieth of the time."""
    return defaults + "rules:\n" + "".join(_rules(match))


def _rules(match: str) -> list[str]:
    """As many rules as the patterns' instruction budget takes (MAX_PROGRAM_TOTAL,
    MAX_RULES), each with a hostile tag pattern."""
    rules: list[str] = []
    program = 0
    while len(rules) < MAX_RULES:
        name = match.format(n=len(rules))
        pattern = HOSTILE_PATTERNS[len(rules) % len(HOSTILE_PATTERNS)]
        size = policy.compile_pattern(name).size + regex.Pattern(pattern).size
        if program + size > MAX_PROGRAM_TOTAL:
            break
        program += size
        rules.append(f"  - match: '{name}'\n    tags: ['{pattern}']\n    update: always\n")
    return rules
