"""Every error nodekeeper raises on purpose.

    NodekeeperError
    ├── SettingsError          a config or policy file is invalid (names file, line, key)
    ├── StartupError           the daemon cannot start (socket taken, cannot bind, ...)
    ├── RequestError           a CRI request is malformed
    ├── PullFailed             PullImage cannot be answered: a failure Kind, the message
    │                          saying what was tried, and containerd's own answer if any
    └── ContainerdError        containerd answered with an error: its code and message
        └── ContainerdUnavailable  containerd's socket does not answer

Failures of things outside nodekeeper (registries, token services, containerd's pulls)
are `failures.Failure`, one `Kind` each; `PullRefused` is containerd refusing a pull.
cri.py is the one place that turns all of these into gRPC status codes.
"""

from __future__ import annotations

from nodekeeper.failures import Failure, Kind


class NodekeeperError(Exception):
    """Base of all errors nodekeeper raises on purpose."""


class SettingsError(NodekeeperError):
    """A settings file (config or policy) is invalid."""


class StartupError(NodekeeperError):
    """The daemon cannot start; the message says why and what to do."""


class RequestError(NodekeeperError):
    """The kubelet (or another client) sent a request nodekeeper cannot act on."""


class ContainerdError(NodekeeperError):
    """containerd refused a call. `code` is the gRPC status code's name (NOT_FOUND, ...),
    kept with the message as containerd sent them."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ContainerdUnavailable(ContainerdError):
    """containerd's socket did not answer at all."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__("UNAVAILABLE", f"containerd is unavailable at {address}: {detail}")


class PullRefused(Failure):
    """containerd refused a pull: classified like a registry failure, with containerd's
    own answer kept for when nothing better can be said, and the digests it names (the
    content that did not match, when that was the trouble)."""

    def __init__(self, kind: Kind, answer: ContainerdError,
                 digests: tuple[str, ...] = ()) -> None:
        super().__init__(kind, answer.message)
        self.answer = answer
        self.digests = digests


class PullFailed(NodekeeperError):
    """PullImage has no image to answer with.

    `kind` is what went wrong (None when containerd itself failed, see `answer`);
    `details` carries what was decided on the way (rule, reason, digests) for the log.
    """

    def __init__(self, kind: Kind | None, message: str, answer: ContainerdError | None = None,
                 details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.answer = answer
        self.details = details or {}
