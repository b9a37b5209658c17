"""``gateway.upstream.transport``: the HTTP/1.1 upstream client, against real local HTTP/1.1 servers.

Connection reuse, and the answers after which a connection is not reused (closed by the upstream, ``Connection:
close``, HTTP/1.0, a body left half-read); timeouts, a full pool and failures mapped to httpx's exceptions; bodies
streamed as they arrive; HEAD, 204 and 100 Continue; a cancelled request that closes its connection; TLS; which
failures are ``Undelivered`` (the only ones the proxy sends again).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.settings import load_settings
from gateway.upstream.connection import Connection
from gateway.upstream.transport import Undelivered, UpstreamTransport, build_transport

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class _Server:
    """Answers each request with ``body``; ``close_after`` closes the connection after the response; ``stall``
    never answers; counts connections and closed ones."""

    body: bytes = b'{"ok":true}'
    close_after: bool = False
    stall: bool = False
    connections: int = 0
    closed: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                if self.stall:
                    await reader.read()  # until the client goes away
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(self.body), self.body))
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.closed += 1
            writer.close()


@asynccontextmanager
async def _serving(server: _Server | _Scripted) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()


def _client(url: str, transport: httpx.AsyncBaseTransport | None = None, **timeouts: float) -> httpx.AsyncClient:
    settings = load_settings(environ={}, upstream=url)
    timeout = httpx.Timeout(
        5.0,
        connect=timeouts.get("connect", 5.0),
        read=timeouts.get("read", 5.0),
        write=timeouts.get("write", 5.0),
        pool=timeouts.get("pool", 5.0),
    )
    return httpx.AsyncClient(base_url=url, transport=transport or build_transport(settings), timeout=timeout)


async def test_requests_share_one_kept_alive_connection() -> None:
    server = _Server()
    async with _serving(server) as url, _client(url) as client:
        for i in range(3):
            response = await client.post("/v1/x", content=b"body %d" % i)
            assert response.status_code == 200
            assert response.content == server.body
    assert server.connections == 1
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests] == [b"body 0", b"body 1", b"body 2"]


async def test_a_connection_the_upstream_closed_is_not_reused() -> None:
    server = _Server(close_after=True)
    async with _serving(server) as url, _client(url) as client:
        for _ in range(3):
            assert (await client.get("/health")).status_code == 200
            await asyncio.sleep(0.05)  # the close reaches the gateway before the next request
    assert server.connections == 3


async def test_a_large_body_is_written_whole_and_streamed_back() -> None:
    server = _Server(body=b"y" * (4 << 20))
    async with (
        _serving(server) as url,
        _client(url) as client,
        client.stream("POST", "/v1/x", content=b"x" * (8 << 20)) as response,
    ):
        received = b"".join([chunk async for chunk in response.aiter_raw()])
    assert len(server.requests[0]) > 8 << 20
    assert received == server.body


async def test_read_timeout_is_httpx_read_timeout() -> None:
    server = _Server(stall=True)
    async with _serving(server) as url, _client(url, read=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/x", content=b"{}")


async def test_connection_refused_is_httpx_connect_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    listener.close()
    await listener.wait_closed()
    async with _client(url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/health")


async def test_a_cancelled_request_closes_its_connection() -> None:
    server = _Server(stall=True)
    async with _serving(server) as url, _client(url) as client:
        task = asyncio.create_task(client.post("/v1/x", content=b"{}"))
        for _ in range(100):
            if server.requests:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.01)
    assert server.closed == 1


async def test_the_proxy_path_uses_our_transport_not_httpcore() -> None:
    """``build_transport`` is the gateway's own HTTP/1.1 client (no httpcore, h11 or anyio under it)."""
    server = _Server()
    settings = load_settings(environ={}, upstream="http://127.0.0.1:1")
    transport = build_transport(settings)
    assert type(transport) is UpstreamTransport
    async with _serving(server) as url, _client(url, transport) as client:
        assert (await client.get("/health")).status_code == 200
    assert server.requests[0].startswith(b"GET /health HTTP/1.1\r\n")
    assert server.requests[0].lower().count(b"\r\nhost: 127.0.0.1:") == 1


