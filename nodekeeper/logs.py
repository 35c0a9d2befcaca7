"""Log output: one line per event, fit for journald, a terminal, or a log shipper.

Under systemd (JOURNAL_STREAM names our stderr) each line starts with a syslog priority
prefix such as `<4>`, which journald strips and stores as the priority, so
`journalctl -u nodekeeper -p warning` filters by level. journald stamps the time itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Never let these reach a log line, whatever a caller passed by mistake.
_SECRET_KEYS = frozenset(
    {"auth", "password", "identity_token", "registry_token", "authorization", "credentials"}
)
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2}


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd announced in JOURNAL_STREAM."""
    announced = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = announced.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return stat.st_dev == int(device) and stat.st_ino == int(inode)


def _drop_secrets(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def _event_first(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Put the event name and level first, so a line reads well in journalctl."""
    return {"event": event.pop("event", ""), "level": event.pop("level", ""), **event}


def _with_priority(render: Processor) -> Processor:
    def prefixed(logger: WrappedLogger, method: str, event: EventDict) -> str:
        line = render(logger, method, event)
        text = line.decode() if isinstance(line, bytes) else str(line)
        return f"<{_PRIORITY.get(method, 6)}>{text}"

    return prefixed


def setup(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog once for the whole process. Safe to call again on reload."""
    out = stream or sys.stderr
    journal = under_journald(out)
    if fmt == "auto":
        fmt = "console" if out.isatty() and not journal else "json"
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _drop_secrets,
    ]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [structlog.processors.format_exc_info, _event_first]
    render: Processor
    if fmt == "console":
        render = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        render = structlog.processors.JSONRenderer(sort_keys=False)
    processors.append(_with_priority(render) if journal else render)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    """A logger tagged with the component it belongs to."""
    return structlog.get_logger(component=name)
