"""Proxy overhead side by side: the same ~20 KB RAG requests sent directly to a fast upstream, through prefixgate
(reordering off, and on), through the reference (ContextPilot 0.5.0's own server), and through three floors (what the
stack costs before any gateway logic, ``bench.proxy_floor``), in one run.

The load comes from a lean keep-alive HTTP/1.1 client (``bench.loadgen``): an httpx load generator cost more CPU
per request than the servers it measured, and at concurrency 16 it, not they, set the throughput. Reports added
latency p50/p99 (concurrency 1 and 16), added time-to-first-byte, throughput (also as a share of
direct), and each server's CPU milliseconds per request (from /proc, so only that process is counted). The fast
upstream is a bare asyncio HTTP/1.1 server with canned answers, so the proxies dominate. Targets take turns in
rounds whose order rotates, so load from elsewhere on the machine spreads over all of them. The reference is
measured on non-streaming requests only: its ``/v1/chat/completions`` streams, but this comparison keeps to the
one mode every proxy serves alike. The reference runs from its own venv (``bench.reference_server``).
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
from dataclasses import dataclass, field

import httpx

from bench import loadgen, reference_server

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


@dataclass
class _Target:
    """One server the load goes to: the upstream itself (``direct``), a gateway, or the reference."""

    name: str
    base: str
    process: subprocess.Popen[bytes]
    stream: bool = True  # measured on streaming requests too
    latencies: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    firsts: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    elapsed: dict[tuple[bool, int], float] = field(default_factory=dict)
    cpu: dict[tuple[bool, int], float] = field(default_factory=dict)
    reordered: int = 0

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


async def _one(connection: loadgen.Connection, target: _Target, request: bytes) -> tuple[float, float]:
    total, first, status, head = await connection.post(request)
    if status != 200:
        raise RuntimeError(f"{target.name}: status {status}")
    if b'"reordered":true' in head:
        target.reordered += 1
    return total, first


async def _chunk(
    connections: list[loadgen.Connection], target: _Target, requests: list[bytes], cell: tuple[bool, int]
) -> None:
    """Send ``requests`` to ``target`` with ``cell``'s concurrency; add latencies, wall time and server CPU."""
    queue = list(requests)
    latencies = target.latencies.setdefault(cell, [])
    firsts = target.firsts.setdefault(cell, [])

    async def worker(i: int) -> None:
        while queue:
            request = queue.pop()
            if connections[i].closed:  # idle past the server's keep-alive timeout while other targets ran
                connections[i] = await loadgen.Connection.open("127.0.0.1", target.port)
            try:
                total, first = await _one(connections[i], target, request)
            except ConnectionError:  # closed just as the request went out: once more on a new connection
                connections[i] = await loadgen.Connection.open("127.0.0.1", target.port)
                total, first = await _one(connections[i], target, request)
            latencies.append(total)
            firsts.append(first)

    cpu = _cpu_seconds(target.process.pid)
    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(len(connections))))
    target.elapsed[cell] = target.elapsed.get(cell, 0.0) + time.perf_counter() - start
    target.cpu[cell] = target.cpu.get(cell, 0.0) + _cpu_seconds(target.process.pid) - cpu


async def _cell(targets: list[_Target], count: int, rounds: int, cell: tuple[bool, int]) -> None:
    """One (streaming, concurrency) cell: every target gets the same requests, in rounds whose order rotates,
    so that a burst of load from elsewhere on the machine is shared out rather than landing on one target."""
    stream, concurrency = cell
    requests = [loadgen.request_bytes("/v1/chat/completions", rag_body(i, stream)) for i in range(count)]
    pools: list[list[loadgen.Connection]] = []
    try:
        for target in targets:
            pools.append([await loadgen.Connection.open("127.0.0.1", target.port) for _ in range(concurrency)])
            for connection in pools[-1]:  # warm up
                await _one(connection, target, requests[0])
            target.reordered = 0
        per = count // rounds
        for r in range(rounds):
            order = [*range(r % len(targets), len(targets)), *range(r % len(targets))]
            for t in order:
                await _chunk(pools[t], targets[t], requests[r * per : (r + 1) * per], cell)
    finally:
        for pool in pools:
            for connection in pool:
                connection.close()


