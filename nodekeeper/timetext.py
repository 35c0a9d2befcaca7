"""How long ago something happened, in the words operators read in logs and `status`."""

from __future__ import annotations


def ago(seconds: float) -> str:
    """'42s ago', '3.5m ago', '2.0h ago', '3.1d ago'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"
