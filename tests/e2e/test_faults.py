"""Faults over real loopback sockets: each ends with a clear client-visible error or a correct answer.

The gateway runs in-process under uvicorn (so its app state can be inspected); upstreams are the simulated
engine or a scripted raw asyncio server that misbehaves on purpose (closes mid-stream, stalls, answers garbage,
resets the connection). Every test also checks that nothing leaks: ``prefixgate_in_flight_requests`` returns to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engines.hooks import EvictionReporter
from engines.sim import SimConfig, create_sim_app
from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import CHAT_ANSWER, free_port, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(90)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

DOCS = "\n".join(
    f'<document id="d{i}">Document {i}: ' + " ".join(f"w{i}x{j}" for j in range(12)) + "</document>" for i in range(3)
)
RAG_CHAT = {
    "model": "sim",
    "messages": [
        {"role": "system", "content": f"Answer from the documents.\n<documents>\n{DOCS}\n</documents>"},
        {"role": "user", "content": "Which document?"},
    ],
    "max_tokens": 4,
}
SSE_EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'


# ------------------------------------------------------------------------------------------------ helpers


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 request with a Content-Length body: (request line, headers, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {}
    for item in fields:
        if ":" in item:
            name, value = item.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line.encode("latin-1"), headers, body


@dataclass(frozen=True)
class Scripted:
    url: str
    loop: asyncio.AbstractEventLoop


@contextmanager
def scripted_upstream(handler: Handler) -> Iterator[Scripted]:
    """A raw asyncio HTTP server in a thread; ``handler`` owns each connection (and may misbehave)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}
    connections: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            connections.discard(task)

    async def start() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        ready.set()

    async def stop() -> None:
        holder["server"].close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await holder["server"].wait_closed()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    try:
        yield Scripted(f"http://127.0.0.1:{holder['port']}", loop)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextmanager
