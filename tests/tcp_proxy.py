"""A TCP proxy between a worker and a service, that can cut the network the silent way.

`black_hole()` stops forwarding in both directions without closing anything:
no RST, no FIN, bytes are read and dropped, as when a switch or firewall
drops packets. New connections are accepted and starved alike. `reset()`
then aborts every connection (RST, as when the network comes back and a peer
answers for a connection it forgot) and forwards normally again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BlackHoleProxy"]


class BlackHoleProxy:
    """Forwards 127.0.0.1:<port> to `target_port`; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._holed = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def routed(self, url: str) -> str:
        """`url` (credentials, path and query kept) pointed at this proxy instead."""
        parts = urlsplit(url)
        credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}"))

    def black_hole(self) -> None:
        self._holed = True

    def reset(self) -> None:
        """Abort every proxied connection with RST, then forward again."""
        self._abort_all()
        self._holed = False

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if self._holed:
                    continue  # dropped on the floor, like a packet nobody answers
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            if not self._holed:
                sink.transport.abort()
