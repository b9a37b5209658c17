"""``gateway.upstream.connection``: a request's head goes out with its body in one write (one system call, not two), a big
body is not copied for it, and a request without a body is one write too; the rule for sending a request again."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.proxy.pipeline import resendable
from gateway.upstream.connection import Connection, may_resend
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

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # every write went to the socket at once


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


# ------------------------------------------------------------------------------------------- the resend rule


@pytest.mark.parametrize(
    ("reused", "written", "received", "resend"),
    [
        (True, False, False, True),  # a pooled connection the upstream closed as the request went out
        (False, False, False, False),  # a fresh connection: the upstream failed on this request
        (True, True, False, False),  # the whole request was written: the upstream may have acted on it
        (True, False, True, False),  # a byte of answer came: the upstream read the request
        (False, True, False, False),
        (False, True, True, False),
        (True, True, True, False),
    ],
)
def test_only_a_pooled_connection_that_failed_before_the_whole_request_left_may_resend(
    reused: bool, written: bool, received: bool, resend: bool
) -> None:
    assert may_resend(reused=reused, written=written, received=received) is resend


@pytest.mark.parametrize(
    ("route", "method", "resend"),
    [
        ("/v1/chat/completions", "POST", True),
        ("/v1/completions", "POST", True),
        ("/v1/messages", "POST", True),
        ("/v1/responses", "POST", True),
        ("passthrough", "GET", True),
        ("passthrough", "HEAD", True),
        ("passthrough", "DELETE", True),
        ("passthrough", "PUT", True),
        ("passthrough", "POST", False),  # /v1/batches, /v1/files, /v1/fine_tuning/jobs: never made twice
        ("passthrough", "PATCH", False),
    ],
)
def test_a_passthrough_request_with_effects_is_never_resent(route: str, method: str, resend: bool) -> None:
    assert resendable(route, method) is resend


def test_written_means_every_byte_left_the_write_buffer() -> None:
    """With the buffer's limits at 0 the transport pauses while a byte waits; ``written`` comes with the resume,
    and never from a connection lost with bytes still buffered."""

    class Buffered(_Transport):
        size = 10

        def get_write_buffer_size(self) -> int:
            return self.size

    async def run() -> tuple[bool, bool, bool]:
        connection = Connection(UpstreamTransport(1, 1), ("http", "upstream", 80), asyncio.get_running_loop())
        transport = Buffered()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.pause_writing()
        exchange = asyncio.create_task(
            connection.exchange(httpx.Request("POST", "http://upstream/x", content=b"a"), {})
        )
        await asyncio.sleep(0)
        before = connection.written
        transport.size = 0
        connection.resume_writing()
        after = connection.written
        connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        await exchange

        lost = Connection(UpstreamTransport(1, 1), ("http", "upstream", 80), asyncio.get_running_loop())
        lost.connection_made(Buffered())  # type: ignore[arg-type]
        lost.pause_writing()
        failing = asyncio.create_task(lost.exchange(httpx.Request("POST", "http://upstream/x", content=b"a"), {}))
        await asyncio.sleep(0)
        lost.connection_lost(ConnectionResetError())
        with pytest.raises(httpx.HTTPError):
            await failing
        return before, after, lost.written

    assert asyncio.run(run()) == (False, True, False)
