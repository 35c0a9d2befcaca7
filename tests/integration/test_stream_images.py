"""StreamImages (CRI 1.36) through nodekeeper against a real containerd: forwarded as the
server-streaming call it is, and containerd's answer, a refusal included, comes back as
containerd gave it. containerd implements it from 2.4 on; every version here answers
UNIMPLEMENTED, which is what tells a kubelet 1.36 to use ListImages instead."""

from __future__ import annotations

import grpc
import pytest

from tests.harness import Containerd, CriClient
from tests.harness.nodekeeper import Nodekeeper

pytestmark = pytest.mark.integration


def refusal(socket: str) -> grpc.RpcError:
    with CriClient(socket, timeout=10) as client, pytest.raises(grpc.RpcError) as caught:
        client.stream_images()
    return caught.value


def test_stream_images_unimplemented_comes_back_unchanged(
    containerd: Containerd, nodekeeper: Nodekeeper
) -> None:
    direct = refusal(containerd.address)
    through = refusal(nodekeeper.socket)
    assert direct.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert through.code() == direct.code()  # type: ignore[attr-defined]
    assert through.details() == direct.details()  # type: ignore[attr-defined]
    [line] = [e for e in nodekeeper.events() if e.get("rpc") == "StreamImages"]
    assert (line["outcome"], line["code"]) == ("error", "UNIMPLEMENTED")
