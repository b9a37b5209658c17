"""The upstream connection pool: httpx's HTTP/1.1 transport on plain asyncio connections.

httpx's transport runs httpcore, whose default network layer on asyncio is anyio: every read and write enters a
cancel scope (``anyio.fail_after``) and an anyio socket stream. On the proxy path that was ~13% of the gateway's
CPU per request (``python -m bench proxy``; cProfile inside ``prefixgate serve``). ``AsyncioBackend`` implements
httpcore's public network-backend interface on an asyncio ``Protocol`` and ``asyncio.timeout``; HTTP itself
(h11, connection reuse, httpx's exception mapping) is still httpcore's and httpx's.

Semantics kept: connect, read and write timeouts raise httpcore's ``ConnectTimeout``/``ReadTimeout``/
``WriteTimeout``; socket failures raise ``ConnectError``/``ReadError``/``WriteError``; a cancelled task (a client
that went away) cancels the read or write it is in; ``is_readable`` tells httpcore a kept-alive connection the
upstream closed (or wrote to out of turn) must not be reused; TLS upstreams are upgraded with ``start_tls``.
"""

from __future__ import annotations

import asyncio
import select
import ssl
import typing
from collections.abc import Iterable

import httpcore
import httpx

from gateway.settings import Settings

__all__ = ["AsyncioBackend", "build_transport"]

SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
_HOLD_BYTES = 8192  # a request head; longer writes go out at once
_JOIN_BYTES = 256 << 10  # a held head is joined to a body up to this size, written before a bigger one
_EXTRA = {"server_addr": "peername", "client_addr": "sockname", "socket": "socket", "ssl_object": "ssl_object"}


def build_transport(settings: Settings) -> httpx.AsyncHTTPTransport:
    """The upstream connection pool, on ``AsyncioBackend``. The proxy sends through it directly
    (``gateway.upstream.UpstreamSender``); the client wrapping it owns its lifetime."""
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_keepalive,
        # below the 5 s idle timeout of uvicorn (vLLM, SGLang, the simulated engine): an idle connection is
        # dropped here before the engine closes it, so no request is ever written into a closing connection
        keepalive_expiry=4.0,
    )
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx takes no network backend, so its pool is replaced by one built with the same settings and ours.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=AsyncioBackend(),
    )
    return transport


class _Connection(asyncio.Protocol):
    """Bytes received but not yet read, end of stream, and write flow control, for one connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.eof = False
        self.error: Exception | None = None
        self.readable: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None  # set while the transport's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close the transport: HTTP/1.1 never writes after the peer's end of stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self.writable = self.writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self.readable = self.readable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Stream(httpcore.AsyncNetworkStream):
    """One connection as httpcore sees it.

    A short write (a request's head) is held and sent with the next write (its body) or before the next read: one
    send per request instead of two (each a system call, ~4% of the gateway's CPU per request on the proxy path).
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._held = b""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's API)
        if self._held:
            await self._send(b"", timeout)
        connection = self._connection
        if not connection.buffer and not connection.eof:
            connection.readable = waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise httpcore.ReadTimeout("timed out reading from the upstream") from None
        if connection.buffer:
            data, connection.buffer = connection.buffer[:max_bytes], connection.buffer[max_bytes:]
            return data
        if connection.error is not None:
            raise httpcore.ReadError(str(connection.error)) from connection.error
        return b""  # end of stream: httpcore reports the server as disconnected

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        if not self._held and len(buffer) <= _HOLD_BYTES:
            self._held = buffer  # sent with the next write, or before the next read
            return
        await self._send(buffer, timeout)

    async def _send(self, buffer: bytes, write_timeout: float | None) -> None:
        held, self._held = self._held, b""
        connection = self._connection
        transport = connection.transport
        if transport is None or transport.is_closing():
            raise httpcore.WriteError("the upstream connection is closed")
        try:
            if held and len(buffer) > _JOIN_BYTES:
                transport.write(held)  # a big body is not copied to save one system call
            elif held:
                buffer = held + buffer
            transport.write(buffer)
        except (OSError, RuntimeError) as exc:
            raise httpcore.WriteError(str(exc)) from exc
        waiter = connection.writable
        if waiter is not None:
            try:
                async with asyncio.timeout(write_timeout):
                    await asyncio.shield(waiter)
            except TimeoutError:
                raise httpcore.WriteTimeout("timed out writing to the upstream") from None
        if connection.error is not None:
            raise httpcore.WriteError(str(connection.error)) from connection.error

    async def aclose(self) -> None:
        transport = self._connection.transport
        if transport is not None:
            transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        connection = self._connection
        assert connection.transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                upgraded = await loop.start_tls(
                    connection.transport, connection, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out in the TLS handshake with the upstream") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        if upgraded is None:
            raise httpcore.ConnectError("the upstream connection closed during the TLS handshake")
        connection.transport = upgraded
        return self

    def get_extra_info(self, info: str) -> typing.Any:
        connection = self._connection
        if info == "is_readable":
            # the upstream closed the connection or sent bytes out of turn: httpcore must not reuse it. The socket is
            # polled too: an end of stream that arrived while the loop was busy is not yet in ``connection.eof``
            return connection.eof or bool(connection.buffer) or _socket_readable(connection.transport)
        name = _EXTRA.get(info)
        if name is None or connection.transport is None:
            return None
        return connection.transport.get_extra_info(name)


def _socket_readable(transport: asyncio.Transport | None) -> bool:
    """Whether the socket has bytes (or an end of stream) the loop has not read yet; a closed one counts as
    readable, so it is not reused."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer on plain asyncio connections (TCP, optionally upgraded to TLS)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address is not None else None
        try:
            async with asyncio.timeout(timeout):
                transport, connection = await loop.create_connection(_Connection, host, port, local_addr=local)
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out connecting to the upstream") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(connection)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
