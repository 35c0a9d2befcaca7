"""Policy files at the limits nodekeeper accepts, to load while measuring what loading costs."""

from __future__ import annotations

from nodekeeper.policy import MAX_POLICY_BYTES, MAX_RULES, MAX_TAG_PATTERNS
from nodekeeper.settings import MAX_NODES

# Patterns that backtrack exponentially in Python's re.
HOSTILE_PATTERNS = ("(a+)+$", "(a|aa)+$", "(a*)*b", "([a-z0-9]+[.-]?)+x$")
# For (a+)+$: 28 characters took Python's re 5 s, doubling with each one more.
HOSTILE_TAGS = ("a" * 28 + "-", "a" * 127 + "-")


def largest_policy(defaults: str = "defaults:\n  update: always\n") -> str:
    """A valid policy as large as allowed on every count at once: MAX_RULES rules,
    MAX_TAG_PATTERNS hostile tag patterns, just under MAX_NODES YAML values, and padded
    with a comment to MAX_POLICY_BYTES. No rule matches a repository under `bench/` or
    `app`, so `defaults` decides every pull of those."""
    per_rule_fixed = 10  # mapping, match, tags (key, list, one item), update, fallback_on
    budget = MAX_NODES - 4 - defaults.count(":") * 2  # document, rules key and list
    fallbacks = budget // MAX_RULES - per_rule_fixed
    assert MAX_TAG_PATTERNS >= MAX_RULES and fallbacks > 0
    rules = []
    for n in range(MAX_RULES):
        pattern = HOSTILE_PATTERNS[n % len(HOSTILE_PATTERNS)]
        rules.append(f"  - match: registry-{n}.example/**\n"
                     f"    tags: ['{pattern}']\n"
                     "    update: always\n"
                     f"    fallback_on: [{', '.join(['unreachable'] * fallbacks)}]\n")
    text = defaults + "rules:\n" + "".join(rules)
    pad = MAX_POLICY_BYTES - len(text.encode()) - 3
    assert pad >= 0, "the rules alone are over the size limit"
    return text + "#" + "x" * pad + "\n"