async def test_tls_upstream(tmp_path: Path) -> None:
    """An https upstream: the connection is made over TLS and the certificate checked."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = _Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_context)
    url = f"https://localhost:{listener.sockets[0].getsockname()[1]}"
    settings = load_settings(environ={}, upstream=url)
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with _client(url, build_transport(settings, ssl_context=trusting)) as client:
            for _ in range(2):
                response = await client.get("/health")
                assert response.status_code == 200
                assert response.content == server.body
        assert server.connections == 1
        async with _client(url) as strict:
            with pytest.raises(httpx.ConnectError):  # a certificate the client does not trust
                await strict.get("/health")
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------------ scripted answers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class _Scripted:
    """Each connection reads one request and runs ``script``; counts connections."""

    script: Script
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await self.script(reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


def _answering(*answers: bytes) -> Script:
    """A script that writes ``answers`` in turn (the last one again after that)."""
    queue = list(answers)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(queue.pop(0) if len(queue) > 1 else queue[0])

    return script


async def test_a_chunked_answer_streams_chunk_by_chunk() -> None:
    second = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    server = _Scripted(script)
    async with _serving(server) as url, _client(url) as client, client.stream("GET", "/s") as response:
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first"  # before the server wrote the second chunk
        second.set()
        assert [chunk async for chunk in chunks] == [b"second"]
        assert (await client.get("/again")).status_code == 200
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive"],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(answer: bytes) -> None:
    server = _Scripted(_answering(answer))
    async with _serving(server) as url, _client(url) as client:
        for _ in range(2):
            response = await client.get("/x")
            assert (response.status_code, response.content) == (200, b"ok")
    assert server.connections == 2


@pytest.mark.parametrize("fields", [b"", b"transfer-encoding: identity\r\n"], ids=["no-length", "te-identity"])
async def test_a_body_that_ends_with_the_connection(fields: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n%b\r\nuntil the end" % fields)
        writer.close()

    async with _serving(_Scripted(script)) as url, _client(url) as client:
        assert (await client.get("/x")).content == b"until the end"


async def test_eof_before_any_byte_is_a_remote_protocol_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _serving(_Scripted(script)) as url, _client(url) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get("/x")


async def test_eof_mid_body_is_a_remote_protocol_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        writer.close()

    async with _serving(_Scripted(script)) as url, _client(url) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.get("/x")
        assert caught.value.request.url.path == "/x"


async def test_a_garbage_answer_is_a_remote_protocol_error() -> None:
    async with _serving(_Scripted(_answering(b"SMTP ready\r\n\r\n"))) as url, _client(url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/x")


async def test_head_answer_with_a_length_has_no_body() -> None:
    server = _Scripted(_answering(b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"))
    async with _serving(server) as url, _client(url) as client:
        for _ in range(2):
            response = await client.head("/x")
            assert (response.status_code, response.headers["content-length"], response.content) == (200, "42", b"")
    assert server.connections == 1


async def test_204_and_100_continue() -> None:
    server = _Scripted(
        _answering(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
    )
    async with _serving(server) as url, _client(url) as client:
        response = await client.get("/x")
        assert (response.status_code, response.content) == (204, b"")
        response = await client.post("/x", content=b"{}")
        assert (response.status_code, response.content) == (200, b"ok")
    assert server.connections == 1


async def test_a_full_pool_is_a_pool_timeout() -> None:
    server = _Server(stall=True)
    transport = UpstreamTransport(max_connections=1, max_keepalive=1)
    async with _serving(server) as url, _client(url, transport, pool=0.2) as client:
        held = asyncio.create_task(client.post("/v1/x", content=b"{}"))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/health")
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        server.stall = False
        assert (await client.get("/health")).status_code == 200  # the cancelled request gave its slot back


async def test_a_half_read_body_closes_its_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nhalf")  # and the rest never

    server = _Scripted(script)
    async with _serving(server) as url, _client(url) as client:
        async with client.stream("GET", "/x") as response:
            assert await anext(response.aiter_raw()) == b"half"
        await asyncio.wait_for(server.closed.wait(), 2)
        async with client.stream("GET", "/x") as response:
            assert await anext(response.aiter_raw()) == b"half"
    assert server.connections == 2


async def test_a_stalled_body_is_a_read_timeout_and_closes_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nhalf")

    server = _Scripted(script)
    async with _serving(server) as url, _client(url, read=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/x")
        await asyncio.wait_for(server.closed.wait(), 2)


async def test_an_upstream_that_stops_reading_is_a_write_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)  # reads nothing of the body

    server = _Scripted(script)
    async with _serving(server) as url, _client(url, write=0.3) as client:
        with pytest.raises(httpx.WriteTimeout):
            await client.post("/x", content=b"x" * (64 << 20))


# ------------------------------------------------------------------------------------------- the resend rule


async def test_a_fresh_connection_closed_unanswered_is_not_undelivered() -> None:
    """The upstream read the request and closed: it may have acted on it, so the failure is not ``Undelivered``."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _serving(_Scripted(script)) as url, _client(url) as client:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post("/v1/batches", content=b"{}")
    assert not isinstance(caught.value, Undelivered)


