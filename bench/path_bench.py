"""The request path in-process: the gateway's CPU per request, and the event-loop stall while a big prompt is planned.

Drives the gateway's ASGI app directly (no sockets, an upstream that answers at once), so what is measured is
the gateway's own work per request: reading the body, decoding it, planning, stamping, encoding, relaying.
CPU time (not wall time) is reported, which a busy machine distorts far less than latency.

The stall probe sleeps 1 ms in a loop on the gateway's event loop while ~4 MB RAG prompts go through, and reports
how late it woke: the longest time every other request would have waited. On a machine shared with other work
that wall-clock lateness also counts time the OS gave to other processes (and the worker thread's GIL turns), so
the longest single event-loop step is reported too, in the loop thread's CPU time: the gateway's own stall. The
size table shows the CPU one request costs by body size (where planning starts to matter, and where it moves to a
worker thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import httpx

__all__ = ["main"]

_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "fast",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5000, "completion_tokens": 1, "total_tokens": 5001},
}
_SSE = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'] * 8 + [b"data: [DONE]\n\n"]


_JSON = json.dumps(_ANSWER).encode()


class _Stream(httpx.AsyncByteStream):
    """A body the gateway can stream (``MockTransport`` answers with bodies already read)."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _answer(request: httpx.Request) -> httpx.Response:
    if b'"stream": true' in request.content[-200:]:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(_SSE))
    headers = {"content-type": "application/json", "content-length": str(len(_JSON))}
    return httpx.Response(200, headers=headers, stream=_Stream([_JSON]))


def rag_body(i: int, *, docs: int = 10, doc_chars: int = 1900, stream: bool = False) -> bytes:
    """A chat request whose system message carries ``docs`` retrieved documents (10 x 1.9 KB: ~20 KB)."""
    words = "lorem ipsum dolor sit amet "
    text = "\n".join(
        f'<document id="d{(i * 7 + k) % (docs * 5)}">' + words * (doc_chars // len(words)) + "</document>"
        for k in range(docs)
    )
    body = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": f"Answer from the documents.\n<documents>\n{text}\n</documents>"},
            {"role": "user", "content": f"Question {i}?"},
        ],
        "max_tokens": 8,
        "stream": stream,
    }
    return json.dumps(body).encode()


def _app(reorder: bool) -> Any:
    from gateway.app import create_app
    from gateway.settings import load_settings

    settings = load_settings(environ={}, upstream="http://fast.test", engine="openai", reorder=reorder)
    return create_app(settings, transport=httpx.MockTransport(_answer))


async def _request(app: Any, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    if status != 200:
        raise RuntimeError(f"status {status}")
    return status


async def _cpu_per_request(app: Any, bodies: Sequence[bytes]) -> tuple[float, float]:
    """Median and mean CPU milliseconds per request (the event loop's thread only)."""
    for body in bodies[:20]:
        await _request(app, body)
    costs = []
    for body in bodies:
        start = time.thread_time()
        await _request(app, body)
        costs.append(time.thread_time() - start)
    return statistics.median(costs) * 1000, statistics.fmean(costs) * 1000


@contextmanager
def _longest_step() -> Iterator[list[float]]:
    """Yield a list that ends up holding the longest event-loop callback seen meanwhile (thread CPU seconds).

    Wraps asyncio's ``Handle._run`` (what the default event loop calls for every ready callback and task step):
    a benchmark-only instrument, removed on exit."""
    longest = [0.0]
    original = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        start = time.thread_time()
        original(handle)
        longest[0] = max(longest[0], time.thread_time() - start)

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    try:
        yield longest
    finally:
        asyncio.events.Handle._run = original  # type: ignore[method-assign]


async def _stall(app: Any, bodies: Sequence[bytes]) -> tuple[float, float, float, float]:
    """Send ``bodies`` one after another while a probe sleeps 1 ms in a loop: max and p99 lateness, request ms,
    and the longest event-loop step (ms of the loop thread's CPU)."""
    lateness: list[float] = []
    durations: list[float] = []
    done = anyio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await anyio.sleep(0.001)
            lateness.append(time.perf_counter() - start - 0.001)

    with _longest_step() as longest:
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            await anyio.sleep(0.01)
            for body in bodies:
                start = time.perf_counter()
                await _request(app, body)
                durations.append(time.perf_counter() - start)
            done.set()
    ordered = sorted(lateness)
    worst, p99 = ordered[-1] * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000
    return worst, p99, statistics.median(durations) * 1000, longest[0] * 1000


async def _idle_probe(seconds: float) -> tuple[float, float]:
    """The probe with nothing else running: the machine's own noise floor (max and p99 lateness, ms)."""
    lateness = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await anyio.sleep(0.001)
        lateness.append(time.perf_counter() - start - 0.001)
    ordered = sorted(lateness)
    return ordered[-1] * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.cli import tune_runtime

    parser = argparse.ArgumentParser(prog="bench path", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell")
    args = parser.parse_args(argv)
    count = 300 if args.quick else 2000
    tune_runtime()  # as ``prefixgate serve`` runs: 1 ms GIL switch interval, frozen start-up objects

    async def run() -> None:
        plain, reordering = _app(reorder=False), _app(reorder=True)
        print(f"\nGateway CPU per request, in-process ({count} requests per row, event-loop thread)")
        print(f"{'request':<34}{'body':>9}{'CPU p50':>10}{'CPU mean':>10}")
        rows = [
            ("json, reordering off", plain, [rag_body(i) for i in range(count)]),
            ("stream, reordering off", plain, [rag_body(i, stream=True) for i in range(count)]),
            ("json, 10 blocks reordered", reordering, [rag_body(i) for i in range(count)]),
        ]
        for label, app, bodies in rows:
            p50, mean = await _cpu_per_request(app, bodies)
            print(f"{label:<34}{len(bodies[0]) / 1024:>7.1f}KB{p50:>8.3f}ms{mean:>8.3f}ms")

        print("\nEvent-loop CPU per request by body size (reordering on; ~10 KB blocks): what other requests wait for")
        print(f"{'body':>9}{'CPU p50':>10}")
        for docs, doc_chars in ((1, 9000), (6, 10_000), (25, 10_000), (100, 10_000), (390, 10_000)):
            bodies = [rag_body(i, docs=docs, doc_chars=doc_chars) for i in range(8 if docs >= 100 else 40)]
            p50, _ = await _cpu_per_request(reordering, bodies)
            print(f"{len(bodies[0]) / 1024:>7.0f}KB{p50:>8.2f}ms")

        print("\nEvent-loop stall while ~4 MB prompts are planned (probe: 1 ms sleeps on the same loop)")
        print(f"{'body':>9}{'requests':>10}{'max stall':>11}{'p99 stall':>11}{'request p50':>13}{'longest step':>14}")
        bodies = [rag_body(i, docs=390, doc_chars=10_000) for i in range(4 if args.quick else 12)]
        worst, p99, duration, step = await _stall(reordering, bodies)
        row = f"{len(bodies[0]) / 1024:>7.0f}KB{len(bodies):>10}{worst:>9.2f}ms{p99:>9.2f}ms{duration:>11.1f}ms"
        print(f"{row}{step:>9.2f}ms CPU")
        worst, p99 = await _idle_probe(len(bodies) * duration / 1000)
        print(f"{'idle':>9}{0:>10}{worst:>9.2f}ms{p99:>9.2f}ms{'':>13}  (no requests: the machine's noise floor)")

    anyio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
