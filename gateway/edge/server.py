"""The HTTP/1.1 edge: uvicorn's httptools protocol with the limits a public listener needs.

uvicorn's stock protocol reads headers and bodies without a size or time limit and appends the fields of a
chunked body's *trailer* to ``scope["headers"]`` after the application has started, so a trailer
``Authorization`` or ``X-Request-Id`` could be taken for a request header. :func:`edge_protocol` returns a
subclass, configured from :class:`~gateway.settings.Settings`, that:

- counts the bytes of the request line and headers as they arrive (before httptools buffers a field) and the
  number of header fields, and answers ``431`` past ``http_max_header_bytes`` / ``http_max_headers``;
- answers ``408`` and closes when the request line and headers take longer than ``http_header_timeout``
  (also on a connection that sends nothing at all), and closes a connection whose body is not complete
  ``http_body_timeout`` after its headers (the application then sees a disconnect);
- never adds a field after the headers are complete: trailer fields are dropped;
- closes a keep-alive connection after ``http_max_requests_per_connection`` requests (``Connection: close`` on
  the last answer); idle keep-alive connections close after ``http_keepalive_timeout`` (uvicorn's own timer).

It also sends the head of an answer whose length is known together with its body, in one write (uvicorn writes
them apart: one more system call per request, ~4% of the gateway's CPU on the proxy path). Streamed answers
(chunked, server-sent events) keep their head going out at once.

The refusals are written by the protocol itself (the application never sees the request) as OpenAI-shaped
JSON errors with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.errors import error_body
from gateway.settings import Settings

__all__ = ["edge_protocol"]

_HEAD_END = b"\r\n\r\n"
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _EdgeProtocol(HttpToolsProtocol):
    """The limits are class attributes, set by :func:`edge_protocol` on a subclass."""

    max_header_bytes = 65_536
    max_headers = 100
    header_timeout = 10.0
    body_timeout = 60.0
    max_requests = 1_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (or waiting for them)
        self._head_bytes = 0
        self._head_tail = b""
        self._fields = 0
        self._served = 0
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    # timers ---------------------------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(408, "the request headers were not received in time", "header_timeout")
        else:
            self.transport.close()  # a body that does not arrive in time: the application sees a disconnect

    # connection and parser callbacks ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._timer is None:
                self._arm(self.header_timeout)  # the first byte of a request on a kept-alive connection
            end = (self._head_tail + data).find(_HEAD_END)
            self._head_bytes += len(data) if end < 0 else max(end - len(self._head_tail), 0)
            self._head_tail = data[-3:]
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, "the request headers are too large", "headers_too_large")
                return
        super().data_received(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked trailer field: never merged into the request headers
        self._fields += 1
        if self._fields > self.max_headers:
            self._refuse(431, "the request has too many header fields", "too_many_headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_tail = b""
        self._fields = 0
        self._served += 1
        self._arm(self.body_timeout)
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = cast(asyncio.Transport, _HeldHead(self.transport, self.cycle))
            if self._served >= self.max_requests:
                self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` without involving the application, and close the connection."""
        self._refused = True
        self._disarm()
        body = error_body(message, "invalid_request_error", code=code)
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))
        )
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(head + body)
        self.transport.close()


class _HeldHead:
    """The connection as one request's response cycle sees it: the head of an answer with a known, non-empty
    length is held and written with the first body bytes (the cycle writes the head first; by then its
    ``chunked_encoding`` is ``False`` for such an answer, and a HEAD request or an empty body never holds)."""

    __slots__ = ("_cycle", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held = b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        else:
            cycle = self._cycle
            if (
                cycle.response_started
                and not cycle.response_complete
                and cycle.chunked_encoding is False
                and cycle.expected_content_length > 0
                and cycle.scope["method"] != "HEAD"
                and data.startswith(b"HTTP/")
            ):
                self._held = (
                    data  # the body follows at once (``gateway.proxy.relay`` sends whole answers in one message)
                )
                return
        self._transport.write(data)

    def close(self) -> None:
        self._held = b""
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Refused(Exception):
    """Stops the parser after a refusal (httptools re-raises it as a parser error, which is then ignored)."""


def edge_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with the limits of ``settings``."""
    return type(
        "EdgeProtocol",
        (_EdgeProtocol,),
        {
            "max_header_bytes": settings.http_max_header_bytes,
            "max_headers": settings.http_max_headers,
            "header_timeout": settings.http_header_timeout,
            "body_timeout": settings.http_body_timeout,
            "max_requests": settings.http_max_requests_per_connection,
        },
    )
