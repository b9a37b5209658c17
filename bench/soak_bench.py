"""Soak: tens of thousands of mixed requests through the gateway to the simulated engine, every answer checked.

Three loopback processes: the gateway (``python -m gateway.cli serve``), the simulated engine behind it with a
small KV capacity and eviction callbacks to the gateway's ``/evict`` (so evictions keep happening), and a second,
independent simulated engine used as the *oracle*. Requests mix chat and completions, streaming and not, with
and without retrieved blocks, at concurrency 64. Each request is sent through the gateway and, with the same
bytes, straight to the oracle.

Why comparing with the oracle is a sound corruption check: the simulated engine's output is a deterministic
function of (the last 64 prompt tokens, the prompt length, max_tokens), independent of its cache state and of
the request id. Where the gateway did not reorder, the engine saw the client's exact prompt, so text and token
counts must equal the oracle's. Where it did reorder, the workload is built so the function's inputs are
invariant under a block permutation: blocks are separated by newlines (the sim's tokenizer never joins tokens
across whitespace, so a permutation keeps the token count) and every prompt ends with a question of more than
64 tokens outside any block group. Each question carries a unique reference, so a response that was truncated,
altered, duplicated or delivered to the wrong request shows up as a text mismatch. ``prompt_tokens`` equal to
the oracle's additionally shows that no block was lost or duplicated by a reorder. Streams must end with
``[DONE]``, carry no error event, and report usage consistent with the text.

Also watched: the gateway's live index never exceeds its cap (``GET /stats``, sampled), the gateway's resident
memory (``/proc/<pid>/status``: start, sampled peak and ``VmHWM``, end) and ``prefixgate_in_flight_requests``
back at 0. Exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.proxy_bench import _free_port, _wait

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
_WORDS = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu") for b in ("ba", "do", "fi", "gu", "ho", "je")]
TOPICS = 24
DOCS_PER_TOPIC = 10


@dataclass
class Totals:
    """Per-kind counters."""

    requests: int = 0
    errors: int = 0
    corrupted: int = 0
    reordered: int = 0
    detection_mismatches: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Watch:
    """What the samplers saw while the load ran."""

    rss_kib: list[int] = field(default_factory=list)
    index_sizes: list[int] = field(default_factory=list)


def _proc_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _doc(topic: int, k: int) -> str:
    rng = random.Random(topic * 1000 + k)
    return f"Fact {topic}.{k}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(25, 45))) + "."


def _question(i: int) -> str:
    rng = random.Random(-i - 1)
    filler = " ".join(rng.choice(_WORDS) for _ in range(70))
    return f"Using the facts, explain {filler} and cite them (reference {i})."


def build_request(i: int) -> tuple[str, str, dict[str, Any], int]:
    """Request ``i``: (kind label, route, body, number of retrieved blocks)."""
    rng = random.Random(i)
    chat = i % 4 < 2
    stream = i % 2 == 1
    rag = (i // 4) % 4 != 3
    docs: list[str] = []
    if rag:
        topic = rng.randrange(TOPICS)
        picks = rng.sample(range(DOCS_PER_TOPIC), rng.randint(3, 8))
        docs = [_doc(topic, k) for k in picks]
    question = _question(i)
    max_tokens = rng.randint(4, 16)
    body: dict[str, Any] = {"model": "sim", "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        messages = []
        if docs:
            inner = "\n".join(f'<document id="t{i % TOPICS}-{n}">{doc}</document>' for n, doc in enumerate(docs))
            messages.append(
                {"role": "system", "content": f"Answer only from the documents.\n<documents>\n{inner}\n</documents>"}
            )
        messages.append({"role": "user", "content": question})
        body["messages"] = messages
        route = "/v1/chat/completions"
    else:
        context = "\n".join(f"[{n + 1}] {doc}" for n, doc in enumerate(docs))
        body["prompt"] = (f"Sources:\n{context}\n\n" if docs else "") + f"Question: {question}\nAnswer:"
        route = "/v1/completions"
    kind = f"{'chat' if chat else 'completions'} {'stream' if stream else 'json'} {'rag' if rag else 'plain'}"
    return kind, route, body, len(docs)


def _parse(chat: bool, stream: bool, status: int, raw: bytes) -> tuple[str, dict[str, Any]] | str:
    """(text, usage) of a well-formed answer, or a string saying what is wrong with it."""
    if status != 200:
        return f"status {status}: {raw[:200]!r}"
    if not stream:
        payload = json.loads(raw)
        choice = payload["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return text, payload["usage"]
    if not raw.endswith(b"data: [DONE]\n\n"):
        return f"stream does not end with [DONE]: {raw[-200:]!r}"
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    for event in raw.split(b"\n\n")[:-2]:
        if not event.startswith(b"data: "):
            return f"not an SSE data event: {event[:100]!r}"
        payload = json.loads(event[6:])
        if "error" in payload:
            return f"error event: {payload['error']}"
        for choice in payload.get("choices") or []:
            pieces.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
        if payload.get("usage"):
            usage = payload["usage"]
    if usage is None:
        return "stream without usage"
    return "".join(pieces), usage


async def _send(client: httpx.AsyncClient, url: str, body: bytes, stream: bool) -> tuple[int, bytes, dict[str, str]]:
    headers = {"content-type": "application/json"}
    if stream:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            return response.status_code, await response.aread(), dict(response.headers)
    response = await client.post(url, content=body, headers=headers)
    return response.status_code, response.content, dict(response.headers)


async def _run_one(
    client: httpx.AsyncClient, gateway: str, oracle: str, i: int, totals: dict[str, Totals], problems: list[str]
) -> None:
    kind, route, body, blocks = build_request(i)
    chat, stream = route.endswith("chat/completions"), bool(body["stream"])
    encoded = json.dumps(body).encode()
    row = totals[kind]
    row.requests += 1
    started = time.perf_counter()
    try:
        status, raw, headers = await _send(client, gateway + route, encoded, stream)
    except httpx.HTTPError as exc:
        row.errors += 1
        problems.append(f"#{i} {kind}: {exc!r}")
        return
    row.latencies.append(time.perf_counter() - started)
    got = _parse(chat, stream, status, raw)
    if isinstance(got, str):
        row.errors += 1
        problems.append(f"#{i} {kind}: {got}")
        return
    result = json.loads(headers.get("x-prefixgate-result", "{}"))
    row.reordered += bool(result.get("reordered"))
    if result.get("blocks", 0) != blocks:
        row.detection_mismatches += 1
    o_status, o_raw, _ = await _send(client, oracle + route, encoded, stream)
    expected = _parse(chat, stream, o_status, o_raw)
    if isinstance(expected, str):
        raise RuntimeError(f"the oracle failed on #{i}: {expected}")
    text, usage = got
    o_text, o_usage = expected
    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    if text != o_text or any(usage.get(f) != o_usage.get(f) for f in fields) or not text:
        row.corrupted += 1
        problems.append(f"#{i} {kind}: answer differs from the oracle ({text[:60]!r} vs {o_text[:60]!r})")


async def _sample(gateway: str, pid: int, watch: Watch, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            watch.rss_kib.append(_proc_kib(pid, "VmRSS"))
            try:
                stats = (await client.get(f"{gateway}/stats")).json()["index_stats"]
                watch.index_sizes.append(stats["num_requests"])
            except httpx.HTTPError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass


async def _load(
    gateway: str, oracle: str, count: int, concurrency: int, pid: int, watch: Watch
) -> tuple[dict[str, Totals], list[str], float]:
    totals: dict[str, Totals] = defaultdict(Totals)
    problems: list[str] = []
    next_index = iter(range(count))
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)
    stop = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            for i in next_index:
                await _run_one(client, gateway, oracle, i, totals, problems)

        sampler = asyncio.create_task(_sample(gateway, pid, watch, stop))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        stop.set()
        await sampler
    return totals, problems, elapsed


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--capacity-tokens", type=int, default=40_000, help="KV capacity of the engine behind")
    parser.add_argument("--index-max-requests", type=int, default=1_000, help="the gateway's live index cap")
    parser.add_argument("--quick", action="store_true", help="2,000 requests")
    args = parser.parse_args(argv)
    count = 2_000 if args.quick else args.requests

    gw_port, sim_port, oracle_port = _free_port(), _free_port(), _free_port()
    gateway_url, sim_url = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{sim_port}"
    oracle_url = f"http://127.0.0.1:{oracle_port}"
    python = sys.executable
    quiet = ["--log-level", "warning"]
    index_cap = ["--index-max-requests", str(args.index_max_requests)]
    capacity = ["--capacity-tokens", str(args.capacity_tokens)]
    gateway = subprocess.Popen(
        [python, "-m", "gateway.cli", "serve", "--upstream", sim_url, "--port", str(gw_port), *index_cap, *quiet],
        cwd=ROOT,
    )
    sim_args = ["--prefill-us", "0", "--record-requests", "0", *quiet]
    engine = subprocess.Popen(
        [
            python,
            "-m",
            "engines.sim",
            "--port",
            str(sim_port),
            "--evict-url",
            f"{gateway_url}/evict",
            *capacity,
            *sim_args,
        ],
        cwd=ROOT,
    )
    oracle = subprocess.Popen([python, "-m", "engines.sim", "--port", str(oracle_port), *sim_args], cwd=ROOT)
    processes = [gateway, engine, oracle]
    try:
        for url, process in ((gateway_url, gateway), (sim_url, engine), (oracle_url, oracle)):
            _wait(f"{url}/health", process)
        rss_start = _proc_kib(gateway.pid, "VmRSS")
        watch = Watch()
        totals, problems, elapsed = asyncio.run(
            _load(gateway_url, oracle_url, count, args.concurrency, gateway.pid, watch)
        )
        time.sleep(0.5)  # let the last eviction callbacks land
        rss_end = _proc_kib(gateway.pid, "VmRSS")
        hwm = _proc_kib(gateway.pid, "VmHWM")
        stats = httpx.get(f"{gateway_url}/stats", timeout=10).json()["index_stats"]
        in_flight = _metric(httpx.get(f"{gateway_url}/metrics", timeout=10).text, "prefixgate_in_flight_requests")
        sim_stats = httpx.get(f"{sim_url}/sim/stats", timeout=10).json()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    watch.index_sizes.append(stats["num_requests"])
    return _report(
        args, count, totals, problems, elapsed, watch, (rss_start, hwm, rss_end), stats, in_flight, sim_stats
    )


def _report(
    args: argparse.Namespace,
    count: int,
    totals: dict[str, Totals],
    problems: list[str],
    elapsed: float,
    watch: Watch,
    rss: tuple[int, int, int],
    stats: dict[str, Any],
    in_flight: float,
    sim_stats: dict[str, Any],
) -> int:
    print(
        f"\nSoak: {count} requests at concurrency {args.concurrency} through the gateway to the simulated engine "
        f"(KV capacity {args.capacity_tokens} tokens, eviction callbacks on); every answer checked against an oracle"
    )
    header = (
        f"{'kind':<24}{'requests':>9}{'errors':>8}{'corrupted':>11}{'reordered':>11}{'detect≠sent':>13}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    print(header)
    print("-" * len(header))
    everything = Totals()
    for kind in sorted(totals):
        row = totals[kind]
        for name in ("requests", "errors", "corrupted", "reordered", "detection_mismatches"):
            setattr(everything, name, getattr(everything, name) + getattr(row, name))
        everything.latencies += row.latencies
        _row(kind, row)
    print("-" * len(header))
    _row("total", everything)
    rss_start, hwm, rss_end = rss
    peak = max([rss_start, rss_end, *watch.rss_kib])
    cap = args.index_max_requests
    evictions = sim_stats.get("evictions") or {}
    print(f"\nthroughput                {count / elapsed:,.0f} requests/s over {elapsed:.1f} s")
    print(
        f"gateway RSS               start {rss_start / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
        f"(VmHWM {hwm / 1024:.1f} MiB), end {rss_end / 1024:.1f} MiB"
    )
    print(
        f"live index                cap {cap}, largest seen {max(watch.index_sizes)}, final {stats['num_requests']}; "
        f"evictions applied {stats['evictions']}, LRU drops {stats['lru_evictions']}"
    )
    print(f"engine eviction callbacks {json.dumps(evictions, sort_keys=True)}")
    print(f"gateway in flight at end  {in_flight:.0f}")
    kinds = Counter(problem.split(":")[0].split(" ", 1)[1] for problem in problems)
    for problem in problems[:10]:
        print(f"  problem: {problem}")
    if problems:
        print(f"  problems by kind: {dict(kinds)}")
    failed = (
        everything.errors
        or everything.corrupted
        or max(watch.index_sizes) > cap
        or in_flight != 0
        or stats["evictions"] == 0
    )
    print(f"\nresult: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


def _row(kind: str, row: Totals) -> None:
    print(
        f"{kind:<24}{row.requests:>9}{row.errors:>8}{row.corrupted:>11}{row.reordered:>11}"
        f"{row.detection_mismatches:>13}{_pct(row.latencies, 0.5) * 1000:>9.1f}{_pct(row.latencies, 0.99) * 1000:>9.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
