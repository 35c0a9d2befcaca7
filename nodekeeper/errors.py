"""Every exception nodekeeper defines, drawn as one tree.

    Exception
    ├── NodekeeperError            raised on purpose; the message is safe to show
    │   ├── SettingsError          a config or policy file is invalid (names file, line, key)
    │   │   └── KubeconfigError    the kubeconfig Events would be posted with is unusable
    │   ├── StartupError           the daemon cannot start (socket taken, cannot bind, ...)
    │   ├── RequestError           a CRI request is malformed
    │   ├── PullFailed             PullImage cannot be answered: the answer record (a failure
    │   │                          Kind, the message saying what was tried), and containerd's
    │   │                          own answer if any
    │   ├── ContainerdError        containerd answered with an error: its code and message
    │   │   └── ContainerdUnavailable  containerd's socket does not answer
    │   ├── ApiError               the Kubernetes API did not do what was asked: one ApiKind
    │   ├── PostFailed             an events sink could not post: whether to retry, whether
    │   │                          the Event to patch is gone; never reaches the kubelet
    │   ├── StateUnreadable        `status` or `explain` cannot read the state database
    │   └── StateCorrupt           the state database is damaged; state/disk.py moves it
    │                              aside and starts a new one, so it never leaves there
    ├── failures.Failure           something outside nodekeeper failed: one failures.Kind
    │   └── ContainerdRefusedPull  containerd refused a pull (classified like a registry's;
    │                              the decision's own refusal is `decision.Refuse`, answered
    │                              as PullFailed)
    ├── ValueError                 raised by the pure parsers of pull/, whose callers say
    │   │                          what the bad value was for
    │   ├── pull.reference.InvalidReference  not an image reference
    │   └── pull.regex.PatternError          a tag pattern RE2 cannot match in linear time
    └── yaml.MarkedYAMLError
        └── settings._Refused      YAML refused while composing (an alias, too deep, too
                                   many values); leaves settings.py as a SettingsError

`failures.Failure` stands apart because failures.py sits below this module (the Kind
vocabulary is imported here). Failures of things outside nodekeeper (registries, token
services, containerd's pulls) are Failures with a `Kind`; the Kubernetes API's are
ApiErrors with an `ApiKind`. cri.py is the one place that turns errors into gRPC status
codes.
"""

from __future__ import annotations

import enum

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


class PostFailed(NodekeeperError):
    """An events sink could not post: `retry` when trying again may work, `missing` when
    the Event to patch is gone (it expired from the API server)."""

    def __init__(self, detail: str, *, retry: bool, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry = retry
        self.missing = missing


class KubeconfigError(SettingsError):
    """A kubeconfig cannot be used; the message names the file, line and key."""


class ApiKind(str, enum.Enum):
    """How a request to the Kubernetes API failed."""

    UNREACHABLE = "unreachable"    # no connection, or TLS failed
    TIMEOUT = "timeout"            # no answer within the client's timeout
    UNAUTHORIZED = "unauthorized"  # 401: the credentials were not accepted
    FORBIDDEN = "forbidden"        # 403: authenticated, not allowed (or namespace terminating)
    NOT_FOUND = "not_found"        # 404
    CONFLICT = "conflict"          # 409
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx
    INVALID = "invalid"            # another 4xx, or an answer that is not what the API sends
    CREDENTIALS = "credentials"    # the kubeconfig or its exec plugin gave no usable credential

    def __str__(self) -> str:
        return self.value


class ApiError(NodekeeperError):
    """A request to the Kubernetes API did not succeed: `kind` says how, `status` is the
    HTTP status when there was one (else 0)."""

    def __init__(self, kind: ApiKind, detail: str, status: int = 0) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status


class StateUnreadable(NodekeeperError):
    """The state database exists but cannot be read now (damaged, locked, not a file)."""


class StateCorrupt(NodekeeperError):
    """The state database file is damaged or not a database."""
