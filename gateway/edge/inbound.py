"""What the client sent, read and checked before anything reaches the upstream.

The body is read within the size limit (413 above it, ``ClientGone`` when the client leaves first); passthrough
paths must stay inside the upstream's ``/v1`` tree; header names and values must be well formed (no CR, LF or other
control characters), so nothing the client sends can split or smuggle a request upstream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge

__all__ = [
    "ClientGone",
    "Receive",
    "check_headers",
    "check_passthrough_path",
    "raw_path",
    "read_body",
    "read_limited",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_SAFE_PATH = re.compile(rb"/v1/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_FORBIDDEN_ESCAPES = (b"%2f", b"%5c", b"%2e", b"%00")
_DOT_SEGMENT = re.compile(rb"(^|/)\.\.?(/|$)")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 above, as soon as the declared length says so)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    return await read_limited(_request_chunks(receive), limit, lambda: _body_too_large(limit))


async def read_limited(chunks: AsyncIterator[bytes], limit: int, too_large: Callable[[], GatewayError]) -> bytes:
    """Join ``chunks`` (a request or an upstream response body); raise ``too_large()`` past ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large()
        parts.append(chunk)
    return b"".join(parts)


async def _request_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes", code="body_too_large")


def raw_path(scope: Scope) -> bytes:
    """The path exactly as the client sent it (percent-encoding kept), without a query string."""
    raw: bytes | None = scope.get("raw_path")
    return raw.split(b"?", 1)[0] if raw else scope["path"].encode()


def check_passthrough_path(path: bytes) -> None:
    """Refuse paths that could leave the upstream's ``/v1`` tree (dot segments, encoded separators)."""
    lowered = path.lower()
    if (
        not _SAFE_PATH.fullmatch(path)
        or _DOT_SEGMENT.search(path)
        or any(escape in lowered for escape in _FORBIDDEN_ESCAPES)
        or b"//" in path
    ):
        raise NotFound("no such route", code="invalid_path")


def check_headers(raw: list[tuple[bytes, bytes]]) -> None:
    """Refuse header fields no server may forward: CR, LF, NUL or other controls in values, non-token names.

    HTTP/1.1 parsers refuse these already; an ASGI server speaking another protocol, or a test harness, may not.
    """
    for name, value in raw:
        if not _HEADER_NAME.fullmatch(name) or _HEADER_VALUE_FORBIDDEN.search(value):
            raise InvalidRequest("a request header has an invalid name or value", code="invalid_header")
