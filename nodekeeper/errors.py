"""Every error nodekeeper raises on purpose.

    NodekeeperError
    ├── SettingsError          a config or policy file is invalid (names file, line, key)
    ├── StartupError           the daemon cannot start (socket taken, cannot bind, ...)
    ├── RequestError           a CRI request is malformed
    ├── PullFailed             PullImage cannot be answered: the answer record (a failure
    │                          Kind, the message saying what was tried), and containerd's
    │                          own answer if any
    └── ContainerdError        containerd answered with an error: its code and message
        └── ContainerdUnavailable  containerd's socket does not answer

    PostFailed                 the Kubernetes API server did not take an Event (kube/);
                               never reaches the kubelet

Failures of things outside nodekeeper (registries, token services, containerd's pulls)
are `failures.Failure`, one `Kind` each; `ContainerdRefusedPull` is containerd refusing
a pull (the decision's own refusal is `decision.Refuse`, answered as PullFailed).
cri.py is the one place that turns all of these into gRPC status codes.
"""

from __future__ import annotations

from nodekeeper.failures import Failure, Kind
from nodekeeper.pull.values import Answer


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


class ContainerdRefusedPull(Failure):
    """containerd refused a pull: classified like a registry failure, with containerd's
    own answer kept for when nothing better can be said, and the digests it names (the
    content that did not match, when that was the trouble)."""

    def __init__(self, kind: Kind, containerd: ContainerdError,
                 digests: tuple[str, ...] = ()) -> None:
        super().__init__(kind, containerd.message)
        self.containerd = containerd
        self.digests = digests


class PullFailed(NodekeeperError):
    """PullImage has no image to answer with: `answer` is the refusal as recorded (its
    `kind` what went wrong, None when containerd itself failed; its `reason` the message),
    `containerd` containerd's own answer, passed on when nothing better can be said."""

    def __init__(self, answer: Answer, containerd: ContainerdError | None = None) -> None:
        super().__init__(answer.reason)
        self.answer = answer
        self.containerd = containerd

    @property
    def kind(self) -> Kind | None:
        return self.answer.kind

    @property
    def message(self) -> str:
        return self.answer.reason


class PostFailed(Exception):
    """An events sink could not post: `retry` when trying again may work, `missing` when
    the Event to patch is gone (it expired from the API server)."""

    def __init__(self, detail: str, *, retry: bool, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry = retry
        self.missing = missing
