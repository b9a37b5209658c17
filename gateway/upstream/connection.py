"""One upstream HTTP/1.1 connection for ``gateway.upstream.transport``: socket events, httptools' parser callbacks,
and one exchange at a time (the request written in one send, the answer's head awaited, its body streamed as it
arrives).

Waits are a future and a loop timer (``call_later``), not ``asyncio.timeout``: no task cancellation and uncancel
per read. Whatever the failure, the connection is closed (``abort``) and the pool told when the body is closed.

A connection knows whether it was taken from the pool (``reused``), whether the whole request reached the socket
(``written``: the write buffer's limits are 0, so ``resume_writing`` says when its last byte left) and whether a
byte of answer came back (``received``): :func:`may_resend` decides from those alone whether a failed exchange may
be sent again (``docs/reliability.md``, "When a request is sent again").
"""

from __future__ import annotations

import asyncio
import select
import typing
from collections.abc import AsyncIterator

import httptools
import httpx

if typing.TYPE_CHECKING:
    from gateway.upstream.transport import Origin, UpstreamTransport

__all__ = ["Connection", "Undelivered", "expire", "may_resend"]

_JOIN_BYTES = 256 << 10  # the head is joined to a body up to this size (one send), written before a bigger one
_HIGH_WATER = 1 << 20  # unread response bytes above which the socket is no longer read
_HTTP11 = b"HTTP/1.1"
_HTTP10 = b"HTTP/1.0"


def may_resend(*, reused: bool, written: bool, received: bool) -> bool:
    """Whether a request whose exchange failed cannot have been processed, so sending it again is safe.

    Only on a kept-alive connection taken from the pool (its upstream may have closed it while it idled, as the
    request went out), and only when the request did not reach the socket whole (the write failed, or the
    connection closed with an end of stream or a reset before its last byte left) and no byte of answer came.
    Never on a fresh connection (an upstream has no reason to close one it just accepted: it failed on this
    request), never once the whole request was written (the upstream may have read it and acted on it).
    """
    return reused and not written and not received


class Undelivered(httpx.WriteError):
    """The request did not reach the upstream whole, on a kept-alive connection taken from the pool
    (:func:`may_resend`): the upstream cannot have processed it."""


