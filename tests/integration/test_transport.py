"""``gateway.transport``: httpx's transport on the asyncio network backend, against a real local HTTP/1.1 server.

Connection reuse, a kept-alive connection the upstream closed (not reused), timeouts and failures mapped to httpx's
exceptions, streamed bodies, a cancelled request that closes its connection, and a TLS upstream.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx
import pytest

from gateway.settings import load_settings
from gateway.transport import AsyncioBackend, build_transport

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
async def _serving(server: _Server) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()


def _client(url: str, **timeouts: float) -> httpx.AsyncClient:
    settings = load_settings(environ={}, upstream=url)
    timeout = httpx.Timeout(timeouts.get("read", 5.0), connect=timeouts.get("connect", 5.0))
    return httpx.AsyncClient(base_url=url, transport=build_transport(settings), timeout=timeout)


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


async def test_the_transport_uses_the_asyncio_backend() -> None:
    """httpx has no backend option: ``build_transport`` replaces its pool; this fails if httpx stops using it."""
    server = _Server()
    connects = 0
    original = AsyncioBackend.connect_tcp

    async def counting(self: AsyncioBackend, *args: object, **kwargs: object) -> object:
        nonlocal connects
        connects += 1
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    async with _serving(server) as url, _client(url) as client:
        AsyncioBackend.connect_tcp = counting  # type: ignore[method-assign,assignment]
        try:
            assert (await client.get("/health")).status_code == 200
        finally:
            AsyncioBackend.connect_tcp = original  # type: ignore[method-assign]
    assert connects == 1


async def test_tls_upstream(tmp_path: Path) -> None:
    """An https upstream: the connection is upgraded with ``start_tls`` and the certificate checked."""
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
    port = listener.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with httpcore.AsyncConnectionPool(ssl_context=trusting, network_backend=AsyncioBackend()) as pool:
            response = await pool.request("GET", f"https://localhost:{port}/health")
            assert response.status == 200
            assert response.content == server.body
            with pytest.raises(httpcore.ConnectError):  # a certificate the client does not trust
                async with httpcore.AsyncConnectionPool(network_backend=AsyncioBackend()) as strict:
                    await strict.request("GET", f"https://localhost:{port}/health")
    finally:
        listener.close()
