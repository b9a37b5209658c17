"""The upstream connection pool: an HTTP/1.1 client on asyncio protocols and httptools' response parser.

httpx's own transport runs httpcore's connection pool, h11 and anyio (a cancel scope per read and write, sniffio
lookups per request): ~37% of the gateway's CPU per proxied request (cProfile inside ``prefixgate serve`` under
``python -m bench proxy``). ``UpstreamTransport`` is an ``httpx.AsyncBaseTransport`` that speaks HTTP/1.1 itself:
the request head is serialised in one join, the response parsed by ``httptools.HttpResponseParser`` (llhttp, in C,
as the server edge already does) from the protocol's ``data_received``, and waits are plain futures with a loop
timer instead of a task cancellation. httpx's request and response objects, and its exceptions, are kept, so
``gateway.upstream.sender``, ``gateway.proxy.relay`` and ``gateway.proxy.pipeline`` are unchanged. Measured (``bench
proxy --quick``, three alternating runs each on a noisy 2-core machine), the gateway's CPU per request went from
1.8-2.4 to 1.1-1.5 ms (json, concurrency 1), 1.9-2.7 to 0.75-0.85 ms (json, 16) and 2.3-3.3 to 1.0-1.5 ms (stream, 1).

Semantics kept:
- connect, read and write timeouts (``request.extensions["timeout"]``) raise ``httpx.ConnectTimeout``/
  ``ReadTimeout``/``WriteTimeout``, a full pool ``PoolTimeout``; socket failures ``ConnectError``/``ReadError``/
  ``WriteError``; a connection closed before any byte of the answer, closed mid-body, or an unparsable answer
  ``RemoteProtocolError``; any of these on a pooled connection before the whole request left, with no byte of
  answer, ``Undelivered`` (``connection.may_resend``: the only failure ``gateway.proxy.pipeline`` sends again);
- a kept-alive connection is reused only if the answer allowed it (HTTP/1.1 without ``Connection: close``), it
  was read to its end, and the upstream neither closed it nor wrote to it out of turn (the socket is polled too);
  an upstream seen closing a connection within ``EARLY_CLOSE`` of a chunked answer gets no pooled connection after
  a chunked answer any more (llama-server closes one after every streamed answer, announcing keep-alive; with
  ``--engine llamacpp`` that holds from the start);
- a cancelled request or body read (a client that went away) closes its connection, never pools it;
- response bodies stream as they arrive (SSE token by token), with backpressure; TLS upstreams are checked.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httpx

from gateway.settings import Settings
from gateway.upstream.connection import Connection, Undelivered, expire, may_resend

__all__ = ["Undelivered", "UpstreamTransport", "build_transport"]

# below the 5 s idle timeout of uvicorn (vLLM, SGLang, the simulated engine): an idle connection is dropped here
# before the engine closes it, so no request is ever written into a closing connection
KEEPALIVE_EXPIRY = 4.0
# an idle connection the upstream closed sooner than this after its answer was closed because of that answer, not
# for idling (keep-alive timeouts are seconds)
EARLY_CLOSE = 1.0
Origin = tuple[str, str, int]


def build_transport(
    settings: Settings, ssl_context: ssl.SSLContext | None = None, *, keep_after_chunked: bool = True
) -> UpstreamTransport:
    """The upstream connection pool. The proxy sends through it directly (``gateway.upstream.sender.UpstreamSender``);
    the client wrapping it owns its lifetime. ``ssl_context`` replaces the default certificate checks (tests);
    ``keep_after_chunked=False`` pools no connection after a chunked answer from the start (llama-server)."""
    return UpstreamTransport(
        settings.max_connections, settings.max_keepalive, ssl_context, keep_after_chunked=keep_after_chunked
    )


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Kept-alive HTTP/1.1 connections per origin, at most ``max_connections`` open and ``max_keepalive`` idle."""

    def __init__(
        self,
        max_connections: int,
        max_keepalive: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        keep_after_chunked: bool = True,
    ) -> None:
        self._keep_after_chunked = keep_after_chunked  # False: an engine known to close after chunked answers
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._ssl_context = ssl_context
        self._open: set[Connection] = set()  # idle, busy and connecting
        self._idle: dict[Origin, list[Connection]] = {}  # oldest first
        self._idle_count = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()  # requests waiting for a free slot
        self._close_after_chunked: set[Origin] = set()  # upstreams seen closing a connection after a chunked answer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
        origin = (url.scheme, url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80))
        connection = self._idle_connection(origin) or await self._acquire(origin, request, timeouts)
        try:
            return await connection.exchange(request, timeouts)
        except BaseException as exc:
            connection.abort()
            self.release(connection)
            failed = isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException)
            c = connection
            if failed and may_resend(reused=c.reused, written=c.written, received=c.received):
                raise Undelivered(str(exc), request=request) from exc
            raise

    async def aclose(self) -> None:
        for connection in self._open:
            connection.abort()
        self._open.clear()
        self._idle.clear()
        self._idle_count = 0

    def release(self, connection: Connection) -> None:
        """Pool ``connection`` if its last exchange allows another one, else close it; wake a waiting request."""
        if (
            connection.reusable()
            and self._idle_count < self._max_keepalive
            and connection in self._open
            and not (self._closes_after_chunked(connection.origin) and connection.answer_chunked())
        ):
            connection.idle = True
            connection.idle_since = connection.loop.time()
            self._idle.setdefault(connection.origin, []).append(connection)
            self._idle_count += 1
        else:
            connection.abort()
            self._open.discard(connection)
        self._wake()

    def forget(self, connection: Connection) -> None:
        """An idle connection the upstream closed."""
        self._learn_early_close(connection)
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1
        connection.idle = False
        self._open.discard(connection)
        self._wake()

    def _idle_connection(self, origin: Origin) -> Connection | None:
        """The most recently pooled connection still fit for reuse; expired and unfit ones are closed."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            connection.idle = False
            if connection.loop.time() - connection.idle_since < KEEPALIVE_EXPIRY and connection.still_open():
                connection.reused = True
                return connection
            self._learn_early_close(connection)
            connection.abort()
            self._open.discard(connection)
        return None

    def _closes_after_chunked(self, origin: Origin) -> bool:
        return not self._keep_after_chunked or origin in self._close_after_chunked

    def _learn_early_close(self, connection: Connection) -> None:
        """An upstream that closed a kept-alive connection right after a chunked answer (llama-server closes one
        after every streamed answer, without ``Connection: close``) gets no more pooled connections after chunked
        answers: a request written into one before its close arrived could not be sent again (``may_resend``)."""
        quick = connection.loop.time() - connection.idle_since < EARLY_CLOSE
        if quick and not connection.still_open() and connection.answer_chunked():
            self._close_after_chunked.add(connection.origin)

    def _evict_idle(self) -> bool:
        """Close the oldest idle connection (of another origin: this one has none) to make room; False if none."""
        for idle in self._idle.values():
            if idle:
                connection = idle.pop(0)
                self._idle_count -= 1
                connection.idle = False
                connection.abort()
                self._open.discard(connection)
                return True
        return False

    async def _acquire(self, origin: Origin, request: httpx.Request, timeouts: dict[str, float | None]) -> Connection:
        loop = asyncio.get_running_loop()
        pool_timeout = timeouts.get("pool")
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        while True:
            if len(self._open) < self._max_connections or self._evict_idle():
                return await self._connect(origin, request, timeouts.get("connect"))
            await self._wait_for_slot(loop, deadline, request)
            connection = self._idle_connection(origin)
            if connection is not None:
                return connection

    async def _wait_for_slot(
        self, loop: asyncio.AbstractEventLoop, deadline: float | None, request: httpx.Request
    ) -> None:
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, expire, waiter)
        try:
            woken = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._wake()  # the wake this request was given goes to the next one
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if not woken:
            raise httpx.PoolTimeout("timed out waiting for a free upstream connection", request=request)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return

    async def _connect(self, origin: Origin, request: httpx.Request, seconds: float | None) -> Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = Connection(self, origin, loop)
        self._open.add(connection)
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context(trust_env=False)
            context = self._ssl_context
        try:
            async with asyncio.timeout(seconds):
                await loop.create_connection(
                    lambda: connection, host, port, ssl=context, server_hostname=host if context else None
                )
        except BaseException as exc:
            self._open.discard(connection)
            self._wake()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout("timed out connecting to the upstream", request=request) from None
            if isinstance(exc, OSError):  # ssl.SSLError (a certificate not trusted) is one
                raise httpx.ConnectError(str(exc), request=request) from exc
            raise
        return connection
