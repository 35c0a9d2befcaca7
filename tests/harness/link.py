"""A slow, shared link to a server on loopback: what a cluster's way to the internet looks
like to its upstream registry.

    with Link(registry.host, rtt=0.04, mbit=100) as link:
        ...  # pull from link.host instead of registry.host

A TCP proxy: every byte arrives half the round trip after it was sent, in both
directions, and the bytes the server sends back (the downloads) share `mbit` megabits a
second across every connection, as the nodes of a cluster behind one NAT address share
its bandwidth. Uploads are delayed but not limited. Its own event loop runs on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.harness._proc import Service

_CHUNK = 64 * 1024
_QUEUED = 64  # chunks in flight per direction: at most 4 MiB of one connection held here


class Link(Service):
    def __init__(self, target: str, *, rtt: float, mbit: float) -> None:
        if rtt < 0 or mbit <= 0:
            raise ValueError("a link needs rtt >= 0 and mbit > 0")
        self._target_host, _, port = target.rpartition(":")
        self._target_port = int(port)
        self.delay = rtt / 2
        self.bytes_per_second = mbit * 1e6 / 8
        self._free_at = 0.0  # when the shared downlink has sent what it was given
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.host = ""
        self.url = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="link",
                                        daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"

    def close(self) -> None:
        if self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader,
                     client_out: asyncio.StreamWriter) -> None:
        # Ended by close() as well: asyncio logs a connection callback that was cancelled.
        with contextlib.suppress(asyncio.CancelledError):
            await self._connect(client_in, client_out)

    async def _connect(self, client_in: asyncio.StreamReader,
                       client_out: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(2 * self.delay)  # the TCP handshake's round trip
            server_in, server_out = await asyncio.open_connection(self._target_host,
                                                                  self._target_port)
        except OSError:
            client_out.close()
            return
        pumps = [asyncio.ensure_future(self._pump(client_in, server_out, shared=False)),
                 asyncio.ensure_future(self._pump(server_in, client_out, shared=True))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_out, server_out):
                writer.close()

    def _arrival(self, size: int, shared: bool) -> float:
        """When a chunk read now reaches the far end: on the shared downlink it is sent
        once everything before it (on every connection) has been."""
        now = self._loop.time()
        if shared:
            self._free_at = max(now, self._free_at) + size / self.bytes_per_second
            now = self._free_at
        return now + self.delay

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    shared: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED)

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                await asyncio.sleep(max(0.0, at - self._loop.time()))
                if not data:
                    with contextlib.suppress(OSError):
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await source.read(_CHUNK)
                await queue.put((self._arrival(len(data), shared), data))
                if not data:
                    break
            await delivering
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            delivering.cancel()
