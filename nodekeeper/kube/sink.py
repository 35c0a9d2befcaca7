"""Where kube/events.py posts: core/v1 Events through the API client (an
`edges.Sink`)."""

from __future__ import annotations

from typing import Any

from nodekeeper.errors import PostFailed
from nodekeeper.kube.client import ApiError, Client
from nodekeeper.kube.kubeconfig import Kubeconfig

# Worth another try later: the server or the way to it may come back, credentials may be
# rotated in place. Anything else is the API server saying no to this Event.
_RETRY = frozenset({"unreachable", "timeout", "server_error", "rate_limited", "credentials"})


def _failed(exc: ApiError) -> PostFailed:
    return PostFailed(exc.detail, retry=exc.kind in _RETRY, missing=exc.kind == "not_found")


class ApiSink:
    def __init__(self, path: str, timeout: float, loaded: Kubeconfig | None = None) -> None:
        self._client = Client(path, timeout, loaded)

    async def prepare(self) -> None:
        await self._client.prepare()

    async def create(self, namespace: str, event: dict[str, Any]) -> None:
        try:
            await self._client.request("POST", f"/api/v1/namespaces/{namespace}/events", event)
        except ApiError as exc:
            # Ours already: an earlier create went through and its answer was lost.
            if exc.kind == "conflict":
                return
            raise _failed(exc) from None

    async def patch(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        try:
            await self._client.request(
                "PATCH", f"/api/v1/namespaces/{namespace}/events/{name}", changes,
                content_type="application/strategic-merge-patch+json")
        except ApiError as exc:
            raise _failed(exc) from None

    async def close(self) -> None:
        await self._client.close()
