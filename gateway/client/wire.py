"""The index API's wire, client side: the errors :mod:`gateway.client.api` raises, the payloads it sends and how it
reads answers (one place for each)::

    IndexClientError              anything the clients raise
    ├── IndexAPIError             the server answered 4xx/5xx (or an unreadable body): status, type, param, code
    └── IndexUnavailable          no answer: connection refused or reset, DNS, timeout

``transport_error`` is the one place that turns ``httpx`` exceptions into ours; ``decode_response`` is the one
place that reads a response (success body or OpenAI-style ``{"error": {...}}`` envelope).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, TypedDict

import httpx

__all__ = [
    "IndexAPIError",
    "IndexClientError",
    "IndexUnavailable",
    "ReorderOptions",
    "decode_response",
    "dedup_payload",
    "is_ready_health",
    "reorder_pair",
    "reorder_payload",
    "transport_error",
]


class IndexClientError(Exception):
    """Base of every error the index clients raise."""


class IndexAPIError(IndexClientError):
    """The index server answered with an error status (or a body that is not a JSON object).

    Fields come from the OpenAI-style envelope ``{"error": {"message", "type", "param", "code"}}``; a FastAPI
    ``{"detail": ...}`` body (ContextPilot's own server) or plain text becomes the message.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id


class IndexUnavailable(IndexClientError):
    """The index server could not be reached or did not answer in time."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def transport_error(exc: httpx.HTTPError, method: str, url: str) -> IndexClientError:
    if isinstance(exc, httpx.TimeoutException):
        return IndexUnavailable(f"{method} {url} timed out ({type(exc).__name__})", timed_out=True)
    if isinstance(exc, httpx.TransportError):
        return IndexUnavailable(f"{method} {url} failed: {type(exc).__name__}: {exc}")
    return IndexClientError(f"{method} {url} failed: {type(exc).__name__}: {exc}")


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _api_error(response: httpx.Response, body: Any) -> IndexAPIError:
    request_id = response.headers.get("x-request-id")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return IndexAPIError(
            str(error.get("message") or response.reason_phrase),
            status=response.status_code,
            type=_optional_str(error.get("type")),
            param=_optional_str(error.get("param")),
            code=_optional_str(error.get("code")),
            request_id=request_id,
        )
    if isinstance(body, dict) and "detail" in body:
        message = str(body["detail"])
    elif isinstance(body, dict) and "message" in body:
        message = str(body["message"])
    else:
        message = response.text[:500] or response.reason_phrase
    return IndexAPIError(message, status=response.status_code, request_id=request_id)


def decode_response(response: httpx.Response) -> dict[str, Any]:
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        raise _api_error(response, body)
    if not isinstance(body, dict):
        raise IndexAPIError(
            f"expected a JSON object, got {response.headers.get('content-type', 'no content type')}",
            status=response.status_code,
            type="invalid_response",
            request_id=response.headers.get("x-request-id"),
        )
    return body


class ReorderOptions(TypedDict, total=False):
    """``/reorder``'s options (ContextPilot's names); the last three only matter on a live (stateful) server."""

    alpha: float
    use_gpu: bool
    linkage_method: str
    initial_tokens_per_context: int
    deduplicate: bool
    parent_request_ids: Sequence[str | None] | None
    hint_template: str | None
    conversation_ids: Sequence[str | None] | None  # prefixgate extension: one conversation's turns keep their order


# sent explicitly, as ContextPilot's client does, so both clients put the same bytes on the wire
_REORDER_DEFAULTS: Final[dict[str, Any]] = {
    "alpha": 0.001,
    "use_gpu": False,
    "linkage_method": "average",
    "initial_tokens_per_context": 0,
    "deduplicate": False,
}
_REORDER_OPTIONS: Final = frozenset(ReorderOptions.__annotations__)


def reorder_payload(contexts: Sequence[Sequence[Any]], options: ReorderOptions) -> dict[str, Any]:
    unknown = sorted(options.keys() - _REORDER_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected reorder option(s): {', '.join(unknown)}")
    payload: dict[str, Any] = {"contexts": [list(context) for context in contexts], **_REORDER_DEFAULTS}
    # like ContextPilot's client, a None option is left out rather than sent as null
    payload.update((name, value) for name, value in options.items() if value is not None)
    for name in ("parent_request_ids", "conversation_ids"):
        values = options.get(name)
        if values is not None:
            payload[name] = list(values)  # type: ignore[call-overload]
    return payload


def dedup_payload(
    contexts: Sequence[Sequence[Any]], parent_request_ids: Sequence[str | None], hint_template: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "contexts": [list(context) for context in contexts],
        "parent_request_ids": list(parent_request_ids),
    }
    if hint_template is not None:
        payload["hint_template"] = hint_template
    return payload


def reorder_pair(result: dict[str, Any]) -> tuple[list[list[Any]], list[int]]:
    try:
        return result["reordered_contexts"], result["original_indices"]
    except KeyError as exc:
        raise IndexAPIError(f"/reorder answer lacks {exc.args[0]!r}", status=200, type="invalid_response") from None


def is_ready_health(health: dict[str, Any]) -> bool:
    return health.get("status") == "ready"
