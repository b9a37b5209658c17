"""``gateway.upstream.connection``: a request's head goes out with its body in one write (one system call, not two), a big
body is not copied for it, and a request without a body is one write too."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.upstream.connection import Connection
from gateway.upstream.transport import UpstreamTransport


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None


def _writes(method: str, body: bytes) -> list[bytes]:
    """What one exchange writes for ``method`` with ``body`` (answered with a 204)."""

    async def run() -> list[bytes]:
        connection = Connection(UpstreamTransport(1, 1), ("http", "upstream", 80), asyncio.get_running_loop())
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        request = httpx.Request(method, "http://upstream/v1/x?a=1", content=body)
        exchange = asyncio.create_task(connection.exchange(request, {}))
        await asyncio.sleep(0)
        connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert (await exchange).status_code == 204
        return transport.writes

    return asyncio.run(run())


def test_head_and_small_body_go_out_in_one_write() -> None:
    assert _writes("POST", b"hello") == [b"POST /v1/x?a=1 HTTP/1.1\r\nHost: upstream\r\nContent-Length: 5\r\n\r\nhello"]


def test_a_request_without_a_body_is_one_write() -> None:
    assert _writes("GET", b"") == [b"GET /v1/x?a=1 HTTP/1.1\r\nHost: upstream\r\n\r\n"]


def test_a_big_body_is_written_after_the_head_not_joined_to_it() -> None:
    body = b"x" * (1 << 20)
    assert _writes("POST", body) == [
        b"POST /v1/x?a=1 HTTP/1.1\r\nHost: upstream\r\nContent-Length: 1048576\r\n\r\n",
        body,
    ]
