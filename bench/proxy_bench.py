"""Proxy overhead: the same ~20 KB RAG requests sent directly to a fast upstream and through the gateway.

Reports added latency p50/p99 (concurrency 1 and 16), added time-to-first-byte for streams, throughput,
and the gateway's CPU milliseconds per request (from /proc, so only the gateway process is counted).
The fast upstream is a bare asyncio HTTP/1.1 server with canned answers, so the gateway dominates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import httpx

__all__ = ["main"]

_JSON_ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fast",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5000, "completion_tokens": 1, "total_tokens": 5001},
    }
).encode()
_SSE_CHUNKS = [
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
] * 8 + [b"data: [DONE]\n\n"]


class _FastUpstream(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: reads a request with Content-Length, answers at once."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1").lower()
            length = 0
            for line in head.split("\r\n"):
                if line.startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            self._answer(head, body)

    def _answer(self, head: str, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith("get"):
            payload = b'{"status":"ok"}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(payload), payload)
            )
        elif b'"stream": true' in body or b'"stream":true' in body:
            out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
            for chunk in _SSE_CHUNKS:
                out.append(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            out.append(b"0\r\n\r\n")
            self.transport.write(b"".join(out))
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(_JSON_ANSWER), _JSON_ANSWER)
            )


def _serve_upstream(port: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_FastUpstream, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers 200; fail early if ``process`` (the server behind it) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rag_body(i: int, stream: bool) -> bytes:
    docs = "\n".join(
        f'<document id="d{(i * 7 + k) % 50}">' + ("lorem ipsum dolor sit amet " * 70) + "</document>" for k in range(10)
    )
    return json.dumps(
        {
            "model": "fast",
            "messages": [
                {"role": "system", "content": f"Answer from the documents.\n<documents>\n{docs}\n</documents>"},
                {"role": "user", "content": f"Question {i}?"},
            ],
            "stream": stream,
            "max_tokens": 8,
        }
    ).encode()


async def _one(client: httpx.AsyncClient, url: str, body: bytes, stream: bool) -> tuple[float, float]:
    start = time.perf_counter()
    async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as resp:
        first = 0.0
        async for _ in resp.aiter_raw():
            if not first:
                first = time.perf_counter() - start
        if resp.status_code != 200:
            raise RuntimeError(f"status {resp.status_code}")
    return time.perf_counter() - start, first


async def _load(base: str, count: int, concurrency: int, stream: bool) -> tuple[list[float], list[float], float]:
    bodies = [rag_body(i, stream) for i in range(count)]
    latencies: list[float] = []
    firsts: list[float] = []
    queue = list(range(count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for i in range(min(20, count)):  # warm the connection pools
            await _one(client, f"{base}/v1/chat/completions", bodies[i], stream)

        async def worker() -> None:
            while queue:
                i = queue.pop()
                total, first = await _one(client, f"{base}/v1/chat/completions", bodies[i], stream)
                latencies.append(total)
                firsts.append(first)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, firsts, count / elapsed


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench proxy", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="400 requests per cell")
    parser.add_argument("--no-reorder", action="store_true", help="gateway with --no-reorder")
    args = parser.parse_args(argv)
    count = 400 if args.quick else args.requests

    up_port, gw_port = _free_port(), _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", f"from bench.proxy_bench import _serve_upstream; _serve_upstream({up_port})"]
    )
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--upstream",
        f"http://127.0.0.1:{up_port}",
        "--port",
        str(gw_port),
        "--log-level",
        "warning",
        "--engine",
        "openai",
    ]
    if args.no_reorder:
        command.append("--no-reorder")
    gateway = subprocess.Popen(command)
    try:
        _wait(f"http://127.0.0.1:{up_port}/health")
        _wait(f"http://127.0.0.1:{gw_port}/health")
        rows = []
        for stream in (False, True):
            for concurrency in (1, 16):
                direct = asyncio.run(_load(f"http://127.0.0.1:{up_port}", count, concurrency, stream))
                cpu_before = _cpu_seconds(gateway.pid)
                through = asyncio.run(_load(f"http://127.0.0.1:{gw_port}", count, concurrency, stream))
                cpu_ms = (_cpu_seconds(gateway.pid) - cpu_before) * 1000 / (count + min(20, count))
                rows.append((stream, concurrency, direct, through, cpu_ms))
        _print(rows, count)
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(timeout=10)
    return 0


def _print(
    rows: list[tuple[bool, int, tuple[list[float], list[float], float], tuple[list[float], list[float], float], float]],
    count: int,
) -> None:
    print(f"\nProxy overhead ({count} requests per cell, ~20 KB RAG chat bodies, fast upstream)")
    header = (
        f"{'mode':<10}{'conc':>5}{'direct p50':>12}{'gw p50':>10}{'added p50':>11}{'added p99':>11}"
        f"{'added TTFB p50':>16}{'direct rps':>12}{'gw rps':>9}{'gw CPU/req':>12}"
    )
    print(header)
    print("-" * len(header))
    for stream, concurrency, direct, through, cpu_ms in rows:
        d_lat, d_first, d_rps = direct
        g_lat, g_first, g_rps = through
        added50 = (_pct(g_lat, 0.5) - _pct(d_lat, 0.5)) * 1000
        added99 = (_pct(g_lat, 0.99) - _pct(d_lat, 0.99)) * 1000
        ttfb = (statistics.median(g_first) - statistics.median(d_first)) * 1000
        print(
            f"{'stream' if stream else 'json':<10}{concurrency:>5}{_pct(d_lat, 0.5) * 1000:>10.2f}ms"
            f"{_pct(g_lat, 0.5) * 1000:>8.2f}ms{added50:>9.2f}ms{added99:>9.2f}ms{ttfb:>14.2f}ms"
            f"{d_rps:>12.0f}{g_rps:>9.0f}{cpu_ms:>10.3f}ms"
        )


if __name__ == "__main__":
    raise SystemExit(main())
