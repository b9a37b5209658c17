"""``gateway.transport``: a request's head goes out with its body in one write (one system call, not two), a big
body is not copied for it, and a head without a body goes out before the response is read."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.transport import _Connection, _Stream


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None


def _stream() -> tuple[_Stream, _Connection, _Transport]:
    connection = _Connection()
    transport = _Transport()
    connection.transport = transport
    return _Stream(connection), connection, transport


def test_head_and_small_body_go_out_in_one_write() -> None:
    async def run() -> list[bytes]:
        stream, connection, transport = _stream()
        await stream.write(b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n")
        assert transport.writes == []  # held until the body (or a read)
        await stream.write(b"hello")
        await stream.write(b"")  # h11's end of a content-length body
        connection.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
        assert await stream.read(65536) == b"HTTP/1.1 200 OK\r\n\r\n"
        return transport.writes

    assert asyncio.run(run()) == [b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"]


def test_a_head_alone_is_sent_before_the_read() -> None:
    async def run() -> list[bytes]:
        stream, connection, transport = _stream()
        await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        await stream.read(65536)
        return transport.writes

    assert asyncio.run(run()) == [b"GET / HTTP/1.1\r\n\r\n"]


def test_a_big_body_is_written_after_the_head_not_joined_to_it() -> None:
    body = b"x" * (1 << 20)

    async def run() -> list[bytes]:
        stream, _, transport = _stream()
        await stream.write(b"POST / HTTP/1.1\r\n\r\n")
        await stream.write(body)
        return transport.writes

    assert asyncio.run(run()) == [b"POST / HTTP/1.1\r\n\r\n", body]
