"""Wire views of the three APIs: what the proxy decodes of a body, and how each route's errors look.

Owns ``chat`` (OpenAI chat and completions), ``responses`` (OpenAI Responses), ``anthropic`` (Messages), ``walk``
(finding texts and whole blocks in a body), ``citations`` (Anthropic citation indices put back in the client's
order) and ``sse`` (the one framer of an upstream's event stream, bounded). May import the base modules
(``gateway.errors``) only.

The request shapes beyond OpenAI chat and completions: Anthropic Messages and OpenAI Responses.

Each ``Shape`` says how the proxy handles one route: the view it validates the body with, the walk that finds
texts and whole blocks for the planner (``gateway.wire.walk``), and how errors look on that route (a whole error
body, an upstream error normalised, the SSE event that ends a broken stream). ``SHAPES`` maps a route to its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from gateway.errors import GatewayError, normalize_upstream_error
from gateway.wire import anthropic, responses
from gateway.wire.walk import AnswerRewriter, AnswerStream, Planned, ScopedWalker, Walker

__all__ = [
    "SHAPES",
    "AnswerRewriter",
    "AnswerStream",
    "Planned",
    "ScopedWalker",
    "Shape",
    "Walker",
    "error_body",
    "normalize_error",
    "stream_error",
]


@dataclass(frozen=True, slots=True)
class Shape:
    route: str
    view: type[msgspec.Struct]
    plan: Callable[[dict[str, msgspec.Raw], bytes, Walker], Planned]
    error_body: Callable[[GatewayError], bytes]
    stream_error: Callable[[GatewayError], bytes]
    normalize_upstream_error: Callable[[int, bytes], bytes | None]


def _openai_error(exc: GatewayError) -> bytes:
    return exc.body()


SHAPES: dict[str, Shape] = {
    "/v1/messages": Shape(
        "/v1/messages",
        anthropic.MessagesView,
        anthropic.plan,
        anthropic.error_body,
        anthropic.stream_error,
        anthropic.normalize_upstream_error,
    ),
    "/v1/responses": Shape(
        "/v1/responses",
        responses.ResponsesView,
        responses.plan,
        _openai_error,
        responses.stream_error,
        normalize_upstream_error,
    ),
}


def error_body(route: str, exc: GatewayError) -> bytes:
    """The error body as the route's API shapes it (OpenAI's everywhere but ``/v1/messages``)."""
    shape = SHAPES.get(route)
    return shape.error_body(exc) if shape is not None else exc.body()


def stream_error(route: str, exc: GatewayError) -> bytes:
    """The SSE event that ends a stream the upstream broke off, as the route's API shapes it."""
    shape = SHAPES.get(route)
    return shape.stream_error(exc) if shape is not None else b"data: " + exc.body() + b"\n\n"


def normalize_error(route: str, status: int, body: bytes) -> bytes | None:
    """An upstream error body in the route's error shape (None: relay it as it is)."""
    shape = SHAPES.get(route)
    return (shape.normalize_upstream_error if shape is not None else normalize_upstream_error)(status, body)
