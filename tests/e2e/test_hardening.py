"""Issue 21 against a real ``prefixgate serve`` process: one spelling per route, no double sends, bounded SSE events,
and engine usage counted on streamed answers.

- Route spelling: ``/v1/%63hat/completions``, ``/v1//chat/completions``, ``/v1/x/../chat/completions``, a trailing
  slash, ... are the chat route (body validation, id namespacing, the stream cap, the result header), what cannot
  be normalised safely is a 400 that reaches nothing, and an upstream redirect points at the gateway.
- Resends: an upstream that reads a request whole and closes without answering receives it once.
- Bounded buffering: an Anthropic citation event that never ends passes through as it arrives, unchanged.
- Usage: a llama.cpp streamed answer without ``stream_options.include_usage`` is counted in ``/metrics``.

Each test fails on the code before issue 21 (the spelled routes were passthroughs, POSTs were sent twice, the
citation stream held the whole event, streamed llama.cpp answers were not counted).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.e2e.llama import LlamaServer
from tests.e2e.servers import CHAT_ANSWER, gateway_process, receive_body, serve_in_thread
from tests.e2e.test_faults import read_request, scripted_upstream

pytestmark = pytest.mark.timeout(120)

KEY = "K1"
AUTH = {"authorization": f"Bearer {KEY}"}
DOCS = "\n".join(
    f'<document id="d{i}">Document {i}: ' + " ".join(f"w{i}x{j}" for j in range(12)) + "</document>" for i in range(3)
)
RAG = [
    {"role": "system", "content": f"Answer from the documents.\n<documents>\n{DOCS}\n</documents>"},
    {"role": "user", "content": "Which document?"},
]
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 1},
}


@contextmanager
def prefixgate(upstream: str, *args: str) -> Iterator[str]:
    """A real ``prefixgate serve`` process in front of ``upstream``; yields its base URL."""
    with gateway_process("--upstream", upstream, "--log-level", "error", *args) as base:
        yield base


def raw_request(
    base: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with ``path`` written exactly as given (an HTTP library would normalise it first)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"content-type": "application/json", **(headers or {})}.items():
            connection.putheader(name, value)
        connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def metric_value(base: str, line_start: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ----------------------------------------------------------------------------------------- route spelling


@dataclass
class Engine:
    """A recording upstream: answers chat (a stream is held open until ``release``), Messages and Responses,
    redirects ``/v1/old-models`` to its own ``/v1/models`` (as a server redirecting a trailing slash does)."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (method, path, body)
    streaming: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await receive_body(receive)
        path = scope["path"]
        if path == "/health":
            await _answer(send, 200, b"{}")
            return
        body = json.loads(raw) if raw else {}
        self.seen.append((scope["method"], path, body))
        if path == "/v1/old-models":
            await _answer(send, 307, b"", [(b"location", f"{self.url}/v1/models".encode())])
        elif path == "/v1/chat/completions" and body.get("stream"):
            head = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            event = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t"}}]}'
            await send({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
            self.streaming.set()
            await asyncio.to_thread(self.release.wait, 30)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif path == "/v1/messages":
            await _answer(send, 200, json.dumps(MESSAGE).encode())
        else:
            await _answer(send, 200, CHAT_ANSWER)


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def spelled() -> Iterator[tuple[str, Engine]]:
    engine = Engine()
    with serve_in_thread(engine) as url:
        engine.url = url
        with prefixgate(url, "--engine", "sglang", "--api-key", KEY, "--max-concurrent-streams", "1") as base:
            yield base, engine


CHAT_SPELLINGS = [
    "/v1/%63hat/completions",
    "/v1/chat/%63ompletions",
    "/%76%31/chat/completions",
    "/v1//chat/completions",
    "/v1/./chat/completions",
    "/v1/x/../chat/completions",
    "/v1/chat/completions/",
    "/v1/chat//completions//",
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", *CHAT_SPELLINGS])
def test_every_spelling_of_chat_completions_is_the_chat_route(spelled: tuple[str, Engine], path: str) -> None:
    base, engine = spelled
    body = json.dumps({"model": "m", "rid": "victim-id", "messages": RAG}).encode()
    status, headers, answer = raw_request(base, "POST", path, body, AUTH)
    assert status == 200, answer
    assert "x-prefixgate-result" in headers  # planned like the chat route
    method, seen_path, sent = engine.seen[-1]
    assert (method, seen_path) == ("POST", "/v1/chat/completions")
    assert sent["rid"] != "victim-id"  # namespaced by the key, as on the real route
    assert sent["rid"] == headers["x-request-id"]


@pytest.mark.parametrize("path", CHAT_SPELLINGS[:4])
def test_a_spelled_chat_route_validates_its_body(spelled: tuple[str, Engine], path: str) -> None:
    base, engine = spelled
    before = len(engine.seen)
    status, _, answer = raw_request(base, "POST", path, b'{"model": "m", "messages": "not a list"}', AUTH)
    assert status == 400, answer
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert len(engine.seen) == before


def test_a_spelled_chat_route_takes_a_stream_slot(spelled: tuple[str, Engine]) -> None:
    base, engine = spelled
    engine.streaming.clear()
    engine.release.clear()
    body = json.dumps({"model": "m", "messages": RAG, "stream": True}).encode()
    held: list[int] = []
    first = threading.Thread(
        target=lambda: held.append(raw_request(base, "POST", "/v1/chat/completions", body, AUTH)[0])
    )
    first.start()
    try:
        assert engine.streaming.wait(20)
        for path in ("/v1/%63hat/completions", "/v1/chat/completions/", "/v1//chat/completions"):
            status, _, answer = raw_request(base, "POST", path, body, AUTH)
            assert status == 429, answer  # the one slot (--max-concurrent-streams 1) is taken
            assert json.loads(answer)["error"]["code"] == "too_many_streams"
    finally:
        engine.release.set()
        first.join(30)
    assert held == [200]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/%2e%2e/v1/chat/completions",
        "/v1/chat/%2E/completions",
        "/v1/chat/completions%00",
        "/v1/chat/completions%5C",
        "/v1/chat/completions%zz",
        "/v1/../../chat/completions",
    ],
)
def test_what_cannot_be_normalised_safely_is_a_400_that_reaches_nothing(spelled: tuple[str, Engine], path: str) -> None:
    base, engine = spelled
    before = len(engine.seen)
    status, headers, answer = raw_request(
        base, "POST", path, json.dumps({"model": "m", "messages": RAG}).encode(), AUTH
    )
    assert status == 400, answer
    assert json.loads(answer)["error"]["code"] == "invalid_path"
    assert re.fullmatch(r"req-[0-9a-f]{32}", headers["x-request-id"])  # answered like every other error
    assert len(engine.seen) == before


@pytest.mark.parametrize(
    ("path", "route", "valid"),
    [
        ("/v1/%6Dessages", "/v1/messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages/", "/v1/messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1//responses", "/v1/responses", {"model": "m", "input": "hi"}),
        ("/v1/x/../%72esponses/", "/v1/responses", {"model": "m", "input": "hi"}),
    ],
)  # fmt: skip
def test_messages_and_responses_spellings_are_their_routes(
    spelled: tuple[str, Engine], path: str, route: str, valid: dict[str, Any]
) -> None:
    base, engine = spelled
    status, headers, answer = raw_request(base, "POST", path, json.dumps(valid).encode(), AUTH)
    assert status == 200, answer
    assert "x-prefixgate-result" in headers
    assert engine.seen[-1][1] == route
    before = len(engine.seen)
    invalid = {**valid, "messages": "not a list"} if route == "/v1/messages" else {**valid, "input": 7}
    status, _, answer = raw_request(base, "POST", path, json.dumps(invalid).encode(), AUTH)
    assert status == 400, answer
    assert len(engine.seen) == before


@pytest.mark.parametrize("path", ["/%73tats", "//stats", "/stats/", "/v1/../stats"])
def test_index_routes_answer_every_spelling_alike(spelled: tuple[str, Engine], path: str) -> None:
    base, _ = spelled
    status, _, answer = raw_request(base, "GET", path, headers=AUTH)
    assert status == 200, answer
    assert json.loads(answer).keys() == httpx.get(f"{base}/stats", headers=AUTH).json().keys()


def test_an_upstream_redirect_points_at_the_gateway(spelled: tuple[str, Engine]) -> None:
    base, engine = spelled
    status, headers, _ = raw_request(base, "GET", "/v1/old-models", headers=AUTH)
    assert status == 307
    assert headers["location"] == "/v1/models"  # never the internal upstream address
    assert engine.url.removeprefix("http://") not in json.dumps(headers)


# ---------------------------------------------------------------------------------------------------- resends


def test_a_request_the_upstream_read_and_closed_on_arrives_once() -> None:
    """The upstream reads each request whole and closes without a byte of answer: it may have acted on it (a batch
    created, a completion run), so the request is never sent again; the client gets one 502."""
    arrivals: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        arrivals.append(line.split(b" ")[1])

    batch = json.dumps({"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    with scripted_upstream(handler) as upstream, prefixgate(upstream.url) as base:
        for path, body in (
            ("/v1/chat/completions", json.dumps({"model": "m", "messages": RAG})),
            ("/v1/chat/completions", json.dumps({"model": "m", "messages": RAG, "stream": True})),
            ("/v1/batches", batch),
            ("/v1/fine_tuning/jobs", json.dumps({"model": "m", "training_file": "f"})),
        ):
            arrivals.clear()
            status, _, answer = raw_request(base, "POST", path, body.encode())
            assert status == 502, answer
            assert json.loads(answer)["error"]["code"] == "upstream_connection_lost"
            time.sleep(0.2)  # a second send would have arrived by now
            assert arrivals == [path.encode()]
        assert 'kind="closed_unanswered_resent"' not in httpx.get(f"{base}/metrics", timeout=5).text


# -------------------------------------------------------------------------------------- bounded SSE buffering

OVERSIZED = 4 << 20


@dataclass
class CitingEngine:
    """An Anthropic Messages upstream: whole answers, and one stream whose citation event runs to 4 MiB and then
    waits for ``release`` before it ends; a normal citation event and ``message_stop`` follow."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    sent: bytearray = field(default_factory=bytearray)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await receive_body(receive)
        if scope["path"] == "/health":
            await _answer(send, 200, b"{}")
            return
        body = json.loads(raw)
        self.seen.append(body)
        if not body.get("stream"):
            await _answer(send, 200, json.dumps(MESSAGE).encode())
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        start = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","content":[]}}\n\n'
        await self._send(send, start)
        opening = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
            b'{"type":"citations_delta","citation":{"type":"char_location","document_index":0,"cited_text":"'
        )
        await self._send(send, opening)
        for _ in range(OVERSIZED // (64 << 10)):
            await self._send(send, b"x" * (64 << 10))
        await asyncio.to_thread(self.release.wait, 20)
        await self._send(send, b'"}}}\n\n')
        cite = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
            b'{"type":"citations_delta","citation":{"type":"char_location","document_index":0,"cited_text":"y"}}}\n\n'
        )
        await self._send(send, cite + b'event: message_stop\ndata: {"type":"message_stop"}\n\n', more=False)

    async def _send(self, send: Any, data: bytes, *, more: bool = True) -> None:
        self.sent += data
        await send({"type": "http.response.body", "body": data, "more_body": more})


def _ask(names: list[str], *, stream: bool = False) -> dict[str, Any]:
    documents = [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
         "data": f"{name.capitalize()} report. " + " ".join(f"{name[:3]}{i}" for i in range(120))},
         "title": name, "citations": {"enabled": True}}
        for name in names
    ]  # fmt: skip
    content = [*documents, {"type": "text", "text": "Cite one."}]
    return {"model": "m", "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": content}]}


def test_a_citation_event_that_never_ends_passes_through_as_it_arrives() -> None:
    engine = CitingEngine()
    with serve_in_thread(engine) as url, prefixgate(url) as base:
        httpx.post(f"{base}/v1/messages", json=_ask(["alpha", "beta", "gamma"]), timeout=30).raise_for_status()
        held = [block["title"] for block in engine.seen[-1]["messages"][0]["content"] if block["type"] == "document"]
        order = list(reversed(held))  # the engine will be sent ``held``: its document 0 is the client's document 2
        timer = threading.Timer(30, engine.release.set)  # the old gateway held the event: never wait forever
        timer.start()
        try:
            with httpx.stream("POST", f"{base}/v1/messages", json=_ask(order, stream=True), timeout=60) as answer:
                assert answer.status_code == 200
                received = bytearray()
                chunks = answer.iter_raw()
                while len(received) < OVERSIZED and not engine.release.is_set():
                    received += next(chunks)
                assert not engine.release.is_set(), "the gateway held the event until it ended"
                started = time.perf_counter()
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200
                health = time.perf_counter() - started
                engine.release.set()
                received += b"".join(chunks)
        finally:
            timer.cancel()
    sent = bytes(engine.sent)
    oversized_start = sent.index(b"event: content_block_delta")
    oversized_end = sent.index(b"\n\n", oversized_start) + 2
    assert bytes(received[oversized_start:oversized_end]) == sent[oversized_start:oversized_end]  # unchanged
    tail = bytes(received[oversized_end:])
    assert b'"document_index":2' in tail  # the next event is mapped again: framing resumed after the big one
    assert tail.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert health < 1.0


def test_oversized_events_are_counted() -> None:
    engine = CitingEngine()
    engine.release.set()
    with serve_in_thread(engine) as url, prefixgate(url) as base:
        with httpx.stream("POST", f"{base}/v1/messages", json=_ask(["alpha"], stream=True), timeout=60) as answer:
            received = answer.read()
        assert received == bytes(engine.sent)  # nothing to map: byte for byte
        assert metric_value(base, 'prefixgate_sse_oversized_events_total{route="/v1/messages"}') == 1


# ------------------------------------------------------------------------------------- usage on streamed answers


def test_a_streamed_llama_answer_without_include_usage_is_counted(llama_server: LlamaServer) -> None:
    """LlamaIndex and Haystack stream without ``stream_options.include_usage``: llama-server's last chunk still
    carries ``timings`` (``prompt_n`` computed + ``cache_n`` reused), which the gateway counts. The client's stream
    is the engine's: nothing is asked of the engine on its behalf, nothing added or removed."""
    line = 'prefixgate_engine_prompt_tokens_total{route="/v1/chat/completions"}'
    cached_line = 'prefixgate_engine_cached_tokens_total{route="/v1/chat/completions"}'
    body = {"model": "m", "messages": [{"role": "user", "content": "count me " * 20}], "max_tokens": 2, "stream": True}
    with prefixgate(llama_server.url, "--engine", "llamacpp") as base:
        totals: list[tuple[int, int]] = []
        for _ in range(2):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as answer:
                raw = answer.read()
            assert b'"usage"' not in raw  # the client did not ask for usage and gets none
            last = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {") and b"timings" in e][-1]
            totals.append((last["timings"]["prompt_n"] + last["timings"]["cache_n"], last["timings"]["cache_n"]))
        assert metric_value(base, line) == sum(prompt for prompt, _ in totals)
        assert metric_value(base, cached_line) == sum(cached for _, cached in totals)


def test_metrics_match_the_engine_usage_of_whole_answers_too(llama_server: LlamaServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "count me too " * 20}], "max_tokens": 2}
    line = 'prefixgate_engine_prompt_tokens_total{route="/v1/chat/completions"}'
    with prefixgate(llama_server.url, "--engine", "llamacpp") as base:
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert metric_value(base, line) == answer["usage"]["prompt_tokens"]


def test_requests_right_after_llama_streams_are_answered(llama_server: LlamaServer) -> None:
    """llama-server closes its connection after every streamed answer while announcing keep-alive. A request written
    into such a connection before the close arrived would now get a 502 (it was written whole, so it is not sent
    again): the gateway pools no connection after a llama.cpp stream, and every request right after one succeeds."""
    stream = {"model": "m", "messages": [{"role": "user", "content": "one"}], "max_tokens": 2, "stream": True}
    whole = {"model": "m", "messages": [{"role": "user", "content": "two"}], "max_tokens": 2}
    with (
        prefixgate(llama_server.url, "--engine", "llamacpp") as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        for _ in range(8):
            with client.stream("POST", "/v1/chat/completions", json=stream) as answer:
                assert answer.status_code == 200
                answer.read()
            assert client.post("/v1/chat/completions", json=whole).status_code == 200
        assert 'kind="upstream_connection_lost"' not in client.get("/metrics").text
