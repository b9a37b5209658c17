"""The request shapes beyond OpenAI chat and completions: Anthropic Messages and OpenAI Responses.

Each ``Shape`` says how the proxy handles one route: the view it validates the body with, the walk that finds
texts and whole blocks for the planner (``gateway.apis.walk``), and how errors look on that route (a whole error
body, an upstream error normalised, the SSE event that ends a broken stream). ``SHAPES`` maps a route to its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from gateway.apis import anthropic, responses
from gateway.apis.walk import AnswerRewriter, AnswerStream, Planned, Walker
from gateway.errors import GatewayError, normalize_upstream_error

__all__ = ["SHAPES", "AnswerRewriter", "AnswerStream", "Planned", "Shape", "Walker"]


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