async def test_a_pooled_connection_closed_after_the_whole_request_is_not_undelivered() -> None:
    answers = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answers:
            writer.write(answers.pop())
        else:
            writer.close()  # the second request, read whole, never answered

    server = _Scripted(script)
    async with _serving(server) as url, _client(url) as client:
        assert (await client.post("/x", content=b"1")).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.post("/x", content=b"2")
    assert server.connections == 1  # the second request went out on the pooled connection
    assert not isinstance(caught.value, Undelivered)


async def test_a_pooled_connection_reset_before_the_request_left_is_undelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upstream reset a kept-alive connection while it idled, and the gateway took it before it could see that
    (the poll in ``still_open`` raced the reset): the write fails, nothing of the request reached the upstream."""
    done = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        done.set()

    monkeypatch.setattr(Connection, "still_open", lambda self: not self.closed)
    async with _serving(_Scripted(script)) as url, _client(url) as client:
        assert (await client.get("/x")).content == b"ok"
        await done.wait()
        time.sleep(0.1)  # the reset reaches the socket; the loop does not run, so the pool has not seen it
        with pytest.raises(Undelivered):
            await client.post("/v1/chat/completions", content=b"{}")


async def test_an_upstream_that_closes_after_chunked_answers_gets_no_pooled_connection_after_one() -> None:
    """llama-server closes a kept-alive connection after every streamed answer, announcing keep-alive: a request
    written into it before the close arrives would get no answer and could not be sent again. Once the pool has
    seen such a close, it keeps no connection after a chunked answer from that upstream."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # the engine's thread closes a little later (a loaded machine)
        writer.close()
        raise ConnectionError  # this connection is done

    server = _Scripted(script)
    async with _serving(server) as url, _client(url) as client:
        assert (await client.get("/s")).content == b"ok"
        await asyncio.sleep(0.5)  # the close arrives while the connection idles: learned
        for _ in range(3):  # back to back: each would otherwise go out on the connection about to close
            assert (await client.get("/s")).content == b"ok"
    assert server.connections == 4


async def test_a_pool_told_its_engine_closes_after_chunked_answers_keeps_none_from_the_start() -> None:
    """``--engine llamacpp``: no connection is pooled after a chunked answer, even before a close was seen; answers
    with a length keep their connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")

    chunked = _Scripted(script)
    settings = load_settings(environ={})
    async with _serving(chunked) as url, _client(url, build_transport(settings, keep_after_chunked=False)) as client:
        for _ in range(3):
            assert (await client.get("/s")).content == b"ok"
    assert chunked.connections == 3
    sized = _Server()
    async with _serving(sized) as url, _client(url, build_transport(settings, keep_after_chunked=False)) as client:
        for _ in range(3):
            assert (await client.get("/s")).status_code == 200
    assert sized.connections == 1
