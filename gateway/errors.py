"""The gateway's error tree and its OpenAI-shaped rendering.

Every error a client can see is one of these, rendered as
``{"error": {"message", "type", "param", "code"}}`` with the request's ``x-request-id``::

    GatewayError                      500  (never raised directly)
    ├── InvalidRequest                400  invalid_request_error
    ├── Unauthorized                  401  authentication_error
    ├── Forbidden                     403  permission_error
    ├── NotFound                      404  not_found_error
    ├── PayloadTooLarge               413  invalid_request_error
    ├── TooManyRequests               429  rate_limit_error
    ├── UpstreamError                 502  upstream_error
    │   └── UpstreamUnreachable       502  upstream_error (connection refused, reset, DNS)
    ├── Unavailable                   503  service_unavailable
    └── UpstreamTimeout               504  timeout_error

``upstream_error_from`` is the one place that turns ``httpx`` exceptions into ours; ``error_type`` is the one
map from an HTTP status to an OpenAI error ``type`` (for errors that are not ours: Litestar's, an upstream's).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import httpx
import msgspec

__all__ = [
    "read_upstream_error",
    "malformed_json_is_400",
    "split_error_path",
    "Forbidden",
    "GatewayError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "error_body",
    "error_type",
    "normalize_upstream_error",
    "upstream_error_from",
]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class GatewayError(Exception):
    """Base of every client-visible error."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # extra response headers, such as ``Retry-After``

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class TooManyRequests(GatewayError):
    status = 429
    type = "rate_limit_error"

    def __init__(
        self, message: str, *, retry_after: int = 1, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code, headers=(("retry-after", str(retry_after)),))


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    pass


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"


def error_body(message: str, type_: str, *, param: str | None = None, code: str | int | None = None) -> bytes:
    """Encode an OpenAI error envelope."""
    return _encoder.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


def upstream_error_from(exc: httpx.HTTPError) -> GatewayError:
    """Translate an httpx failure into the gateway error the client sees (no URLs, no internals)."""
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return UpstreamTimeout("timed out connecting to the upstream engine", code="upstream_connect_timeout")
        return UpstreamTimeout("the upstream engine did not answer in time", code="upstream_read_timeout")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnreachable("the upstream engine is unreachable", code="upstream_unreachable")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return UpstreamError("the upstream engine closed the connection", code="upstream_connection_lost")
    return UpstreamError("the upstream engine request failed", code="upstream_failed")


_STATUS_TYPES = {
    **{
        cls.status: cls.type
        for cls in (InvalidRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unavailable)
    },
    422: "invalid_request_error",
    501: "not_supported_error",
}


def error_type(status: int, default: str) -> str:
    """The OpenAI error ``type`` for an HTTP status (``default`` for statuses without one)."""
    return _STATUS_TYPES.get(status, default)


def read_upstream_error(status: int, body: bytes) -> tuple[Any, str, str | None, str | None]:
    """An upstream error body as decoded JSON (None when it is not), and the message, type and param it gives.

    Engines say it in different shapes: OpenAI and Anthropic nest ``{"error": {"message": ...}}``, SGLang answers a
    flat ``{"object": "error", "message": ...}``, FastAPI a ``{"detail": ...}``; other servers answer HTML or text,
    summarised by the status and the first 200 characters (never markup).
    """
    try:
        decoded: Any = _decoder.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict):
        inner = decoded.get("error")
        message = inner.get("message") if isinstance(inner, dict) else None
        message = message or decoded.get("message") or decoded.get("detail") or inner
        if isinstance(message, str) and message:
            type_, param = decoded.get("type"), decoded.get("param")
            return decoded, message, _str(type_), _str(param)
    text = body[:200].decode("utf-8", "replace").strip()
    summary = f"upstream engine answered HTTP {status}"
    return decoded, f"{summary}: {text}" if text and not text.startswith("<") else summary, None, None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def normalize_upstream_error(status: int, body: bytes) -> bytes | None:
    """Return an OpenAI envelope for a non-OpenAI-shaped upstream error body, or None to relay it as is."""
    decoded, message, type_, param = read_upstream_error(status, body)
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict) and "message" in decoded["error"]:
        return None
    return error_body(message, type_ or error_type(status, "upstream_error"), param=param, code=status)


_PATH = re.compile(r" - at `\$\.?(.*)`$")


@contextmanager
def malformed_json_is_400() -> Iterator[None]:
    """msgspec's two failures that are not ``DecodeError``s, as the 400 they are."""
    try:
        yield
    except RecursionError:
        # msgspec refuses nesting deeper than the interpreter's recursion limit; no OpenAI body nests that deep
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from None
    except UnicodeDecodeError:
        # invalid UTF-8 inside a JSON string surfaces as a UnicodeDecodeError, not a DecodeError
        raise InvalidRequest("request body is not valid UTF-8 JSON", code="invalid_json") from None


def split_error_path(text: str) -> tuple[str, str | None]:
    """Split a msgspec validation message into its text and the field path (``messages[0].content``)."""
    match = _PATH.search(text)
    return _PATH.sub("", text), match.group(1) if match else None
