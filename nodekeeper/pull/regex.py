"""Regular expressions matched in time linear in the text, whatever the pattern (RE2).

Tag patterns come from the policy file and tags from any pod author. Python's `re`
backtracks: `(a+)+$` against 28 a's and a '-' takes seconds, doubling with every
character. RE2 runs an automaton instead, and refuses to compile what it cannot match
that way (backreferences, look-around).

Linear is not yet cheap: the automaton's states are built while matching, each at a cost
proportional to the compiled program, so a pattern may ask for at most `max_program`
instructions, and each pattern's automaton for at most MAX_MEMORY bytes.
"""

from __future__ import annotations

# The binding itself rather than the `re2` module around it: that wrapper computes and
# decodes group offsets on every call (about 11 us for a short tag, against 1.5 us here),
# and a PullImage may try every rule of the policy.
from re2 import _re2

# Per pattern: RE2's program and its automaton's cache share this budget. When the cache
# fills, RE2 empties it and carries on (or, past that, runs its slower, still linear NFA).
MAX_MEMORY = 1 << 20

_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH


class PatternError(ValueError):
    """A pattern RE2 does not take; the message says why."""


def _options() -> object:
    options = _re2.RE2.Options()
    options.max_mem = MAX_MEMORY
    options.log_errors = False  # RE2 would write to stderr; the caller reports it
    options.never_capture = True  # only "does it match" is asked: no group offsets
    return options


def escape(text: str) -> str:
    """`text` as a pattern matching exactly itself."""
    quoted: bytes = _re2.RE2.QuoteMeta(text.encode())
    return quoted.decode()


class Pattern:
    """A compiled pattern; `fullmatch` answers whether it matches the whole text."""

    __slots__ = ("_program", "pattern")

    def __init__(self, pattern: str, max_program: int | None = None) -> None:
        self.pattern = pattern
        if "{," in pattern:
            # Python's `re` reads a{,3} as a{0,3}; RE2 reads it as the literal text.
            raise PatternError("write a repetition {,n} as {0,n}")
        try:
            encoded = pattern.encode()
        except UnicodeEncodeError:  # a lone surrogate from a YAML "\ud800" escape
            raise PatternError("not valid Unicode text") from None
        program = _re2.RE2(encoded, _options())
        if not program.ok():
            raise PatternError(bytes(program.error()).decode(errors="replace"))
        size = int(program.ProgramSize())
        if max_program is not None and size > max_program:
            raise PatternError(f"too complex: compiles to {size} instructions, at most "
                               f"{max_program} (a tag is at most 128 characters; "
                               "large counted repetitions such as {1,100} cost the most)")
        self._program = program

    @property
    def size(self) -> int:
        """The compiled program's size in instructions."""
        return int(self._program.ProgramSize())

    def fullmatch(self, text: str) -> bool:
        return self.fullmatch_utf8(text.encode())

    def fullmatch_utf8(self, data: bytes) -> bool:
        spans = self._program.Match(_BOTH, data, 0, len(data))
        return bool(spans[0][0] >= 0)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"