def _start(name: str, command: list[str], port: int, *, stream: bool = True, ready: str = "/health") -> _Target:
    process = subprocess.Popen(command)
    target = _Target(name, f"http://127.0.0.1:{port}", process, stream=stream)
    try:
        _wait(f"{target.base}{ready}", process, timeout=120)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench proxy", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per target and cell")
    parser.add_argument("--quick", action="store_true", help="400 requests per target and cell")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per cell, the target order rotating each round")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference (no venv is built)")
    args = parser.parse_args(argv)
    count = 400 if args.quick else args.requests
    reference_python = None if args.no_reference else reference_server.ensure_venv()

    targets: list[_Target] = []
    try:
        port = _free_port()
        serve_upstream = f"from bench.proxy_bench import _serve_upstream; _serve_upstream({port})"
        targets.append(_start("direct", [sys.executable, "-c", serve_upstream], port))
        upstream = targets[0].base
        for name, call in (
            ("relay floor", f"serve_relay({{}}, {targets[0].port})"),
            ("ASGI floor", f"serve_asgi({{}}, {upstream!r})"),
            ("HTTP floor", f"serve_http({{}}, {upstream!r})"),
        ):
            port = _free_port()
            code = "from bench.proxy_floor import serve_asgi, serve_http, serve_relay; " + call.format(port)
            targets.append(_start(name, [sys.executable, "-c", code], port))
        gateway = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--engine", "openai"]
        gateway += ["--log-level", "warning"]
        port = _free_port()
        targets.append(_start("prefixgate", [*gateway, "--port", str(port), "--no-reorder"], port))
        port = _free_port()
        targets.append(_start("prefixgate reorder", [*gateway, "--port", str(port)], port))
        if reference_python is not None:
            port = _free_port()
            command = reference_server.command(reference_python, port, upstream)
            # its /health is 503 until a /reorder call builds an index; "/" answers once it serves
            targets.append(_start("reference", command, port, stream=False, ready="/"))
        for cell in ((False, 1), (False, 16), (True, 1), (True, 16)):
            asyncio.run(_cell([t for t in targets if t.stream or not cell[0]], count, args.rounds, cell))
        _print(targets, count, args.rounds)
    finally:
        for target in reversed(targets):
            target.process.terminate()
            target.process.wait(timeout=10)
    return 0


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _print(targets: list[_Target], count: int, rounds: int) -> None:
    direct = targets[0]
    print(
        f"\nProxy overhead: {count} requests per target and cell in {rounds} alternating rounds, ~20 KB RAG chat "
        "bodies (10 blocks), a bare asyncio upstream; CPU/req is the server process's own CPU"
    )
    header = (
        f"{'target':<20}{'mode':<7}{'conc':>5}{'p50':>9}{'added p50':>11}{'added p99':>11}{'added TTFB':>12}"
        f"{'rps':>7}{'of direct':>11}{'CPU/req':>10}"
    )
    print(header)
    print("-" * len(header))
    for cell in ((False, 1), (False, 16), (True, 1), (True, 16)):
        d_lat, d_first = direct.latencies[cell], direct.firsts[cell]
        d_rps = len(d_lat) / direct.elapsed[cell]
        for target in targets:
            if cell not in target.latencies:
                continue
            lat, first = target.latencies[cell], target.firsts[cell]
            rps = len(lat) / target.elapsed[cell]
            cpu_ms = target.cpu[cell] * 1000 / len(lat)
            if target is direct:
                added = "-"
                added50 = added99 = ttfb = f"{added:>11}"
            else:
                added50 = f"{(_pct(lat, 0.5) - _pct(d_lat, 0.5)) * 1000:>9.2f}ms"
                added99 = f"{(_pct(lat, 0.99) - _pct(d_lat, 0.99)) * 1000:>9.2f}ms"
                ttfb = f"{(statistics.median(first) - statistics.median(d_first)) * 1000:>9.2f}ms"
            print(
                f"{target.name:<20}{'stream' if cell[0] else 'json':<7}{cell[1]:>5}{_pct(lat, 0.5) * 1000:>7.2f}ms"
                f"{added50}{added99} {ttfb}{rps:>7.0f}{rps / d_rps:>10.0%}{cpu_ms:>8.3f}ms"
            )
    reorder = next((t for t in targets if t.name == "prefixgate reorder"), None)
    if reorder is not None:
        print(f"prefixgate reorder: {reorder.reordered} of the measured responses said reordered:true")
    reference = next((t for t in targets if t.name == "reference"), None)
    if reference is not None:
        cell = (False, 16)
        gateway = next(t for t in targets if t.name == "prefixgate")
        ours = len(gateway.latencies[cell]) / gateway.elapsed[cell]
        theirs = len(reference.latencies[cell]) / reference.elapsed[cell]
        print(
            f"json, concurrency 16: prefixgate {ours:.0f} rps = {ours / theirs:.1f}x the reference's {theirs:.0f} rps"
        )


if __name__ == "__main__":
    raise SystemExit(main())
