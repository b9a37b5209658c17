"""The simulated engine's HTTP surface: a raw ASGI application (no framework; it sits under every test and benchmark).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/messages`` (Anthropic),
``POST /v1/responses`` (OpenAI Responses; all four streaming and not, see ``engines.sim.apis``), ``GET /v1/models``,
``GET /health``, and for tests ``GET /sim/requests``, ``GET /sim/stats``, ``POST /sim/reset``. Streams are real
SSE: each event is its own ASGI body message, sent as it is produced. A client disconnect (``http.disconnect``
while a response is being generated) stops the work and is counted as a cancellation.

Fault knob: a request header ``X-Sim-Fault: <status>`` answers with that HTTP status and an OpenAI error;
``X-Sim-Fault: midstream`` sends one token, then a ``data: {"error": ...}`` event, and closes the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import msgspec

from engines.sim import apis, protocol
from engines.sim.config import SimConfig
from engines.sim.engine import Admission, SimEngine
from engines.sim.protocol import ChunkWriter, Job, RequestError, encode, error_body

__all__ = ["ASGIApp", "SimApp", "create_sim_app"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_Handler = Callable[[Scope, Receive, Send, bytes], Awaitable[None]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
_decoder = msgspec.json.Decoder()
_Parse = Callable[[bytes, Any, str, tuple[int, int, int]], Job]


def create_sim_app(config: SimConfig | None = None) -> SimApp:
    """The ASGI application of a simulated engine with its own cache, log and counters."""
    return SimApp(SimEngine(config or SimConfig()))


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def _send_error(
    send: Send, status: int, message: str, type_: str, *, param: str | None = None, headers: list[Any] | None = None
) -> None:
    await _send_json(send, status, error_body(message, type_, param, None), headers)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when the client left (or sent more than ``limit`` bytes)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class SimApp:
    """ASGI callable serving one ``SimEngine``."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self._started = int(time.time())
        self._routes: dict[str, tuple[str, _Handler]] = {
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/messages": ("POST", self._messages),
            "/v1/responses": ("POST", self._responses),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/sim/requests": ("GET", self._requests),
            "/sim/stats": ("GET", self._stats),
            "/sim/reset": ("POST", self._reset),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        evictions = self.engine.evictions
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if evictions is not None:
                    await asyncio.to_thread(evictions.close, 1.0)  # one last, bounded attempt for what is queued
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        limit = self.engine.config.max_body_bytes
        body = await _read_body(receive, limit)
        if body is None:
            await _send_error(send, 413, f"request body larger than {limit} bytes", "invalid_request_error")
            return
        if not path.startswith("/sim/") and path != "/health":
            self.engine.record(scope, body)
        route = self._routes.get(path)
        if route is None:
            message = f"Invalid URL ({scope['method']} {path})"
            await _send_error(send, 404, message, "invalid_request_error")
        elif route[0] != scope["method"]:
            await _send_error(send, 405, f"Method {scope['method']} not allowed", "invalid_request_error")
        else:
            await route[1](scope, receive, send, body)

    async def _health(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _send_json(send, 200, b'{"status":"ok"}')

    async def _models(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        config = self.engine.config
        model = {
            "id": config.model,
            "object": "model",
            "created": self._started,
            "owned_by": "prefixgate-sim",
            "max_model_len": config.capacity_tokens,
        }
        await _send_json(send, 200, encode({"object": "list", "data": [model]}))

    async def _stats(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await _send_json(send, 200, encode(self.engine.stats()))

    async def _reset(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        self.engine.reset()
        await _send_json(send, 200, b'{"status":"ok"}')

    async def _requests(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        records = list(self.engine.log)
        limit = query.get("limit", [""])[0]
        if limit.isdigit():
            records = records[len(records) - int(limit) :] if int(limit) else []
        out = []
        for record in records:
            headers: dict[str, str] = {}
            for name, value in record.headers:
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            try:
                decoded: Any = _decoder.decode(record.body) if record.body else None
            except msgspec.DecodeError:
                decoded = record.body.decode("utf-8", "replace")
            out.append(
                {
                    "method": record.method,
                    "path": record.path,
                    "query": record.query,
                    "headers": headers,
                    "body": decoded,
                    "received_at": record.received_at,
                }
            )
        await _send_json(send, 200, encode(out))

    async def _completions(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await self._generate(scope, receive, send, body, protocol.completion_job)

    async def _chat(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await self._generate(scope, receive, send, body, protocol.chat_job)

    async def _messages(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await self._generate(scope, receive, send, body, apis.messages_job)

    async def _responses(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        await self._generate(scope, receive, send, body, apis.responses_job)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, body: bytes, parse: _Parse) -> None:
        engine = self.engine
        header_rid = fault = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                header_rid = value.decode("latin-1")
            elif name == b"x-sim-fault":
                fault = value.decode("latin-1").strip().lower()
        try:
            job = parse(body, engine.tokenizer, engine.config.model, engine.limits)
            request_ids = self._request_ids(job, header_rid)
        except RequestError as exc:
            engine.errors_total += 1
            echo = [(b"x-request-id", header_rid.encode())] if header_rid and header_rid.isprintable() else None
            await _send_error(send, exc.status, exc.message, exc.type, param=exc.param, headers=echo)
            return
        headers = [(b"x-request-id", request_ids[0].encode())]
        if fault is not None and fault.isdigit() and 400 <= int(fault) <= 599:
            engine.errors_total += 1
            status = int(fault)
            kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
            await _send_error(send, status, f"simulated fault {status}", kind, headers=headers)
            return
        admission = engine.admit(job, request_ids)
        response_id = ("chatcmpl-" if job.chat else "cmpl-") + request_ids[0]
        engine.in_flight += 1
        completed = False
        try:
            if job.api != "openai":
                work = self._answer_api(
                    send, job, admission, request_ids[0], headers, midstream_fault=fault == "midstream"
                )
            elif job.stream:
                work = self._stream(send, job, admission, response_id, headers, midstream_fault=fault == "midstream")
            else:
                work = self._respond(send, job, admission, response_id, headers)
            if job.stream or admission.prefill_s > 0 or (job.max_tokens and engine.config.decode_us_per_token):
                completed = await self._unless_disconnected(receive, work)
            else:
                completed = await work  # nothing to wait for: no disconnect can interrupt it
        finally:
            engine.in_flight -= 1
            engine.finish(job, admission, completed)

    @staticmethod
    def _request_ids(job: Job, header_rid: str | None) -> list[str]:
        """Per prompt: body ``rid`` (SGLang) or ``request_id``, else ``X-Request-Id`` (vLLM), else a fresh id."""
        count = len(job.prompts)
        if job.body_rids is not None:
            return job.body_rids if len(job.body_rids) == count else job.body_rids[:1] * count
        if header_rid is not None:
            protocol.check_header_request_id(header_rid)
            return [header_rid] * count
        return [uuid.uuid4().hex] * count

    async def _unless_disconnected(self, receive: Receive, work: Coroutine[Any, Any, bool]) -> bool:
        """Run ``work``; if the client disconnects first, cancel it, count it and return False."""
        task = asyncio.current_task()
        assert task is not None
        state = {"done": False, "gone": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:
                state["gone"] = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            return await work
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()
            self.engine.cancelled += 1
            logger.debug("client disconnected; generation cancelled")
            return False
        finally:
            state["done"] = True
            watcher.cancel()

    def _accounting(self, job: Job, admission: Admission) -> tuple[dict[str, Any], dict[str, Any]]:
        prompt_tokens = sum(len(p) for p in job.prompts)
        cached = sum(admission.cached)
        completion_tokens = sum(len(o) for o in admission.outputs)
        timings = {
            "prompt_n": prompt_tokens - cached,
            "cache_n": cached,
            "prompt_ms": admission.prefill_ms,
            "predicted_n": completion_tokens,
            "predicted_ms": round(job.max_tokens * self.engine.config.decode_us_per_token / 1000, 3),
        }
        return protocol.usage(prompt_tokens, completion_tokens, cached), timings

    async def _respond(
        self, send: Send, job: Job, admission: Admission, response_id: str, headers: list[tuple[bytes, bytes]]
    ) -> bool:
        if admission.prefill_s > 0:
            await asyncio.sleep(admission.prefill_s)
        self.engine.prefilled(job, admission)
        decode_s = job.max_tokens * self.engine.config.decode_us_per_token / 1e6
        if decode_s > 0:
            await asyncio.sleep(decode_s)
        usage, timings = self._accounting(job, admission)
        texts = ["".join(pieces) for pieces in admission.pieces]
        body = protocol.response_body(job, response_id, int(time.time()), texts, usage_=usage, timings=timings)
        await _send_json(send, 200, body, headers)
        return True

    async def _answer_api(
        self,
        send: Send,
        job: Job,
        admission: Admission,
        request_id: str,
        headers: list[tuple[bytes, bytes]],
        *,
        midstream_fault: bool,
    ) -> bool:
        """A Messages or Responses answer (one choice), whole or as that API's SSE events."""
        writer = (
            apis.MessagesWriter(job, request_id) if job.api == "messages" else apis.ResponsesWriter(job, request_id)
        )
        prompt, cached = len(job.prompts[0]), admission.cached[0]
        if job.stream:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
        if admission.prefill_s > 0:
            await asyncio.sleep(admission.prefill_s)
        self.engine.prefilled(job, admission)
        pieces = admission.pieces[0]
        timings = self._accounting(job, admission)[1]
        if not job.stream:
            decode_s = job.max_tokens * self.engine.config.decode_us_per_token / 1e6
            if decode_s > 0:
                await asyncio.sleep(decode_s)
            body = writer.body("".join(pieces), writer.usage(prompt, cached, len(pieces)), timings)
            await _send_json(send, 200, body, headers)
            return True
        await send(
            {"type": "http.response.body", "body": writer.head(writer.usage(prompt, cached, 0)), "more_body": True}
        )
        async for step in self._paced(job.max_tokens):
            await send({"type": "http.response.body", "body": writer.token(pieces[step]), "more_body": True})
            if midstream_fault:
                self.engine.errors_total += 1
                event = writer.error("simulated fault in the middle of a stream")
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return False
        tail = writer.tail("".join(pieces), writer.usage(prompt, cached, len(pieces)), timings)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return True

    async def _paced(self, steps: int) -> AsyncIterator[int]:
        """Yield each decode step when it is due: sub-millisecond sleeps are not honoured by event loops, so sleep
        only when a millisecond behind, and otherwise yield every few tokens so disconnects are still noticed."""
        loop = asyncio.get_running_loop()
        decode_s = self.engine.config.decode_us_per_token / 1e6
        deadline = loop.time()
        for step in range(steps):
            deadline += decode_s
            delay = deadline - loop.time()
            if delay >= 0.001:
                await asyncio.sleep(delay)
            elif step & 15 == 15:
                await asyncio.sleep(0)
            yield step

    async def _stream(
        self,
        send: Send,
        job: Job,
        admission: Admission,
        response_id: str,
        headers: list[tuple[bytes, bytes]],
        *,
        midstream_fault: bool,
    ) -> bool:
        writer = ChunkWriter(job, response_id, int(time.time()))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
        if admission.prefill_s > 0:
            await asyncio.sleep(admission.prefill_s)
        self.engine.prefilled(job, admission)
        samples = admission.pieces
        if job.chat:
            for index in range(len(samples)):
                await send({"type": "http.response.body", "body": writer.role(index), "more_body": True})
        async for step in self._paced(job.max_tokens):
            for index, pieces in enumerate(samples):
                await send({"type": "http.response.body", "body": writer.token(index, pieces[step]), "more_body": True})
            if midstream_fault:
                self.engine.errors_total += 1
                event = ChunkWriter.error("simulated fault in the middle of a stream", "server_error", 500)
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return False
        usage, timings = self._accounting(job, admission)
        last = len(samples) - 1
        for index in range(len(samples)):
            chunk = writer.finish(index, timings if index == last and not job.include_usage else None)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if job.include_usage:
            await send({"type": "http.response.body", "body": writer.usage(usage, timings), "more_body": True})
        await send({"type": "http.response.body", "body": protocol.DONE, "more_body": False})
        return True
