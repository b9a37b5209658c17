"""A lean HTTP/1.1 load generator for the proxy benchmark: one keep-alive asyncio connection per worker.

httpx as a load generator costs more CPU per request than the servers it measures (at concurrency 16 on two cores
it, not the server, set the throughput); this one writes prepared request bytes and reads the answer with a
minimal parser (``content-length`` or chunked bodies, no trailers), so the servers' own cost shows.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["Connection", "Answer"]

Answer = tuple[float, float, int, bytes]  # total seconds, seconds to the first body byte, status, response head


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``post`` sends one request and waits for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done: asyncio.Future[None] | None = None
        self.started = self.first = 0.0
        self.head_end = -1
        self.length = -1  # content-length; -1 chunked
        self.closed = False  # servers close idle keep-alive connections (uvicorn after 5 s)

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        _, connection = await asyncio.get_running_loop().create_connection(cls, host, port)
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end < 0:
                return
            head = bytes(self.buffer[: self.head_end]).lower()
            at = head.find(b"content-length:")
            self.length = int(head[at + 15 : head.find(b"\r\n", at) % (len(head) + 1)]) if at >= 0 else -1
        body = len(self.buffer) - self.head_end - 4
        if body > 0 and not self.first:
            self.first = time.perf_counter()
        complete = body >= self.length if self.length >= 0 else self.buffer.endswith(b"\r\n0\r\n\r\n")
        if complete and self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def post(self, request: bytes) -> Answer:
        assert self.transport is not None
        self.buffer.clear()
        self.head_end, self.first = -1, 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.started = time.perf_counter()
        self.transport.write(request)
        await asyncio.wait_for(self.done, 30)
        end = time.perf_counter()
        head = bytes(self.buffer[: self.head_end])
        status = int(head[9:12])
        return end - self.started, (self.first or end) - self.started, status, head

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def request_bytes(path: str, body: bytes) -> bytes:
    """A POST of a JSON ``body`` to ``path``, ready to write."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
