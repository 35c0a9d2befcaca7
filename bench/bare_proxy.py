"""The floor: the simplest grpc.aio proxy for runtime.v1.ImageService in front of containerd.

Every /runtime.v1.ImageService/* call is forwarded as raw bytes (no serializers, no parsing,
no logging, no metrics) over one shared channel with the same 16 MiB message limits as
nodekeeper. Whatever nodekeeper costs above this is the cost of nodekeeper itself.

    python bench/bare_proxy.py --listen SOCK --containerd SOCK [--answer-pull IMAGE_ID]
                               [--with-libraries]

With --answer-pull, PullImage is not forwarded but answered at once with IMAGE_ID: the floor
for a PullImage that nodekeeper answers from what it knows (inside an `interval`).
With --with-libraries, it also imports the runtime libraries nodekeeper is built on (and
uses none of them): the memory floor for any daemon built from those parts.

Sends READY=1 to $NOTIFY_SOCKET once listening (when set); SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
import grpc.aio

SERVICE_PREFIX = "/runtime.v1.ImageService/"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

Context = grpc.aio.ServicerContext[bytes, bytes]
# Generic for the type checker only; a string, as the runtime class is not subscriptable.
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[bytes, bytes]"


class _Forward(grpc.GenericRpcHandler):
    """Answers every ImageService method by sending the same bytes to containerd."""

    def __init__(self, channel: grpc.aio.Channel, answer_pull: str) -> None:
        self._channel = channel
        self._handlers: dict[str, MethodHandler] = {}
        if answer_pull:
            self._handlers[SERVICE_PREFIX + "PullImage"] = grpc.unary_unary_rpc_method_handler(
                _answer(_pull_response(answer_pull)))

    def service(self, details: grpc.HandlerCallDetails) -> MethodHandler | None:
        method: str = details.method
        if not method.startswith(SERVICE_PREFIX):
            return None
        handler = self._handlers.get(method)
        if handler is None:
            handler = grpc.unary_unary_rpc_method_handler(self._forwarder(method))
            self._handlers[method] = handler
        return handler

    def _forwarder(self, method: str) -> Callable[[bytes, Context], Awaitable[bytes]]:
        upstream: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)

        async def forward(request: bytes, context: Context) -> bytes:
            try:
                answer: bytes = await upstream(request, timeout=context.time_remaining())
                return answer
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return forward


def _pull_response(image_id: str) -> bytes:
    """PullImageResponse{image_ref = image_id}, encoded by hand to keep protobuf out."""
    value = image_id.encode()
    length, varint = len(value), bytearray()
    while length >= 0x80:
        varint.append(length & 0x7F | 0x80)
        length >>= 7
    varint.append(length)
    return b"\x0a" + bytes(varint) + value  # field 1, length-delimited


def _answer(response: bytes) -> Callable[[bytes, Context], Awaitable[bytes]]:
    async def answer(request: bytes, context: Context) -> bytes:
        return response

    return answer


# Beside grpcio: the runtime dependencies nodekeeper's design prescribes, the standard
# library modules it keeps state and fingerprints with, and its generated protobuf modules.
LIBRARIES = ("httpx", "structlog", "yaml", "sdnotify", "sqlite3", "hmac", "hashlib",
             "google.protobuf", "nodekeeper._proto.cri_image_pb2",
             "nodekeeper._proto.containerd_images_pb2",
             "nodekeeper._proto.containerd_events_pb2")


def _import_libraries() -> None:
    bench = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(bench))  # the checkout, for nodekeeper._proto
    for name in LIBRARIES:
        importlib.import_module(name)


def _notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


async def _serve(listen: str, containerd: str, answer_pull: str) -> None:
    channel = grpc.aio.insecure_channel(f"unix://{containerd}", options=OPTIONS)
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_Forward(channel, answer_pull),))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(listen)
    server.add_insecure_port(f"unix://{listen}")
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    _notify_ready()
    await stop.wait()
    await server.stop(1.0)
    await channel.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(listen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--listen", required=True, help="unix socket to serve on")
    parser.add_argument("--containerd", required=True, help="containerd's socket")
    parser.add_argument("--answer-pull", default="", metavar="IMAGE_ID",
                        help="answer PullImage at once with this image ID")
    parser.add_argument("--with-libraries", action="store_true",
                        help="import nodekeeper's runtime libraries, unused")
    args = parser.parse_args()
    if args.with_libraries:
        _import_libraries()
    asyncio.run(_serve(args.listen, args.containerd, args.answer_pull))


if __name__ == "__main__":
    main()
