"""Several engine replicas: round-robin, least-loaded, cache-aware routing alone, and joint routing + reordering.

Four simulated engine processes with small KV caches serve a seeded RAG workload (documents in the system
message, retrieval order) at concurrency 16. The three baselines route on the client side and send the requests
unchanged, as plain load balancers and the peers' cache-aware routers do:

- ``round-robin``;
- ``least-loaded``: fewest requests in flight;
- ``cache-aware``: the peers' approximate prefix tree (chained hashes of 128-character chunks of the prompt per
  replica, LRU-bounded by the replica's cache size, as vLLM production-stack's ``prefixaware``), with SGLang's
  policy: balance guard, else the best match above a 30% match rate, else the replica with the smallest tree;

then ``joint``: one prefixgate with the four ``--upstream``s (evictions reported back per replica), and
``joint-2gw``: two prefixgates sharing one view through a real Redis server (``--state``), the client
alternating between them, every engine reporting its evictions to the first one only.

Reports the engine-reported cached-token ratio, the simulated prefill time, requests per replica (max/min), p99
latency, each gateway's CPU use over the run and how long its event loop was ready to run but waited for a free
CPU (with the machine's load average), the replication lag under that load and one request at a time, and the
routing cost in process: what planning a request with 4 replicas takes over planning it with 1 (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from pathlib import Path
from typing import Any

import httpx

from bench.intercept_bench import render
from bench.proxy_bench import _free_port, _wait
from bench.workload import generate

__all__ = ["main"]

REPLICAS = 4
CONCURRENCY = 16
CHUNK = 128
GUARD_ABS, GUARD_REL, CACHE_THRESHOLD = 4, 1.5, 0.3


class _Tree:
    """One replica's approximate prefix tree: chained chunk hashes, least recently used dropped first."""

    def __init__(self, capacity_chars: int) -> None:
        self.chunks: OrderedDict[bytes, None] = OrderedDict()
        self.limit = max(1, capacity_chars // CHUNK)

    @staticmethod
    def hashes(text: str) -> list[bytes]:
        out, previous = [], b""
        for start in range(0, len(text) - CHUNK + 1, CHUNK):
            previous = blake2b(previous + text[start : start + CHUNK].encode(), digest_size=8).digest()
            out.append(previous)
        return out

    def match(self, hashes: list[bytes]) -> int:
        matched = 0
        for digest in hashes:
            if digest not in self.chunks:
                break
            matched += 1
        return matched

    def insert(self, hashes: list[bytes]) -> None:
        for digest in hashes:
            self.chunks[digest] = None
            self.chunks.move_to_end(digest)
        while len(self.chunks) > self.limit:
            self.chunks.popitem(last=False)


class _Client:
    """Client-side routing for the baselines."""

    def __init__(self, policy: str, capacity_tokens: int) -> None:
        self.policy = policy
        self.in_flight = [0] * REPLICAS
        self.next = 0
        self.trees = [_Tree(capacity_tokens * 6) for _ in range(REPLICAS)]  # ~6 characters per "w<id> " token

    def choose(self, body: dict[str, Any]) -> tuple[int, list[bytes]]:
        if self.policy == "round-robin":
            self.next += 1
            return self.next % REPLICAS, []
        least = min(range(REPLICAS), key=lambda r: (self.in_flight[r], r))
        if self.policy == "least-loaded":
            return least, []
        hashes = _Tree.hashes("".join(m["content"] for m in body["messages"]))
        high, low = max(self.in_flight), min(self.in_flight)
        if high - low > GUARD_ABS and high > GUARD_REL * low:
            return least, hashes
        matches = [tree.match(hashes) for tree in self.trees]
        best = max(range(REPLICAS), key=lambda r: (matches[r], -self.in_flight[r]))
        if hashes and matches[best] / len(hashes) > CACHE_THRESHOLD:
            return best, hashes
        return min(range(REPLICAS), key=lambda r: (len(self.trees[r].chunks), self.in_flight[r])), hashes


async def _run(targets: list[str], bodies: list[dict[str, Any]], client_policy: str | None, capacity: int) -> dict:
    """Send every body at concurrency 16; a client policy picks the engine, else the targets are gateways."""
    router = _Client(client_policy, capacity) if client_policy else None
    queue: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    prompt = cached = 0
    prefill_ms = 0.0
    latencies: list[float] = []
    per_replica: dict[str, int] = {}
    retries = [0]

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal prompt, cached, prefill_ms
        while not queue.empty():
            i, body = queue.get_nowait()
            hashes: list[bytes] = []
            if router is not None:
                replica, hashes = router.choose(body)
                router.in_flight[replica] += 1
                base = targets[replica]
            else:
                replica, base = -1, targets[i % len(targets)]
            started = time.perf_counter()
            try:
                response = await http.post(f"{base}/v1/chat/completions", json=body)
                lost = response.status_code == 502 and b"upstream_connection_lost" in response.content
            except (httpx.ReadError, httpx.RemoteProtocolError):
                lost = True
            if lost:
                # a keep-alive connection the engine closed as it was reused (rare, under load; between the client
                # and an engine, or between a gateway and an engine): sent again, and counted
                retries[0] += 1
                response = await http.post(f"{base}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            if router is not None:
                router.in_flight[replica] -= 1
                if hashes:
                    router.trees[replica].insert(hashes)
                name = f"r{replica}"
            else:
                name = json.loads(response.headers["x-prefixgate-result"]).get("replica", "r0")
            payload = response.json()
            prompt += payload["usage"]["prompt_tokens"]
            cached += payload["usage"]["prompt_tokens_details"]["cached_tokens"]
            prefill_ms += payload["timings"]["prompt_ms"]
            per_replica[name] = per_replica.get(name, 0) + 1

    # idle connections are dropped before the servers drop them (uvicorn: 5 s), so none is reused as it closes
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    counts = [per_replica.get(f"r{r}", 0) for r in range(REPLICAS)]
    return {
        "ratio": cached / prompt,
        "prefill_s": prefill_ms / 1000,
        "counts": counts,
        "p99": _pct(latencies, 0.99),
        "wall": time.perf_counter() - started,
        "retries": retries[0],
    }


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def _engines(capacity: int, prefill_us: float, evict: list[str | None]) -> tuple[list[str], list[subprocess.Popen]]:
    ports = [_free_port() for _ in range(REPLICAS)]
    processes = []
    for port, url in zip(ports, evict, strict=True):
        command = [sys.executable, "-m", "engines.sim", "--port", str(port), "--capacity-tokens", str(capacity)]
        command += ["--prefill-us", str(prefill_us), "--log-level", "error"]
        if url:
            command += ["--evict-url", url]
        processes.append(_spawn(command))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for url, process in zip(urls, processes, strict=True):
        _wait(url + "/health", process)
    return urls, processes


def _gateway(port: int, upstreams: list[str], state: str | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--log-level", "warning"]
    for url in upstreams:
        command += ["--upstream", url]
    if state:
        command += ["--state", state]
    return _spawn(command)


def _mode(name: str, bodies: list[dict[str, Any]], capacity: int, prefill_us: float, redis_bin: str | None) -> dict:
    gateways = {"joint": 1, "joint-2gw": 2}.get(name, 0)
    ports = [_free_port() for _ in range(gateways)]
    evict = [f"http://127.0.0.1:{ports[0]}/evict?replica=r{r}" if gateways else None for r in range(REPLICAS)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        urls, engines = _engines(capacity, prefill_us, evict)
        processes += engines
        if not gateways:
            return asyncio.run(_run(urls, bodies, name, capacity))
        state = None
        if gateways > 1:
            redis_port = _free_port()
            processes.append(_spawn([redis_bin or "redis-server", "--port", str(redis_port), "--save", ""]))
            state = f"redis://127.0.0.1:{redis_port}/0"
            time.sleep(0.3)
        for port in ports:
            processes.append(_gateway(port, urls, state))
        targets = [f"http://127.0.0.1:{port}" for port in ports]
        for target, process in zip(targets, processes[-gateways:], strict=True):
            _wait(target + "/health", process)
        cpu = [_cpu_seconds(process.pid) for process in processes[-gateways:]]
        waited = [_runqueue_seconds(process.pid) for process in processes[-gateways:]]
        load = os.getloadavg()[0]
        result = asyncio.run(_run(targets, bodies, None, capacity))
        used = [_cpu_seconds(p.pid) - c for p, c in zip(processes[-gateways:], cpu, strict=True)]
        result["busy"] = [u / result["wall"] for u in used]  # a gateway's CPU time over the run's wall time
        waits = [_runqueue_seconds(p.pid) - w for p, w in zip(processes[-gateways:], waited, strict=True)]
        result["waiting"] = [w / result["wall"] for w in waits]  # its event loop ready to run, but no CPU free
        result["load"] = (load, os.getloadavg()[0])
        if gateways > 1:
            time.sleep(0.5)
            result["lag"] = [_lag(httpx.get(f"{t}/metrics").text) for t in targets]
            result["idle_lag"] = _idle_lag(targets, bodies[:50])
        return result
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runqueue_seconds(pid: int) -> float:
    """Seconds a process's main thread (the gateway's event loop) was ready to run but waited for a CPU (Linux
    ``/proc/<pid>/schedstat``; 0 elsewhere)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _buckets(metrics: str) -> list[tuple[float, float]]:
    out = []
    for line in metrics.splitlines():
        if line.startswith("prefixgate_state_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            out.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    return out


def _idle_lag(targets: list[str], bodies: list[dict[str, Any]]) -> tuple[int, float, float]:
    """The same lag for requests sent one at a time to the first gateway (the machine otherwise idle)."""
    before = _buckets(httpx.get(f"{targets[1]}/metrics").text)
    for body in bodies:
        httpx.post(f"{targets[0]}/v1/chat/completions", json=body, timeout=60).raise_for_status()
    time.sleep(0.5)
    after = _buckets(httpx.get(f"{targets[1]}/metrics").text)
    return _lag_of([(b, c - c0) for (b, c), (_, c0) in zip(after, before, strict=True)])


def _lag(metrics: str) -> tuple[int, float, float]:
    """(changes applied, p50 and p99 upper bucket bounds in ms) of ``prefixgate_state_lag_seconds``."""
    return _lag_of(_buckets(metrics))


def _lag_of(buckets: list[tuple[float, float]]) -> tuple[int, float, float]:
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return 0, 0.0, 0.0
    p50 = next(b for b, c in buckets if c >= 0.5 * total)
    p99 = next(b for b, c in buckets if c >= 0.99 * total)
    return int(total), p50 * 1000, p99 * 1000


def _routing_cost(bodies: list[dict[str, Any]]) -> dict[str, float]:
    """What routing adds to planning, in process: each request planned by a 4-replica gateway and by a 1-upstream
    gateway in turn (which goes first alternates), the difference taken per request; the first quarter warms up.

    Requests are accepted and finished at once, so the replicas are ranked on their caches (no load). Timed in
    CPU time of the planning thread: on a shared machine, wall time also counts the other processes' turns."""
    from gateway.app import create_app
    from gateway.settings import load_settings
    from gateway.wire.chat import CHAT_ROUTE, decode_request

    routers = [
        create_app(
            load_settings(environ={}, upstream=[f"http://10.0.0.{r + 1}:8000" for r in range(count)])
        ).state.proxy.planner
        for count in (REPLICAS, 1)
    ]
    raws = [json.dumps(body).encode() for body in bodies]
    times: list[list[float]] = [[], []]
    for i, raw in enumerate(raws):
        for which in (0, 1) if i % 2 else (1, 0):
            body = decode_request(raw, CHAT_ROUTE)
            started = time.thread_time()
            planned = routers[which].plan(routers[which].read(body, {}), f"req-{i}")
            times[which].append(time.thread_time() - started)
            planned.accept()
            planned.finish()
    warm = len(raws) // 4
    four, one = times[0][warm:], times[1][warm:]
    added = [a - b for a, b in zip(four, one, strict=True)]
    return {
        "four": statistics.median(four) * 1000,
        "one": statistics.median(one) * 1000,
        "p50": statistics.median(added) * 1000,
        "p99": _pct(added, 0.99) * 1000,
        "n": len(added),
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


MODES = ("round-robin", "least-loaded", "cache-aware", "joint", "joint-2gw")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench replicas", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="300 requests per mode")
    parser.add_argument("--queries", type=int, default=1200)
    parser.add_argument("--preset", default="overlap")
    parser.add_argument("--capacity", type=int, default=49_152, help="KV capacity of each replica in tokens")
    parser.add_argument("--prefill-us", type=float, default=10.0, help="simulated prefill µs per uncached token")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    args, _ = parser.parse_known_args(argv)
    queries = 300 if args.quick else args.queries
    workload = generate(args.preset, seed=0, n_queries=queries)
    bodies = [render(workload, query, "system") for query in workload.queries]
    redis_bin = shutil.which("redis-server")
    rows = []
    for name in args.modes.split(","):
        if name == "joint-2gw" and redis_bin is None:
            print("  (no redis-server: `make redis-server`; two-gateway mode skipped)", file=sys.stderr)
            continue
        rows.append((name, _mode(name, bodies, args.capacity, args.prefill_us, redis_bin)))
    print(f"\n{REPLICAS} simulated replicas ({args.capacity // 1024}k-token KV each, {args.prefill_us:g} µs/token "
          f"prefill), {args.preset} RAG workload, {queries} requests, concurrency {CONCURRENCY}")  # fmt: skip
    header = f"{'routing':<20}{'cached ratio':>13}{'prefill':>10}{'per replica':>22}{'max/min':>9}{'p99':>9}{'wall':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        counts = r["counts"]
        spread = max(counts) / max(1, min(counts))
        print(f"{name:<20}{r['ratio']:>12.1%}{r['prefill_s']:>9.2f}s{'/'.join(map(str, counts)):>22}"
              f"{spread:>9.2f}{r['p99'] * 1000:>7.0f}ms{r['wall']:>7.1f}s"
              + (f"  ({r['retries']} resent after a connection reset)" if r["retries"] else ""))  # fmt: skip
    ratios = {name: r["ratio"] for name, r in rows}
    if "joint" in ratios:
        for base in ("cache-aware", "round-robin"):
            if ratios.get(base):
                print(f"joint / {base}: {ratios['joint'] / ratios[base]:.2f}x cached-token ratio")
        if "joint-2gw" in ratios:
            print(f"2 gateways / 1 gateway: {ratios['joint-2gw'] / ratios['joint']:.1%} of the ratio")
    for name, r in rows:
        if "busy" in r:
            busy = ", ".join(f"{b:.0%}" for b in r["busy"])
            waiting = ", ".join(f"{w:.0%}" for w in r["waiting"])
            print(f"{name}: gateway CPU {busy} of one core over the run, event loop waiting for a free CPU {waiting} "
                  f"of it; load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after "
                  f"({os.cpu_count()} cores)")  # fmt: skip
        for i, (applied, p50, p99) in enumerate(r.get("lag", [])):
            print(f"replication lag, gateway {i + 1}: {applied} changes applied, p50 <= {p50:g} ms, p99 <= {p99:g} ms")
        if "idle_lag" in r:
            applied, p50, p99 = r["idle_lag"]
            print(f"replication lag, one request at a time: {applied} changes, p50 <= {p50:g} ms, p99 <= {p99:g} ms")
    cost = _routing_cost(bodies[: 300 if args.quick else 1000])
    print(f"routing + planning in process (CPU time), p50: {cost['four']:.3f} ms with {REPLICAS} replicas, "
          f"{cost['one']:.3f} ms with 1; routing adds p50 {cost['p50']:.3f} ms, p99 {cost['p99']:.3f} ms per "
          f"request ({cost['n']:.0f} requests)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