class Connection(asyncio.Protocol):
    """One upstream connection: its socket events, its response parser's callbacks, and one exchange at a time."""

    def __init__(self, pool: UpstreamTransport, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.poller = select.poll()
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.idle = False
        self.idle_since = 0.0
        self.reused = False  # taken from the pool (set by the pool): it has carried an exchange before
        self.closed = False  # the connection is lost
        self.error: Exception | None = None  # the socket error it was lost to
        self.invalid: str | None = None  # why the answer could not be parsed
        self.waiter: asyncio.Future[bool] | None = None  # the reader's: True woken, False timed out
        self.writable: asyncio.Future[None] | None = None  # set while the transport's write buffer is full
        self._begin(b"")

    def _begin(self, method: bytes) -> None:
        """Reset the state of one exchange."""
        self.head_only = method == b"HEAD"
        self.received = self.head = self.complete = self.interim = self.paused = False
        self.writing = False  # the request's last byte was handed to the transport; ``written`` when it left
        self.written = False
        self.reuse = True  # narrowed by the request's and the answer's headers
        self.status = 0
        self.reason = b""
        self.http_version = _HTTP11
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0

    # ---------------------------------------------------------------------------------------- socket events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=0)  # paused while any byte waits: resumed when the last left
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.idle:  # bytes out of turn: the connection cannot carry another exchange
            self.abort()
            return
        self.received = True
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.invalid = str(exc) or type(exc).__name__
            self.abort()
            self._wake(True)

    def eof_received(self) -> bool:
        return False  # close the transport: HTTP/1.1 never writes after the peer's end of stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # first: bytes still buffered never left, ``resume_writing`` below must not say so
        self.error = exc
        self.reuse = False
        if self.head and not self.complete and exc is None and not self._delimited():
            self.complete = True  # a body delimited by the end of the connection
        self._wake(True)
        self.resume_writing()
        if self.idle:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writing and not self.closed:
            self.written = True  # the write buffer is empty: the request's last byte reached the socket
        waiter, self.writable = self.writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.reuse = False  # a second answer to one request

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue and the like: the answer follows
            self.interim = True
            self.headers = []
            self.reason = b""
            return
        self.status = status
        if parser.get_http_version() != "1.1":
            self.http_version = _HTTP10
            self.reuse = False
        elif not parser.should_keep_alive():
            self.reuse = False
        self.head = True
        if self.head_only:
            self.complete = True
            self.parser = None  # it would wait for the body the length announces: the next exchange gets a new one
        self._wake(True)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.reuse = False  # a body after a HEAD answer
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake(True)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake(True)

    # ---------------------------------------------------------------------------------------- one exchange

    async def exchange(self, request: httpx.Request, timeouts: dict[str, float | None]) -> httpx.Response:
        """Write ``request``, wait for the head of its answer; the body streams from the response."""
        method = request.method.encode("ascii")
        self._begin(method)
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        await self._write(request, method, timeouts.get("write"))
        read_timeout = timeouts.get("read")
        while not self.head:
            if self.closed or self.invalid is not None:
                raise self._failure(request)
            await self._wait(read_timeout, request)
        extensions = {"http_version": self.http_version, "reason_phrase": self.reason}
        stream = _Body(self, request, read_timeout)
        return httpx.Response(self.status, headers=self.headers, stream=stream, extensions=extensions, request=request)

    def _serialise_head(self, request: httpx.Request, method: bytes) -> bytes:
        """The request line and exactly the request's headers (httpx has added ``Host`` and the body's length)."""
        parts = [method, b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            if len(name) == 10 and name.lower() == b"connection" and b"close" in value.lower():
                self.reuse = False
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _write(self, request: httpx.Request, method: bytes, seconds: float | None) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise httpx.WriteError("the upstream connection is closed", request=request)
        head = self._serialise_head(request, method)
        try:
            body = request.content
        except httpx.RequestNotRead:
            await self._write_streamed(request, transport, head, seconds)
            return
        try:
            if len(body) <= _JOIN_BYTES:
                self._last_write(transport, head + body)
            else:
                transport.write(head)  # a big body is not copied to save one system call
                self._last_write(transport, body)
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(str(exc), request=request) from exc
        await self._drain(seconds, request)

    async def _write_streamed(
        self, request: httpx.Request, transport: asyncio.Transport, head: bytes, seconds: float | None
    ) -> None:
        """A body from an async iterator, framed in chunks when the request says so."""
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream), "the upstream transport is asynchronous"
        try:
            transport.write(head)
            async for chunk in stream:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await self._drain(seconds, request)
            self._last_write(transport, b"0\r\n\r\n" if chunked else b"")
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(str(exc), request=request) from exc
        await self._drain(seconds, request)

    def _last_write(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write the request's last bytes; ``written`` once every byte of it left (now, or in ``resume_writing``)."""
        if data:
            transport.write(data)
        self.writing = True
        if transport.get_write_buffer_size() == 0 and not transport.is_closing() and not self.closed:
            self.written = True

    async def _drain(self, seconds: float | None, request: httpx.Request) -> None:
        """Wait (up to ``seconds``) while the transport's write buffer is above its high-water mark."""
        waiter = self.writable
        if waiter is None:
            return
        try:
            async with asyncio.timeout(seconds):
                await asyncio.shield(waiter)
        except TimeoutError:
            raise httpx.WriteTimeout("timed out writing to the upstream", request=request) from None
        if self.closed:
            raise httpx.WriteError(str(self.error or "the upstream closed the connection"), request=request)

    async def read_body(self, request: httpx.Request, seconds: float | None) -> bytes:
        """The body bytes received since the last call (waiting for some); ``b""`` at the end of the body."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.closed or self.invalid is not None:
                raise self._failure(request)
            try:
                await self._wait(seconds, request)
            except BaseException:
                self.abort()  # cancelled or timed out mid-body: the rest of the answer is never read
                raise
        chunks = self.chunks
        self.chunks = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _wait(self, seconds: float | None, request: httpx.Request) -> None:
        """Wait for the next parser or socket event, up to ``seconds``: a loop timer, not a task cancellation."""
        waiter = self.waiter = self.loop.create_future()
        timer = None if seconds is None else self.loop.call_later(seconds, expire, waiter)
        try:
            woken = await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if not woken:
            raise httpx.ReadTimeout("timed out reading from the upstream", request=request)

    def _wake(self, woken: bool) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(woken)

    def _failure(self, request: httpx.Request) -> httpx.TransportError:
        if self.invalid is not None:
            return httpx.RemoteProtocolError(f"invalid answer from the upstream: {self.invalid}", request=request)
        if self.error is not None:
            return httpx.ReadError(str(self.error) or type(self.error).__name__, request=request)
        if not self.received:
            return httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.RemoteProtocolError("the upstream closed the connection mid-answer", request=request)

    def answer_chunked(self) -> bool:
        """Whether the last answer came in chunks (its headers are kept until the next exchange)."""
        return any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower() for name, value in self.headers)

    def _delimited(self) -> bool:
        """Whether the answer's length is in its headers, a length or chunks (else its body ends with the
        connection)."""
        for name, value in self.headers:
            field = name.lower()
            if field == b"content-length" or (field == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False

    # ---------------------------------------------------------------------------------------- reuse

    def reusable(self) -> bool:
        """The answer was read to its end, allowed another request, and nothing came after it (the socket is polled
        when the connection is taken again, ``still_open``)."""
        transport = self.transport
        return self.complete and self.reuse and not self.closed and transport is not None and not transport.is_closing()

    def still_open(self) -> bool:
        """The upstream has not closed the connection nor written to it out of turn. The socket is polled: an end
        of stream (or bytes) that arrived while the loop was busy has not reached ``data_received`` yet."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing() and not self.poller.poll(0)

    def abort(self) -> None:
        """Close the connection: it will not be reused."""
        self.reuse = False
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; closing it pools the connection (answer read to its end) or closes it."""

    def __init__(self, connection: Connection, request: httpx.Request, seconds: float | None) -> None:
        self._connection: Connection | None = connection
        self._request = request
        self._timeout = seconds

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while chunk := await connection.read_body(self._request, self._timeout):
            yield chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool.release(connection)


def expire(waiter: asyncio.Future[bool]) -> None:
    """A wait's timer: the waiter learns it timed out (False) unless it was woken first."""
    if not waiter.done():
        waiter.set_result(False)
