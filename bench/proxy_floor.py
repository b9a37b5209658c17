"""Floors for ``bench proxy``: what a proxy costs on this machine before it does anything of its own.

- ``relay floor``: an asyncio byte pump, one upstream connection per client connection, no HTTP parsing at all.
  No Python proxy that has to read a request can cost less: the two extra socket hops and the wake-ups of one
  more process are the whole of it.
- ``ASGI floor``: the gateway's own stack with nothing of the gateway in it: uvicorn with the gateway's edge
  protocol, a minimal ASGI app that reads the body and sends it on through the gateway's upstream client
  (``gateway.upstream.transport``), and relays the answer as it arrives. No header checks, no ids, no JSON, no plan, no
  metrics: what serving the design card's stack (an ASGI server in front of an HTTP client) costs per request.

- ``HTTP floor``: the same without ASGI or uvicorn: an asyncio protocol parsing requests with httptools (as
  uvicorn does) and answering from the gateway's upstream client directly. What a server of the gateway's own for
  ``/v1`` could get down to, before any gateway logic.

Each runs as its own process, as the gateway does, so its CPU per request is read from ``/proc`` the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httpx

if TYPE_CHECKING:
    from gateway.upstream.transport import UpstreamTransport

__all__ = ["serve_asgi", "serve_http", "serve_relay"]


class _Pump(asyncio.Protocol):
    """One side of a relayed connection: what arrives is written to the peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pump | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        transport.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY, as uvicorn and the gateway set it

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def serve_relay(port: int, upstream_port: int) -> None:
    """Listen on ``port``; pump every connection's bytes to and from a connection of its own to the upstream."""

    class Client(_Pump):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.connecting = asyncio.ensure_future(self._connect())

        async def _connect(self) -> None:
            _, upstream = await asyncio.get_running_loop().create_connection(_Pump, "127.0.0.1", upstream_port)
            upstream.peer, self.peer = self, upstream
            assert upstream.transport is not None
            for data in self.pending:
                upstream.transport.write(data)
            self.pending.clear()

    _listen(Client, port)


def serve_asgi(port: int, upstream: str) -> None:
    """Serve a bare ASGI proxy to ``upstream`` on ``port`` with the gateway's edge protocol and upstream client."""
    import uvicorn

    from gateway.edge.server import edge_protocol
    from gateway.settings import load_settings
    from gateway.upstream.transport import build_transport

    settings = load_settings()
    transport = build_transport(settings)
    keep = {b"content-type", b"content-length", b"transfer-encoding"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":  # readiness
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        response = await _post(transport, upstream + scope["path"], body)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() in keep]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await response.aclose()

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        http=edge_protocol(settings),
        timeout_keep_alive=settings.http_keepalive_timeout,
        lifespan="off",
    )


def serve_http(port: int, upstream: str) -> None:
    """Serve a bare HTTP/1.1 proxy to ``upstream`` on ``port``: httptools and the gateway's upstream client."""
    import httptools

    from gateway.settings import load_settings
    from gateway.upstream.transport import build_transport

    transport = build_transport(load_settings())
    keep = {b"content-type", b"content-length"}

    class Server(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None
            self.url = b""
            self.body: list[bytes] = []
            self.tasks: set[asyncio.Task[None]] = set()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body, self.body = b"".join(self.body), []
            task = asyncio.ensure_future(self.answer(self.parser.get_method(), self.url, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        async def answer(self, method: bytes, url: bytes, body: bytes) -> None:
            assert self.transport is not None
            if method == b"GET":  # readiness
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                return
            response = await _post(transport, upstream + url.decode("latin-1"), body)
            head = [b"HTTP/1.1 %d OK\r\n" % response.status_code]
            head += [b"%s: %s\r\n" % (k, v) for k, v in response.headers.raw if k.lower() in keep]
            chunked = "content-length" not in response.headers
            if chunked:
                head.append(b"transfer-encoding: chunked\r\n")
            self.transport.write(b"".join(head) + b"\r\n")
            async for chunk in response.aiter_raw():
                self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                self.transport.write(b"0\r\n\r\n")
            await response.aclose()

    _listen(Server, port)


async def _post(transport: UpstreamTransport, url: str, body: bytes) -> httpx.Response:
    """Send ``body`` as a JSON POST to ``url`` through the gateway's upstream client; the answer streams."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return await transport.handle_async_request(httpx.Request("POST", url, headers=headers, content=body))


def _listen(protocol: Callable[[], asyncio.Protocol], port: int) -> None:
    """Serve ``protocol`` on ``port`` until killed, on uvloop when installed (the loop uvicorn, and so the
    gateway, picks)."""

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
