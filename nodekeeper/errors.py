"""Every failure nodekeeper knows by name.

    NodekeeperError
    ├── SettingsError          a config or policy file is invalid (names file, line, key)
    ├── StartupError           the daemon cannot start (socket taken, cannot bind, ...)
    ├── RequestError           a CRI request is malformed         -> INVALID_ARGUMENT
    ├── PullFailed             PullImage cannot be answered       -> the code it carries
    │                          (RegistryUnavailable, refused fallback, gone upstream, ...)
    └── ContainerdError        containerd answered with an error  -> its own code and message
        └── ContainerdUnavailable  containerd's socket does not answer -> UNAVAILABLE

cri.py is the one place that turns these into gRPC status codes.
"""

from __future__ import annotations

import grpc


class NodekeeperError(Exception):
    """Base of all errors nodekeeper raises on purpose."""


class SettingsError(NodekeeperError):
    """A settings file (config or policy) is invalid."""


class StartupError(NodekeeperError):
    """The daemon cannot start; the message says why and what to do."""


class RequestError(NodekeeperError):
    """The kubelet (or another client) sent a request nodekeeper cannot act on."""


class PullFailed(NodekeeperError):
    """PullImage has no image to answer with; the message says what was tried.

    `details` carries what was decided on the way (rule, reason, digests) for the log.
    """

    def __init__(self, code: grpc.StatusCode, message: str,
                 details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class ContainerdError(NodekeeperError):
    """containerd refused a call; its status code and message are kept as they were."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ContainerdUnavailable(ContainerdError):
    """containerd's socket did not answer at all."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"containerd is unavailable at {address}: {detail}",
        )
