"""Answering the client: the upstream's response relayed back (whole, or chunk by chunk as it arrives), and the
gateway's own errors.

:class:`Call` is what answering one request needs to know; it calls the plan's ``usage`` (the cached tokens the
engine reported) and ``finish`` (the engine is done) *before* the last body message goes out, so that a client
that sends its next request the moment this one ends finds the gateway's view of the upstream up to date.
:class:`Relay` turns one upstream response into the client's answer: an upstream 4xx/5xx with its status (its
body normalised where the route's shape needs it), a whole JSON answer (its usage read, its citations mapped
back), or an event stream relayed as it arrives; a failure after the first streamed byte becomes one SSE
``error`` event. ``gateway.proxy.pipeline`` decides where a request goes; this module only answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from engines.base import cached_tokens_from_usage, prompt_tokens_from_usage
from gateway.edge.inbound import read_limited
from gateway.errors import GatewayError, UpstreamError, upstream_error_from
from gateway.ids import NO_BODY_IDS, BodyIds
from gateway.metrics import Metrics
from gateway.planning.plan import PlannedRequest, Upstream
from gateway.proxy.usage import UsageSniffer, decode_answer
from gateway.upstream.sender import response_headers, rewrite_location
from gateway.wire import error_body, normalize_error, stream_error
from gateway.wire.chat import RequestBody

__all__ = ["Call", "Relay", "Send", "send_error"]

logger = logging.getLogger("prefixgate.proxy")

Send = Callable[[dict[str, Any]], Awaitable[None]]

_MAX_ERROR_BODY = 1 << 20
_MAX_JSON_BODY = 64 << 20
_SSE = b"text/event-stream"
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(slots=True)
class Call:
    """What the relay needs to know about the request it is answering."""

    send: Send
    request_id: str
    route: str
    started: float
    own_headers: list[tuple[bytes, bytes]]
    namespace: str | None = None
    tenant: str | None = None  # the key's namespace when planning state is per key (see docs/reliability.md)
    header_id: bool = False  # the client chose its id in X-Request-Id (it wins over body ids)
    stream_slot: bool = False
    planned: PlannedRequest | None = None
    cached_tokens: int | None = None  # engine-reported, for the access log
    upstream: Upstream | None = None  # None: the proxy's own upstream
    body: RequestBody | None = None  # kept to plan the request again for another replica
    headers: dict[str, str] | None = None
    ids: BodyIds = NO_BODY_IDS  # the id fields the client sent in the body
    payload: bytes = b""
    upstream_base: str = ""  # the URL of the upstream the request went to (its redirects are rewritten)

    def finish(self) -> None:
        """The upstream is done with this request (e.g. its llama.cpp slot is free); idempotent."""
        if self.planned is not None:
            self.planned.finish()

    async def end(self, body: bytes = b"", cached_tokens: int | None = None) -> None:
        """Send the last body message, after the engine's feedback (``cached_tokens``) and ``finish``."""
        self.cached_tokens = cached_tokens
        if self.planned is not None:
            self.planned.usage(cached_tokens)
        self.finish()
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class Relay:
    """Turns upstream responses (and failures) into the client's answer, counting them in the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def answer(self, response: httpx.Response, call: Call) -> int:
        """Relay ``response``; return its status. ``httpx.HTTPError`` and ``GatewayError`` raised before the first
        byte went to the client are for the caller to turn into an error answer (:meth:`fail`)."""
        status = response.status_code
        if call.planned is not None:
            call.planned.responded(status)
        if status >= 400:
            await self._error(response, call)
            return status
        if 300 <= status < 400:
            await self._redirect(response, call)
            return status
        if call.planned is not None:
            call.planned.accept()  # the engine accepted the request: what it was sent is now in its cache
        sse = (_field(response.headers.raw, b"content-type") or b"").startswith(_SSE)
        if call.route != "passthrough" and not sse:
            await self._json(response, call)
        else:
            await self._stream(response, call, sse)
        return status

    async def fail(self, call: Call, error: GatewayError) -> int:
        """Answer with ``error`` (nothing was sent to the client yet); return its status."""
        self.metrics.upstream_errors.labels(error.code or "failed").inc()
        logger.warning("upstream request failed: %s", error.code)
        if call.planned is not None and error.status >= 500:
            call.planned.failed(error.code or "failed")
        await send_error(call.send, error, call.request_id, call.route)
        return error.status

    async def _error(self, response: httpx.Response, call: Call) -> None:
        self.metrics.upstream_errors.labels(f"http_{response.status_code}").inc()
        body = await read_limited(response.aiter_raw(), _MAX_ERROR_BODY, _upstream_too_large)
        normalized = None
        if _field(response.headers.raw, b"content-encoding") is None:
            normalized = normalize_error(call.route, response.status_code, body)
        if normalized is None:
            headers = response_headers(response.headers, keep_length=False)
        else:
            body, headers = normalized, list(_JSON_HEADERS)
        await _send_whole(call, response.status_code, headers, body)

    async def _redirect(self, response: httpx.Response, call: Call) -> None:
        """An upstream redirect, relayed whole with its ``Location`` pointing at the gateway, not the upstream."""
        body = await read_limited(response.aiter_raw(), _MAX_ERROR_BODY, _upstream_too_large)
        headers = rewrite_location(response_headers(response.headers, keep_length=False), call.upstream_base)
        await _send_whole(call, response.status_code, headers, body)

    async def _json(self, response: httpx.Response, call: Call) -> None:
        """Relay a whole answer, reading the cached tokens it reports.

        Non-streaming answers are small and arrive at once: reading them whole lets a mid-body failure still become
        a clean 502, and lets the gateway read the engine's cached-token count.
        """
        body = await read_limited(response.aiter_raw(), _MAX_JSON_BODY, _upstream_too_large)
        self.metrics.first_byte(call.route, time.perf_counter() - call.started)
        cached = None
        if _field(response.headers.raw, b"content-encoding") is None:
            # a success that is not a JSON object is an engine fault the client should see as one, not as a 200
            payload = decode_answer(body)
            if not isinstance(payload, dict):
                raise UpstreamError(
                    "the upstream engine answered with an invalid body", code="upstream_invalid_response"
                )
            cached = self._count_usage(payload, call.route)
            answer = call.planned.answer if call.planned is not None else None
            if answer is not None:
                body = answer.json(body)
        headers = response_headers(response.headers, keep_length=False)
        await _send_whole(call, response.status_code, headers, body, cached)

    async def _stream(self, response: httpx.Response, call: Call, sse: bool) -> None:
        """Relay the answer chunk by chunk as it arrives, reading the cached tokens an event stream reports.

        An event stream that fails after the first byte ends with one SSE ``error`` event; any other body is
        left truncated (the missing bytes against its length tell the client).
        """
        headers = response_headers(response.headers, keep_length=not sse) + call.own_headers
        await call.send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        plain = _field(response.headers.raw, b"content-encoding") is None
        sniffer = sniffed = UsageSniffer() if sse and plain else None
        answer = call.planned.answer if call.planned is not None else None
        rewriter = answer.stream() if answer is not None and sniffer is not None else None
        tail = b"\n\n"
        first = True
        try:
            async for received in response.aiter_raw():
                if first:
                    self.metrics.first_byte(call.route, time.perf_counter() - call.started)
                    first = False
                if sniffer is not None:
                    sniffer.feed(received)
                chunk = rewriter.feed(received) if rewriter is not None else received
                if not chunk:
                    continue  # held until the event (or the citation it may end in) is complete
                await call.send({"type": "http.response.body", "body": chunk, "more_body": True})
                tail = (tail + chunk)[-4:]
        except httpx.HTTPError as exc:
            error = upstream_error_from(exc)
            self.metrics.upstream_errors.labels(error.code or "failed").inc()
            if call.planned is not None:
                call.planned.failed(error.code or "failed")
            sniffer = None
            if not sse:
                logger.warning("upstream failed mid-body; the client receives a truncated response")
            else:
                logger.warning("upstream stream failed after the first byte: %s", error.code)
                rest = rewriter.flush() if rewriter is not None else b""
                tail = (tail + rest)[-4:]
                separator = b"" if tail.endswith((b"\n\n", b"\r\n\r\n")) else b"\n\n"
                event = rest + separator + stream_error(call.route, error)
                await call.send({"type": "http.response.body", "body": event, "more_body": True})
            rewriter = None
        if rewriter is not None and (rest := rewriter.flush()):
            await call.send({"type": "http.response.body", "body": rest, "more_body": True})
        if sniffed is not None and sniffed.oversized:
            self.metrics.sse_oversized_events.labels(call.route).inc(sniffed.oversized)
        usage = sniffer.usage if sniffer is not None else None
        await call.end(cached_tokens=self._count_usage(usage, call.route) if usage is not None else None)

    def _count_usage(self, payload: dict[str, Any], route: str) -> int | None:
        """Count the engine-reported prompt and cached tokens of an answer; return the cached ones."""
        cached = cached_tokens_from_usage(payload)
        prompt = prompt_tokens_from_usage(payload)
        if cached is not None and prompt is not None:
            self.metrics.engine_cached_tokens.labels(route).inc(cached)
            self.metrics.engine_prompt_tokens.labels(route).inc(prompt)
        return cached


def _field(raw: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in httpx's raw header list, lower-cased; None if absent.

    Cheaper than ``httpx.Headers.get``, which builds a lower-cased copy of every field on each call."""
    for key, value in raw:
        if key.lower() == name:
            return value.lower()
    return None


def _upstream_too_large() -> GatewayError:
    return UpstreamError("upstream response too large to relay", code="upstream_body_too_large")


async def _send_whole(
    call: Call, status: int, headers: list[tuple[bytes, bytes]], body: bytes, cached_tokens: int | None = None
) -> None:
    headers = [*headers, *call.own_headers, (b"content-length", str(len(body)).encode())]
    await call.send({"type": "http.response.start", "status": status, "headers": headers})
    await call.end(body, cached_tokens)


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
