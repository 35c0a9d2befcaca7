"""How long ago something happened, in the words operators read in logs and `status`."""

from __future__ import annotations


def ago(seconds: float) -> str:
    """'42s ago', '3.5m ago', '2.0h ago', '3.1d ago'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def ago_in_words(seconds: float) -> str:
    """'3 days ago', '1 hour ago', 'less than a minute ago': for people reading a pod's
    Events, who need no decimals."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return "less than a minute ago"
