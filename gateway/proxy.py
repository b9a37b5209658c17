"""The ``/v1/*`` reverse proxy, as a raw ASGI app mounted into the Litestar application.

Per request: check the client key, resolve the request id (namespaced by that key, see ``gateway.ids``), refuse
header values a server must not forward, read the body within the size limit, decode a small view (completion
routes only), take a stream slot (429 beyond ``max_concurrent_streams``), let the planner rewrite the body
(413 beyond ``max_blocks_per_request``), stamp the engine's request id, then stream the upstream answer back.
Server-sent events are relayed chunk by chunk as they arrive; a client disconnect cancels the upstream request;
a failure after the first streamed byte becomes one SSE ``error`` event. Nothing here blocks the event loop.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec

from engines.base import EngineAdapter, cached_tokens_from_usage, prompt_tokens_from_usage
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    normalize_upstream_error,
    upstream_error_from,
)
from gateway.ids import KeyNamespaces, mint_request_id, resolve_request_id
from gateway.inbound import ClientGone, check_headers, check_passthrough_path, raw_path, read_body
from gateway.logs import request_id_var
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.upstream import build_request, request_headers, response_headers
from gateway.wire import ChatView, CompletionView, decode_view, malformed_json_is_400, replace_fields

__all__ = ["Exchange", "Planner", "Proxy"]

logger = logging.getLogger("prefixgate.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COMPLETION_ROUTES: dict[str, type[ChatView] | type[CompletionView]] = {
    "/v1/chat/completions": ChatView,
    "/v1/completions": CompletionView,
}
_MAX_ERROR_BODY = 1 << 20
_MAX_JSON_BODY = 64 << 20


# RFC 9110 field names are tokens; values are visible characters, spaces and tabs (obs-text 0x80-0xFF tolerated).
@dataclass(slots=True)
class Exchange:
    """One proxied completion request as the planner sees it, and what it decided."""

    request_id: str
    route: str
    headers: dict[str, str]
    body: bytes
    view: ChatView | CompletionView
    fields: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    on_accept: Callable[[], None] | None = None
    on_usage: Callable[[int | None], None] | None = None
    on_finish: Callable[[], None] | None = None


Planner = Callable[[Exchange], None]


@dataclass(slots=True)
class _Call:
    """What the relay needs to know about the request it is answering."""

    send: Send
    request_id: str
    route: str
    started: float
    own_headers: list[tuple[bytes, bytes]]
    stream_slot: bool = False
    on_accept: Callable[[], None] | None = None
    on_usage: Callable[[int | None], None] | None = None
    on_finish: Callable[[], None] | None = None

    def finish(self) -> None:
        """Run ``on_finish`` once: the upstream is done with this request (e.g. its llama.cpp slot is free)."""
        callback, self.on_finish = self.on_finish, None
        if callback is not None:
            callback()

    async def end(self, body: bytes = b"") -> None:
        """Send the last body message, after ``finish``: a client that sends its next request the moment this
        one ends must find the gateway's view of the upstream already up to date."""
        self.finish()
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class Proxy:
    """ASGI app answering every ``/v1/*`` request by forwarding it upstream."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        engine: EngineAdapter,
        metrics: Metrics,
        *,
        planner: Planner | None = None,
        issued: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.issued = issued  # ids the index API handed out: clients send them back as they are (batch flow)
        self.client = client
        self.engine = engine
        self.metrics = metrics
        self.planner = planner
        self._keys = [k.encode() for k in settings.api_key]
        self._namespaces = KeyNamespaces(self._keys)
        self.streams = 0  # streaming completion requests in flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal: GatewayError | None = None
        try:
            namespace = self._authorize(headers)
            check_headers(scope["headers"])
        except GatewayError as exc:
            refusal, namespace = exc, None
        # a refused request never has its id honoured: the client proved nothing about who it is
        client_id = headers.get("x-request-id")
        if refusal is not None:
            request_id = mint_request_id()
        elif client_id and self.issued is not None and self.issued(client_id):
            request_id = client_id
        else:
            request_id = resolve_request_id(client_id, namespace)
        token = request_id_var.set(request_id)
        path = raw_path(scope)
        route = path.decode("latin-1") if path in (b"/v1/chat/completions", b"/v1/completions") else "passthrough"
        call = _Call(send, request_id, route, started, [(b"x-request-id", request_id.encode())])
        status = 500
        self.metrics.in_flight.inc()
        try:
            if refusal is not None:
                raise refusal
            status = await self._handle(scope, receive, headers, call)
        except ClientGone:
            status = 499
        except GatewayError as exc:
            status = exc.status
            await _send_error(send, exc, request_id)
        finally:
            if call.stream_slot:
                self.streams -= 1
            if status == 499:
                self.metrics.disconnects.inc()
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    async def _handle(self, scope: Scope, receive: Receive, headers: dict[str, str], call: _Call) -> int:
        method = scope["method"]
        path = raw_path(scope)
        body = await read_body(receive, headers, self.settings.max_body_bytes)
        view_type = COMPLETION_ROUTES.get(call.route)
        try:
            if view_type is not None and method == "POST":
                body = self._prepare(body, view_type, headers, call)
            elif view_type is not None:
                raise InvalidRequest(f"{call.route} accepts POST only", code="method_not_allowed")
            else:
                check_passthrough_path(path)
            return await self._forward(scope, receive, path, body, call)
        finally:
            call.finish()

    async def _forward(self, scope: Scope, receive: Receive, path: bytes, body: bytes, call: _Call) -> int:
        target = path.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        outbound = request_headers(
            scope["headers"],
            strip_authorization=bool(self._keys),
            upstream_api_key=self.settings.upstream_api_key,
            extra=self.engine.stamp_headers(call.request_id),
        )
        request = build_request(self.client, scope["method"], target, outbound, body)
        status = 499
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            status = await self._exchange(request, call)
            tg.cancel_scope.cancel()
        return status

    def _prepare(
        self, body: bytes, view_type: type[ChatView] | type[CompletionView], headers: dict[str, str], call: _Call
    ) -> bytes:
        """Validate a completion body, let the planner rewrite it, stamp the engine's request id."""
        with malformed_json_is_400():
            return self._plan(body, view_type, headers, call)

    def _plan(
        self, body: bytes, view_type: type[ChatView] | type[CompletionView], headers: dict[str, str], call: _Call
    ) -> bytes:
        exchange = Exchange(call.request_id, call.route, headers, body, decode_view(body, view_type))
        if exchange.view.stream:
            self._take_stream_slot(call)
        if self.planner is not None:
            try:
                self.planner(exchange)
            finally:
                call.on_finish = exchange.on_finish  # a llama.cpp slot chosen by the planner is released either way
        blocks = exchange.result.get("blocks", 0) if exchange.result is not None else 0
        if isinstance(blocks, int) and blocks > self.settings.max_blocks_per_request:
            raise PayloadTooLarge(
                f"the request carries {blocks} retrieved blocks; at most {self.settings.max_blocks_per_request} "
                "are accepted",
                code="too_many_blocks",
            )
        exchange.fields.update(self.engine.stamp_fields(call.request_id))
        if self.settings.kv_events_endpoint:
            exchange.fields.update(self.engine.kv_event_fields(call.request_id, exchange.body))
        if exchange.result is not None:
            call.own_headers.append((b"x-prefixgate-result", msgspec.json.encode(exchange.result)))
        call.on_accept = exchange.on_accept
        call.on_usage = exchange.on_usage
        return replace_fields(exchange.body, exchange.fields)

    def _take_stream_slot(self, call: _Call) -> None:
        limit = self.settings.max_concurrent_streams
        if self.streams >= limit:
            raise TooManyRequests(
                f"too many streaming requests in flight (limit {limit}); retry shortly",
                retry_after=1,
                code="too_many_streams",
            )
        self.streams += 1
        call.stream_slot = True

    def _authorize(self, headers: dict[str, str]) -> str | None:
        """Check the bearer key; return the request-id namespace of the key presented (None without keys)."""
        if not self._keys:
            return None
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        offered = presented.strip().encode("latin-1")
        # Compare against every key, without stopping early, so the time taken does not reveal which one matched.
        matched: bytes | None = None
        for key in self._keys:
            if hmac.compare_digest(offered, key):
                matched = key
        if scheme.lower() != "bearer" or matched is None:
            raise Unauthorized("missing or invalid API key", code="invalid_api_key")
        return self._namespaces[matched]

    async def _exchange(self, request: httpx.Request, call: _Call) -> int:
        """Send upstream and relay the answer; errors before the response starts become error responses."""
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return await self._fail(call, upstream_error_from(exc))
        try:
            status = response.status_code
            if status < 400 and call.on_accept is not None:
                call.on_accept()  # the engine accepted the request: what it was sent is now in its cache
            if status >= 400:
                await self._relay_error(response, call)
            elif response.headers.get("content-type", "").startswith("text/event-stream"):
                cached = await self._relay_stream(response, call)
                if call.on_usage is not None:
                    call.on_usage(cached)
            elif call.route != "passthrough":
                await self._relay_json(response, call)
            else:
                await self._relay_raw(response, call)
            return status
        except httpx.HTTPError as exc:
            return await self._fail(call, upstream_error_from(exc))
        except GatewayError as exc:
            return await self._fail(call, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _fail(self, call: _Call, error: GatewayError) -> int:
        self.metrics.upstream_errors.labels(error.code or "failed").inc()
        logger.warning("upstream request failed: %s", error.code)
        await _send_error(call.send, error, call.request_id)
        return error.status

    async def _relay_error(self, response: httpx.Response, call: _Call) -> None:
        self.metrics.upstream_errors.labels(f"http_{response.status_code}").inc()
        body = await _read_limited(response, _MAX_ERROR_BODY)
        normalized = None
        if "content-encoding" not in response.headers:
            normalized = normalize_upstream_error(response.status_code, body)
        if normalized is None:
            headers = response_headers(response.headers, keep_length=False)
        else:
            body = normalized
            headers = [(b"content-type", b"application/json")]
        await _send_whole(call, response.status_code, headers, body)

    async def _relay_json(self, response: httpx.Response, call: _Call) -> None:
        # Non-streaming answers are small and arrive at once: reading them whole lets a mid-body failure
        # still become a clean 502, and lets the gateway read the engine's cached-token count.
        body = await _read_limited(response, _MAX_JSON_BODY)
        self.metrics.ttfb.labels(call.route).observe(time.perf_counter() - call.started)
        cached = None
        if "content-encoding" not in response.headers:
            # a success that is not a JSON object is an engine fault the client should see as one, not as a 200
            payload = _decode_answer(body)
            if not isinstance(payload, dict):
                raise UpstreamError(
                    "the upstream engine answered with an invalid body", code="upstream_invalid_response"
                )
            cached = self._count_usage(payload)
        if call.on_usage is not None:
            call.on_usage(cached)
        await _send_whole(call, response.status_code, response_headers(response.headers, keep_length=False), body)

    async def _relay_raw(self, response: httpx.Response, call: _Call) -> None:
        headers = response_headers(response.headers, keep_length=True) + call.own_headers
        await call.send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        first = True
        try:
            async for chunk in response.aiter_raw():
                if first:
                    self.metrics.ttfb.labels(call.route).observe(time.perf_counter() - call.started)
                    first = False
                await call.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.labels(upstream_error_from(exc).code or "failed").inc()
            logger.warning("upstream failed mid-body; the client receives a truncated response")
        await call.end()

    async def _relay_stream(self, response: httpx.Response, call: _Call) -> int | None:
        """Relay SSE bytes as they arrive; on upstream failure end with one ``error`` event."""
        headers = response_headers(response.headers, keep_length=False) + call.own_headers
        await call.send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        first = True
        tail = b"\n\n"
        sniffer = _UsageSniffer() if "content-encoding" not in response.headers else None
        try:
            async for chunk in response.aiter_raw():
                if first:
                    self.metrics.ttfb.labels(call.route).observe(time.perf_counter() - call.started)
                    first = False
                await call.send({"type": "http.response.body", "body": chunk, "more_body": True})
                tail = (tail + chunk)[-2:]
                if sniffer is not None:
                    sniffer.feed(chunk)
        except httpx.HTTPError as exc:
            error = upstream_error_from(exc)
            self.metrics.upstream_errors.labels(error.code or "failed").inc()
            logger.warning("upstream stream failed after the first byte: %s", error.code)
            separator = b"" if tail == b"\n\n" else b"\n\n"
            event = separator + b"data: " + error.body() + b"\n\n"
            await call.send({"type": "http.response.body", "body": event, "more_body": True})
            sniffer = None
        await call.end()
        if sniffer is None:
            return None
        return self._count_usage(sniffer.usage) if sniffer.usage is not None else None

    def _count_usage(self, payload: dict[str, Any]) -> int | None:
        """Count the engine-reported prompt and cached tokens of an answer; return the cached ones."""
        cached = cached_tokens_from_usage(payload)
        prompt = prompt_tokens_from_usage(payload)
        if cached is not None and prompt is not None:
            self.metrics.engine_cached_tokens.inc(cached)
            self.metrics.engine_prompt_tokens.inc(prompt)
        return cached


class _UsageSniffer:
    """Watches relayed SSE bytes for the chunk carrying ``usage`` without holding the stream."""

    __slots__ = ("_pending", "usage")

    def __init__(self) -> None:
        self._pending = b""
        self.usage: dict[str, Any] | None = None  # the last chunk that reported cached tokens

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        events = data.split(b"\n\n")
        self._pending = events.pop()[-(1 << 16) :]
        for event in events:
            if b'"usage"' not in event and b'"timings"' not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._read(line[5:].strip())

    def _read(self, data: bytes) -> None:
        payload = _decode_answer(data)
        if isinstance(payload, dict) and cached_tokens_from_usage(payload) is not None:
            self.usage = payload


def _decode_answer(body: bytes) -> Any:
    """An upstream JSON answer, or None when it is not valid JSON (or nests deeper than msgspec follows)."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise UpstreamError("upstream response too large to relay", code="upstream_body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_whole(call: _Call, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, *call.own_headers, (b"content-length", str(len(body)).encode())]
    await call.send({"type": "http.response.start", "status": status, "headers": headers})
    await call.end(body)


async def _send_error(send: Send, exc: GatewayError, request_id: str) -> None:
    body = exc.body()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
                *((name.encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
