"""What the client sent, read and checked before anything reaches the upstream.

The body is read within the size limit (413 above it, ``ClientGone`` when the client leaves first); every path is
normalised once before it is routed (``normalise_path``: one spelling per route, or a 400); passthrough paths must
stay inside the upstream's ``/v1`` tree; header names and values must be well formed (no CR, LF or other control
characters), so nothing the client sends can split or smuggle a request upstream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge

__all__ = [
    "ClientGone",
    "Receive",
    "check_headers",
    "check_passthrough_path",
    "normalise_path",
    "raw_path",
    "read_body",
    "read_limited",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_SAFE_PATH = re.compile(rb"/v1/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_FORBIDDEN_ESCAPES = (b"%2f", b"%5c", b"%2e", b"%00")
_DOT_SEGMENT = re.compile(rb"(^|/)\.\.?(/|$)")
_ESCAPE = re.compile(rb"%(.?.?)")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# escapes that would change the path's structure or smuggle a control byte once an engine decodes them
_UNSAFE_ESCAPED = frozenset({ord("/"), ord("\\"), 0x7F, *range(0x20)})
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


def normalise_path(raw: bytes) -> bytes:
    """The one spelling of ``raw`` (a request path without its query) that routes are classified on.

    RFC 3986 §6.2.2 normalisation, as engines built on Starlette route (they decode the path before matching):
    escapes of unreserved characters decoded (``%63hat`` -> ``chat``), other escapes kept with upper-case hex,
    empty segments dropped (duplicate and trailing slashes), ``.`` and ``..`` segments resolved. A path that cannot
    be normalised safely is refused (400 ``invalid_path``): an escaped ``/``, ``\\``, NUL or other control byte, an
    escaped dot segment (``%2e%2e``), a broken escape, ``..`` above the root, a path not starting with ``/``.
    Paths with no ``%``, ``//`` or ``/.`` and no trailing slash are already normal: returned as they are, without
    a copy (the proxy's hot path).
    """
    # ``37 not in`` and ``find``: ``b"%" in raw`` first tries the needle as an int and costs ~10x more
    if raw[:1] == b"/" and raw[-1:] != b"/" and 37 not in raw and raw.find(b"//") < 0 and raw.find(b"/.") < 0:
        return raw
    if raw == b"/":
        return raw
    if not raw.startswith(b"/"):
        _refuse_path("the request path must start with /")
    segments: list[bytes] = []
    for segment in raw.split(b"/")[1:]:
        decoded = _ESCAPE.sub(_unescape, segment) if b"%" in segment else segment
        if decoded in (b".", b".."):
            if decoded != segment:
                _refuse_path("the request path has an escaped dot segment")
            if decoded == b"..":
                if not segments:
                    _refuse_path("the request path climbs above the root")
                segments.pop()
        elif decoded:
            segments.append(decoded)
    return b"/" + b"/".join(segments)


def _unescape(match: re.Match[bytes]) -> bytes:
    digits = match.group(1)
    if len(digits) != 2 or not all(c in _HEX_DIGITS for c in digits):
        _refuse_path("the request path has a broken percent-escape")
    byte = int(digits, 16)
    if byte in _UNSAFE_ESCAPED:
        _refuse_path("the request path has an escaped separator or control character")
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + digits.upper()


def _refuse_path(message: str) -> NoReturn:
    raise InvalidRequest(message, code="invalid_path")


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
