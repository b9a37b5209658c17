"""Answering the client: the upstream's response relayed back (whole, or chunk by chunk as it arrives), and the
gateway's own errors.

:class:`Relay` turns one upstream response into the client's answer and reports what it saw (:class:`Relayed`):
an upstream 4xx/5xx with its status (its body normalised where the route's shape needs it), a whole JSON answer
(its usage read, its citations mapped back), or an event stream relayed as it arrives; a failure after the first
streamed byte becomes one SSE ``error`` event. It sends everything but the last body message, which
``gateway.proxy.pipeline.Exchange.settle`` sends once the plan has had the engine's feedback. The relay runs
nothing of the plan's lifecycle; ``gateway.proxy.pipeline`` decides where a request goes and settles it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from engines.base import cached_tokens_from_usage, prompt_tokens_from_usage
from gateway.edge.inbound import read_limited
from gateway.errors import GatewayError, UpstreamError, upstream_error_from
from gateway.metrics import Metrics
from gateway.proxy.usage import UsageSniffer, decode_answer
from gateway.upstream.sender import response_headers, rewrite_location
from gateway.wire import error_body, normalize_error, stream_error
from gateway.wire.walk import AnswerRewriter

__all__ = ["Answering", "Relay", "Relayed", "Send", "send_error"]

logger = logging.getLogger("prefixgate.proxy")

Send = Callable[[dict[str, Any]], Awaitable[None]]

_MAX_ERROR_BODY = 1 << 20
_MAX_JSON_BODY = 64 << 20
_SSE = b"text/event-stream"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class Answering(Protocol):
    """What the relay reads of the request it answers (``gateway.proxy.pipeline.Exchange``)."""

    @property
    def to_client(self) -> Send: ...

    @property
    def route(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def own_headers(self) -> list[tuple[bytes, bytes]]: ...

    @property
    def answer(self) -> AnswerRewriter | None:
        """What rewrites the answer (citation mapping), if anything does."""

    @property
    def upstream_base(self) -> str:
        """The URL of the upstream the request went to (its redirects are rewritten)."""


@dataclass(slots=True)
class Relayed:
    """What the relay saw of an answer it relayed: its status, the cached and prompt tokens the engine reported,
    the reason the upstream failed after the first byte (if it did), and ``tail``, the last body message, still to
    send."""

    status: int
    tail: bytes = b""
    cached_tokens: int | None = None
    failure: str | None = None
    prompt_tokens: int | None = None


class Relay:
    """Turns upstream responses into the client's answer, counting them in the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def answer(self, response: httpx.Response, to: Answering) -> Relayed:
        """Relay ``response`` but its last body message; report what was seen. ``httpx.HTTPError`` and
        ``GatewayError`` raised before the first byte went to the client are for the caller to answer."""
        status = response.status_code
        if status >= 400:
            return await self._error(response, to)
        if 300 <= status < 400:
            return await self._redirect(response, to)
        sse = (_field(response.headers.raw, b"content-type") or b"").startswith(_SSE)
        if to.route != "passthrough" and not sse:
            return await self._json(response, to)
        return await self._stream(response, to, sse)

    async def _error(self, response: httpx.Response, to: Answering) -> Relayed:
        self.metrics.upstream_errors.labels(f"http_{response.status_code}").inc()
        body = await read_limited(response.aiter_raw(), _MAX_ERROR_BODY, _upstream_too_large)
        normalized = None
        if _field(response.headers.raw, b"content-encoding") is None:
            normalized = normalize_error(to.route, response.status_code, body)
        if normalized is None:
            headers = response_headers(response.headers, keep_length=False)
        else:
            body, headers = normalized, list(_JSON_HEADERS)
        return await _start_whole(to, response.status_code, headers, body)

    async def _redirect(self, response: httpx.Response, to: Answering) -> Relayed:
        """An upstream redirect, relayed whole with its ``Location`` pointing at the gateway, not the upstream."""
        body = await read_limited(response.aiter_raw(), _MAX_ERROR_BODY, _upstream_too_large)
        headers = rewrite_location(response_headers(response.headers, keep_length=False), to.upstream_base)
        return await _start_whole(to, response.status_code, headers, body)

    async def _json(self, response: httpx.Response, to: Answering) -> Relayed:
        """Relay a whole answer, reading the cached tokens it reports.

        Non-streaming answers are small and arrive at once: reading them whole lets a mid-body failure still become
        a clean 502, and lets the gateway read the engine's cached-token count.
        """
        body = await read_limited(response.aiter_raw(), _MAX_JSON_BODY, _upstream_too_large)
        self.metrics.first_byte(to.route, time.perf_counter() - to.started)
        cached = prompt = None
        if _field(response.headers.raw, b"content-encoding") is None:
            # a success that is not a JSON object is an engine fault the client should see as one, not as a 200
            payload = decode_answer(body)
            if not isinstance(payload, dict):
                raise UpstreamError(
                    "the upstream engine answered with an invalid body", code="upstream_invalid_response"
                )
            cached, prompt = self._count_usage(payload, to.route)
            answer = to.answer
            if answer is not None:
                body = answer.json(body)
        headers = response_headers(response.headers, keep_length=False)
        return await _start_whole(to, response.status_code, headers, body, cached, prompt_tokens=prompt)

    async def _stream(self, response: httpx.Response, to: Answering, sse: bool) -> Relayed:
        """Relay the answer chunk by chunk as it arrives, reading the cached tokens an event stream reports.

        An event stream that fails after the first byte ends with one SSE ``error`` event; any other body is
        left truncated (the missing bytes against its length tell the client).
        """
        send, route = to.to_client, to.route
        headers = response_headers(response.headers, keep_length=not sse) + to.own_headers
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        plain = _field(response.headers.raw, b"content-encoding") is None
        sniffer = sniffed = UsageSniffer() if sse and plain else None
        answer = to.answer
        rewriter = answer.stream() if answer is not None and sniffer is not None else None
        failure = None
        tail = b"\n\n"
        first = True
        try:
            async for received in response.aiter_raw():
                if first:
                    self.metrics.first_byte(route, time.perf_counter() - to.started)
                    first = False
                if sniffer is not None:
                    sniffer.feed(received)
                chunk = rewriter.feed(received) if rewriter is not None else received
                if not chunk:
                    continue  # held until the event (or the citation it may end in) is complete
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                tail = (tail + chunk)[-4:]
        except httpx.HTTPError as exc:
            error = upstream_error_from(exc)
            failure = error.code or "failed"
            self.metrics.upstream_errors.labels(failure).inc()
            sniffer = None
            if not sse:
                logger.warning("upstream failed mid-body; the client receives a truncated response")
            else:
                logger.warning("upstream stream failed after the first byte: %s", error.code)
                rest = rewriter.flush() if rewriter is not None else b""
                tail = (tail + rest)[-4:]
                separator = b"" if tail.endswith((b"\n\n", b"\r\n\r\n")) else b"\n\n"
                event = rest + separator + stream_error(route, error)
                await send({"type": "http.response.body", "body": event, "more_body": True})
            rewriter = None
        if rewriter is not None and (rest := rewriter.flush()):
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        if sniffed is not None and sniffed.oversized:
            self.metrics.sse_oversized_events.labels(route).inc(sniffed.oversized)
        usage = sniffer.usage if sniffer is not None else None
        cached, prompt = self._count_usage(usage, route) if usage is not None else (None, None)
        return Relayed(response.status_code, cached_tokens=cached, failure=failure, prompt_tokens=prompt)

    def _count_usage(self, payload: dict[str, Any], route: str) -> tuple[int | None, int | None]:
        """Count the engine-reported prompt and cached tokens of an answer; return (cached, prompt)."""
        cached = cached_tokens_from_usage(payload)
        prompt = prompt_tokens_from_usage(payload)
        if cached is not None and prompt is not None:
            self.metrics.engine_cached_tokens.labels(route).inc(cached)
            self.metrics.engine_prompt_tokens.labels(route).inc(prompt)
        return cached, prompt


def _field(raw: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in httpx's raw header list, lower-cased; None if absent.

    Cheaper than ``httpx.Headers.get``, which builds a lower-cased copy of every field on each call."""
    for key, value in raw:
        if key.lower() == name:
            return value.lower()
    return None


def _upstream_too_large() -> GatewayError:
    return UpstreamError("upstream response too large to relay", code="upstream_body_too_large")


async def _start_whole(
    to: Answering,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    cached_tokens: int | None = None,
    *,
    prompt_tokens: int | None = None,
) -> Relayed:
    """Start a whole answer; its body is the last message (``Relayed.tail``)."""
    headers = [*headers, *to.own_headers, (b"content-length", str(len(body)).encode())]
    await to.to_client({"type": "http.response.start", "status": status, "headers": headers})
    return Relayed(status, body, cached_tokens, prompt_tokens=prompt_tokens)


async def send_error(send: Send, exc: GatewayError, request_id: str, route: str) -> None:
    """One error answer in the route's shape (OpenAI, or Anthropic on ``/v1/messages``), with the request id."""
    body = error_body(route, exc)
    headers = [
        *_JSON_HEADERS,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *((name.encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