def gateway_for(upstream: str, port: int | None = None, **overrides: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(load_settings(environ={}, upstream=upstream, **overrides))
    with serve_in_thread(app, port=port) as base:
        yield base, app
        wait_in_flight_zero(base)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def wait_in_flight_zero(base: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(base, "prefixgate_in_flight_requests") != 0:
        assert time.monotonic() < deadline, "gateway requests still in flight"
        time.sleep(0.05)


def sse_events(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


def error_of(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: "), event
    error: dict[str, Any] = json.loads(event[6:])["error"]
    return error


def cut_stream_error(base: str, **headers: str) -> dict[str, Any]:
    """Stream ``RAG_CHAT``: a 200 whose first event is the engine's and whose last is the gateway's error event; the
    error."""
    status, raw = post_stream(base, RAG_CHAT, **headers)
    assert status == 200
    events = sse_events(raw)
    assert events[0] + b"\n\n" == SSE_EVENT
    return error_of(events[-1])


def post_stream(base: str, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=30
    ) as response:
        return response.status_code, response.read()


def post_json(base: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30)


def sse_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------------- upstream faults


def test_upstream_down_at_start_then_coming_up() -> None:
    engine_port = free_port()
    with gateway_for(f"http://127.0.0.1:{engine_port}") as (base, _):
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 503
        down = post_json(base, RAG_CHAT)
        assert down.status_code == 502
        assert down.json()["error"]["code"] == "upstream_unreachable"
        assert f"{engine_port}" not in down.text
        status, raw = post_stream(base, RAG_CHAT)
        assert status == 502  # nothing streamed yet: a plain error response, not an SSE event
        assert json.loads(raw)["error"]["type"] == "upstream_error"
        with serve_in_thread(create_sim_app(SimConfig(prefill_us_per_token=0)), port=engine_port):
            assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
            up = post_json(base, RAG_CHAT)
            assert up.status_code == 200 and up.json()["choices"][0]["message"]["content"]
            status, raw = post_stream(base, RAG_CHAT)
            assert status == 200 and sse_events(raw)[-1] == b"data: [DONE]"


def test_upstream_dying_mid_stream() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, body = await read_request(reader)
        if b'"stream":true' in body.replace(b" ", b""):
            writer.write(sse_head() + chunk(SSE_EVENT) + chunk(SSE_EVENT[:30]))
        else:
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"id":')
        await writer.drain()
        writer.close()  # dies: no terminating chunk, body shorter than announced

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):
        status, raw = post_stream(base, RAG_CHAT)
        assert status == 200
        assert raw.startswith(SSE_EVENT + SSE_EVENT[:30])
        events = sse_events(raw[len(SSE_EVENT) + 30 :])
        assert len(events) == 1
        assert error_of(events[0])["code"] == "upstream_connection_lost"
        response = post_json(base, RAG_CHAT)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_connection_lost"


def test_upstream_slower_than_the_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, body = await read_request(reader)
        if b'"stream":true' in body.replace(b" ", b""):
            writer.write(sse_head() + chunk(SSE_EVENT))
            await writer.drain()
        await asyncio.sleep(30)  # stalls (cancelled when the gateway gives up and the server stops)

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url, read_timeout=0.5) as (base, _):
        started = time.monotonic()
        response = post_json(base, RAG_CHAT)
        assert response.status_code == 504
        assert response.json()["error"] == {
            "message": "the upstream engine did not answer in time",
            "type": "timeout_error",
            "param": None,
            "code": "upstream_read_timeout",
        }
        status, raw = post_stream(base, RAG_CHAT)
        assert time.monotonic() - started < 20  # two 0.5 s timeouts, with generous room for a loaded machine
        assert status == 200
        events = sse_events(raw)
        assert events[0] + b"\n\n" == SSE_EVENT
        assert error_of(events[1])["code"] == "upstream_read_timeout"
        assert len(events) == 2


GARBAGE: dict[str, tuple[bytes, int, str | None]] = {
    # name: (raw response, status the client gets, error code)
    "html_502": (
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 24\r\n\r\n<html>Bad Gateway</html>",
        502,
        None,
    ),
    "truncated_json": (
        b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{"id": "x", "choi',
        502,
        "upstream_connection_lost",
    ),
    "complete_but_invalid_json": (
        b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{"id": "x", "choi',
        502,
        "upstream_invalid_response",
    ),
    "json_not_an_object": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 6\r\n\r\n[1, 2]",
        502,
        "upstream_invalid_response",
    ),
    "not_http": (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 502, "upstream_connection_lost"),
    "bad_status_line": (b"HTTP/1.1 abc\r\n\r\n", 502, "upstream_connection_lost"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_upstream_answering_garbage(name: str) -> None:
    raw, status, code = GARBAGE[name]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):
        response = post_json(base, RAG_CHAT)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if code is not None:
            assert error["code"] == code
        else:
            assert error == {
                "message": "upstream engine answered HTTP 502",
                "type": "upstream_error",
                "param": None,
                "code": 502,
            }


def test_upstream_sending_invalid_sse_bytes_and_invalid_chunking() -> None:
    garbage = b"\xff\xfe\x00not an event\r\n\r\ndata: {broken json\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request(reader)
        if headers.get("x-case") == "bytes":
            writer.write(sse_head() + chunk(SSE_EVENT) + chunk(garbage) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        else:
            writer.write(sse_head() + chunk(SSE_EVENT) + b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        writer.close()

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):
        # the gateway relays event bytes as they come: the client sees exactly what the engine sent
        status, raw = post_stream(base, RAG_CHAT, **{"x-case": "bytes"})
        assert status == 200
        assert raw == SSE_EVENT + garbage + b"data: [DONE]\n\n"
        # broken HTTP framing is a transport failure: one error event ends the stream
        assert cut_stream_error(base, **{"x-case": "chunking"})["code"] == "upstream_connection_lost"


def test_connection_resets() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request(reader)
        if headers.get("x-case") == "after-headers":
            writer.write(sse_head() + chunk(SSE_EVENT))
            await writer.drain()
            await asyncio.sleep(0.1)
        reset(writer)

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):
        response = post_json(base, RAG_CHAT)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_connection_lost"
        status, _ = post_stream(base, RAG_CHAT)
        assert status == 502
        assert cut_stream_error(base, **{"x-case": "after-headers"})["code"] == "upstream_connection_lost"


def test_a_request_the_engine_read_whole_on_a_kept_alive_connection_and_closed_on_is_not_sent_again() -> None:
    """The engine read the second request whole on a kept-alive connection and closed it without a byte of answer:
    it may have acted on the request, so the gateway does not send it again (``docs/reliability.md``, "When a
    request is sent again"); the client gets one 502 and the next request goes out on a fresh connection."""
    arrivals: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrivals.append(1)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(CHAT_ANSWER)
        writer.write(head + CHAT_ANSWER)
        await writer.drain()
        await read_request(reader)
        arrivals.append(2)  # read whole, then closed unanswered

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):
        assert post_json(base, RAG_CHAT).status_code == 200
        unanswered = post_json(base, RAG_CHAT)
        assert unanswered.status_code == 502, unanswered.text
        assert unanswered.json()["error"]["code"] == "upstream_connection_lost"
        answered = post_json(base, RAG_CHAT)
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"] == "ok"
        assert arrivals == [1, 2, 1]  # the unanswered request arrived once
        assert 'kind="closed_unanswered_resent"' not in httpx.get(f"{base}/metrics", timeout=5).text


# ---------------------------------------------------------------------------------------------- client faults


def test_clients_disconnecting_mid_stream_cancel_the_upstream() -> None:
    sim = create_sim_app(SimConfig(prefill_us_per_token=0, decode_us_per_token=2000.0))
    with serve_in_thread(sim) as engine, gateway_for(engine, max_concurrent_streams=3) as (base, app):
        host, port = base.removeprefix("http://").split(":")
        before = httpx.get(f"{engine}/sim/stats").json()["cancelled"]
        streams = 0
        for stream in (True, True, True, False):
            body = json.dumps({**RAG_CHAT, "max_tokens": 2000, "stream": stream}).encode()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                if stream:
                    assert b"200 OK" in sock.recv(4096)
                    streams += 1
                else:
                    wait_for(lambda: httpx.get(f"{engine}/sim/stats").json()["in_flight"] == 1, what="engine busy")
        wait_for(lambda: httpx.get(f"{engine}/sim/stats").json()["cancelled"] == before + 4, what="cancellations")
        stats = httpx.get(f"{engine}/sim/stats").json()
        assert stats["in_flight"] == 0
        wait_in_flight_zero(base)
        assert metric(base, "prefixgate_client_disconnects_total") == 4
        assert app.state.proxy.streams == 0  # every stream slot was given back
        for _ in range(3):
            status, raw = post_stream(base, {**RAG_CHAT, "max_tokens": 2})
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        # the gateway still answers normally afterwards
        assert post_json(base, {**RAG_CHAT, "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------------------------------ eviction ordering


def test_eviction_callbacks_before_during_after_duplicated_and_out_of_order() -> None:
    """``/requests`` ends with exactly the ids whose eviction was not reported after their commit."""
    loop_gates: dict[str, asyncio.Event] = {}
    arrived: dict[str, threading.Event] = {}
    lock = threading.Lock()

    def gate(rid: str) -> None:
        with lock:
            arrived[rid] = threading.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, headers, body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            rid = headers["x-request-id"]
            with lock:
                held = arrived.get(rid)
            stream = b'"stream":true' in body.replace(b" ", b"")
            if held is not None and not stream:
                loop_gates[rid] = asyncio.Event()
                held.set()
                await loop_gates[rid].wait()  # the engine has the request but has not answered: no commit yet
            if stream:
                writer.write(sse_head() + chunk(SSE_EVENT))
                await writer.drain()
                if held is not None:
                    loop_gates[rid] = asyncio.Event()
                    held.set()
                    await loop_gates[rid].wait()  # mid-stream: accepted (committed), still generating
                writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(CHAT_ANSWER), CHAT_ANSWER)
                )
            await writer.drain()

    def release(loop: asyncio.AbstractEventLoop, rid: str) -> None:
        loop.call_soon_threadsafe(loop_gates[rid].set)

    with scripted_upstream(handler) as upstream, gateway_for(upstream.url) as (base, _):

        def evict(*ids: str) -> dict[str, Any]:
            response = httpx.post(f"{base}/evict", json={"request_ids": list(ids)}, timeout=10)
            assert response.status_code == 200
            result: dict[str, Any] = response.json()
            return result

        def send(rid: str, stream: bool = False) -> None:
            if stream:
                status, raw = post_stream(base, RAG_CHAT, **{"x-request-id": rid})
                assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
            else:
                response = post_json(base, RAG_CHAT, **{"x-request-id": rid})
                assert response.status_code == 200 and response.headers["x-request-id"] == rid

        # before: the report precedes the request it names; the later commit stands
        assert evict("e-before")["not_found"] == ["e-before"]
        send("e-before")
        # during, before the engine answered: still before the commit, so the commit stands
        loop = upstream.loop
        gate("e-during")
        worker = threading.Thread(target=send, args=("e-during",))
        worker.start()
        assert arrived["e-during"].wait(10)
        assert evict("chatcmpl-e-during")["not_found"] == ["e-during"]
        release(loop, "e-during")
        worker.join(10)
        # during, mid-stream: the engine accepted the request, so the report removes it
        gate("e-stream")
        worker = threading.Thread(target=send, args=("e-stream", True))
        worker.start()
        assert arrived["e-stream"].wait(10)
        wait_for(lambda: "e-stream" in _listed(base), what="stream committed")
        assert evict("chatcmpl-e-stream")["evicted_request_ids"] == ["e-stream"]
        release(loop, "e-stream")
        worker.join(10)
        # after
        send("e-after")
        assert evict("e-after")["evicted_request_ids"] == ["e-after"]
        # duplicated, within one report and across reports
        send("e-dup")
        first = evict("e-dup", "cmpl-e-dup", "e-dup")
        assert first["evicted_request_ids"] == ["e-dup"]
        assert evict("e-dup")["not_found"] == ["e-dup"]
        # out of order, mixed with unknown ids and health checks
        for rid in ("e-o1", "e-o2", "e-o3"):
            send(rid)
        evict("e-o3", "HEALTH_CHECK_1", "e-o1")
        evict("never-sent", "e-o2")
        # reported before, committed, reported again after
        evict("e-twice")
        send("e-twice")
        evict("e-twice")
        send("e-kept")
        assert not worker.is_alive()
        assert set(_listed(base)) == {"e-before", "e-during", "e-kept"}


def _listed(base: str) -> list[str]:
    ids: list[str] = httpx.get(f"{base}/requests", timeout=5).json()["request_ids"]
    return ids


# --------------------------------------------------------------------------------------- state under traffic


def test_reset_during_traffic() -> None:
    gateway_port = free_port()
    sim_with_evictions = create_sim_app(
        SimConfig(prefill_us_per_token=0, capacity_tokens=4000, evict_url=f"http://127.0.0.1:{gateway_port}/evict")
    )
    failures: list[str] = []
    with serve_in_thread(sim_with_evictions) as engine, gateway_for(engine, port=gateway_port) as (base, _):

        def traffic(worker: int) -> None:
            with httpx.Client(timeout=30) as client:
                for i in range(25):
                    body = {
                        **RAG_CHAT,
                        "messages": [*RAG_CHAT["messages"], {"role": "user", "content": f"q {worker} {i}"}],
                    }
                    try:
                        if i % 2:
                            with client.stream(
                                "POST", f"{base}/v1/chat/completions", json={**body, "stream": True}
                            ) as r:
                                raw = r.read()
                                if r.status_code != 200 or not raw.endswith(b"data: [DONE]\n\n") or b'"error"' in raw:
                                    failures.append(f"stream {r.status_code} {raw[-200:]!r}")
                        else:
                            r = client.post(f"{base}/v1/chat/completions", json=body)
                            if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                                failures.append(f"json {r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        workers = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
        for thread in workers:
            thread.start()
        resets = 0
        while any(thread.is_alive() for thread in workers):
            assert httpx.post(f"{base}/reset", timeout=10).status_code == 200
            resets += 1
            time.sleep(0.02)
        for thread in workers:
            thread.join(30)
        assert failures == []
        assert resets > 1
        stats = httpx.get(f"{base}/stats", timeout=5).json()["index_stats"]
        assert stats["num_requests"] <= 100


def test_gateway_restarting_while_an_eviction_sender_keeps_sending() -> None:
    sim = create_sim_app(SimConfig(prefill_us_per_token=0))
    gateway_port = free_port()
    reporter = EvictionReporter(f"http://127.0.0.1:{gateway_port}", timeout_s=1.0, backoff_s=(0.02, 0.3))
    slowest = 0.0

    def report(*ids: str) -> None:
        nonlocal slowest
        started = time.perf_counter()
        assert reporter.report(ids) == len(ids)
        slowest = max(slowest, time.perf_counter() - started)

    try:
        with serve_in_thread(sim) as engine:
            with gateway_for(engine, port=gateway_port) as (base, _):
                for rid in ("r-1", "r-2"):
                    assert post_json(base, RAG_CHAT, **{"x-request-id": rid}).status_code == 200
                report("r-1")
                wait_for(lambda: _listed(base) == ["r-2"], what="r-1 evicted")
            # the gateway is down: reports queue, the sender retries with backoff, callers never wait
            failed_before = reporter.stats["failed_posts"]
            for i in range(200):
                report(f"down-{i}")
                if i % 20 == 0:
                    time.sleep(0.02)
            wait_for(lambda: reporter.stats["failed_posts"] > failed_before, what="failed posts while down")
            with gateway_for(engine, port=gateway_port) as (base, app):
                assert reporter.flush(timeout=20)
                assert reporter.stats["sent"] >= 201
                assert app.state.residency.evict_calls >= 1  # the queued reports reached the new gateway
                assert post_json(base, RAG_CHAT, **{"x-request-id": "r-3"}).status_code == 200
                assert _listed(base) == ["r-3"]
                report("r-3")
                wait_for(lambda: _listed(base) == [], what="r-3 evicted after the restart")
    finally:
        reporter.close(timeout=2)
    assert reporter.stats["dropped"] == 0
    assert slowest < 0.5  # report() only appends to a queue; generous for a loaded 2-core machine


# ------------------------------------------------------------------------------------ hostile request lines


def _raw_exchange(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head.lower())
                if length and len(rest) >= int(length.group(1)):
                    break
        return b"".join(chunks)


def test_hostile_request_lines_never_reach_elsewhere() -> None:
    sim = create_sim_app(SimConfig(prefill_us_per_token=0))
    with serve_in_thread(sim) as engine, gateway_for(engine) as (base, _):
        httpx.post(f"{engine}/sim/reset")
        absolute = _raw_exchange(base, b"GET http://evil.example/v1/models HTTP/1.1\r\nhost: evil.example\r\n\r\n")
        status = int(absolute.split(b" ", 2)[1])
        if status == 200:  # the server kept only the path: the configured engine answered, not evil.example
            assert b'"id":"sim"' in absolute
        else:
            assert status in (400, 404)
        dots = _raw_exchange(base, b"GET /v1/../../admin HTTP/1.1\r\nhost: x\r\n\r\n")
        assert int(dots.split(b" ", 2)[1]) in (400, 404)
        encoded = _raw_exchange(base, b"GET /v1/%2e%2e/%2e%2e/admin HTTP/1.1\r\nhost: x\r\n\r\n")
        assert int(encoded.split(b" ", 2)[1]) in (400, 404)
        injected = _raw_exchange(
            base, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-note: a\rx-injected: 1\r\nconnection: close\r\n\r\n"
        )
        assert not injected or int(injected.split(b" ", 2)[1]) == 400
        seen = httpx.get(f"{engine}/sim/requests").json()
        assert all(record["path"] == "/v1/models" for record in seen)
        assert all("x-injected" not in record["headers"] for record in seen)
