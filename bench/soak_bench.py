"""Soak: tens of thousands of mixed requests through the gateway to the simulated engine, every answer checked.

Three loopback processes: the gateway (``python -m gateway.cli serve``), the simulated engine behind it with a
small KV capacity and eviction callbacks to the gateway's ``/evict`` (so evictions keep happening), and a second,
independent simulated engine used as the *oracle*. Requests mix chat and completions, streaming and not, with and
without retrieved blocks (``--concurrency``). Each goes through the gateway and, the same bytes, to the oracle.

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

Hostile traffic rides along (``--quick`` scales it down): a share of requests are abandoned by their client mid-way
(``--disconnect-rate``), a share carry hostile prompts (``--hostile-rate``: many numbering styles, many distinct
separator lines, article and year labels, tags that do not pair, ``index`` quoted inside attributes, one giant
line), which must still be answered exactly as the oracle answers them; ``--slowloris`` connections dribble
request headers one byte at a time for the whole run (the gateway must cut them off), and ``--header-floods``
requests carry 100 KB of headers (431 expected). Reported: requests, lost (no answer at all, not counting the
deliberate disconnects), non-2xx by status, the gateway's longest event-loop stall (its own
``prefixgate_event_loop_busy_max_seconds``: CPU time between two 10 ms ticks, so that a machine shared with other
work does not count; the wall-clock lateness and the longest full garbage collection,
``prefixgate_gc_pause_max_seconds``, are printed too) and RSS after warm-up and at the end.

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
from bench.soak_hostile import Hostile, Mix, flood, hold_slowloris, report_hostile
from bench.soak_workload import build_request, parse_answer

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Totals:
    """Per-kind counters."""

    requests: int = 0
    errors: int = 0
    corrupted: int = 0
    reordered: int = 0
    detection_mismatches: int = 0
    latencies: list[float] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # the first few: request number and result header


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


async def _send(client: httpx.AsyncClient, url: str, body: bytes, stream: bool) -> tuple[int, bytes, dict[str, str]]:
    headers = {"content-type": "application/json"}
    if stream:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            return response.status_code, await response.aread(), dict(response.headers)
    response = await client.post(url, content=body, headers=headers)
    return response.status_code, response.content, dict(response.headers)


async def _abandon(client: httpx.AsyncClient, gateway: str, i: int, hostile: Hostile) -> None:
    """Send a request and go away before the answer is complete."""
    _, route, body, _ = build_request(i)
    body["stream"] = True
    try:
        async with asyncio.timeout(random.Random(i).uniform(0.001, 0.05)):
            async with client.stream("POST", gateway + route, json=body) as response:
                async for _ in response.aiter_raw():
                    await asyncio.sleep(0.01)
    except (TimeoutError, httpx.HTTPError):
        pass
    hostile.disconnects += 1


async def _run_one(
    client: httpx.AsyncClient,
    gateway: str,
    oracle: str,
    i: int,
    totals: dict[str, Totals],
    problems: list[str],
    mix: Mix,
    hostile: Hostile,
) -> None:
    what = mix.of(i)
    if what == "disconnect":
        await _abandon(client, gateway, i, hostile)
        return
    kind, route, body, blocks = build_request(i, hostile=what == "hostile")
    chat, stream = route.endswith("chat/completions"), bool(body.get("stream"))
    encoded = json.dumps(body).encode()
    row = totals[kind]
    row.requests += 1
    started = time.perf_counter()
    try:
        status, raw, headers = await _send(client, gateway + route, encoded, stream)
    except httpx.HTTPError as exc:
        row.errors += 1
        hostile.lost += 1
        problems.append(f"#{i} {kind}: {exc!r}")
        return
    if not 200 <= status < 300:
        hostile.statuses[status] += 1
    row.latencies.append(time.perf_counter() - started)
    got = parse_answer(chat, stream, status, raw)
    if isinstance(got, str):
        row.errors += 1
        problems.append(f"#{i} {kind}: {got}")
        return
    result = json.loads(headers.get("x-prefixgate-result", "{}"))
    row.reordered += bool(result.get("reordered"))
    if blocks >= 0 and result.get("blocks", 0) != blocks:
        row.detection_mismatches += 1
        if len(row.mismatched) < 3:
            row.mismatched.append(f"#{i} {kind}: {blocks} blocks sent, result {json.dumps(result, sort_keys=True)}")
    try:
        o_status, o_raw, _ = await _send(client, oracle + route, encoded, stream)
    except httpx.TransportError:  # the oracle is not under test: one retry on a fresh connection
        o_status, o_raw, _ = await _send(client, oracle + route, encoded, stream)
    expected = parse_answer(chat, stream, o_status, o_raw)
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
    gateway: str,
    oracle: str,
    indices: range,
    concurrency: int,
    pid: int,
    watch: Watch,
    setup: tuple[Mix, Hostile, int, int],
) -> tuple[dict[str, Totals], list[str], float]:
    mix, hostile, slowloris, floods = setup
    totals: dict[str, Totals] = defaultdict(Totals)
    problems: list[str] = []
    next_index = iter(indices)
    port = int(gateway.rsplit(":", 1)[1])
    # idle connections are dropped before the servers' 5 s keep-alive timeout, never raced against it
    limits = httpx.Limits(
        max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency, keepalive_expiry=2.0
    )
    stop = asyncio.Event()
    flood_every = max(len(indices) // floods, 1) if floods else 0
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            for i in next_index:
                if flood_every and i % flood_every == 0:
                    await flood(port, hostile)
                await _run_one(client, gateway, oracle, i, totals, problems, mix, hostile)

        sampler = asyncio.create_task(_sample(gateway, pid, watch, stop))
        slow = [asyncio.create_task(hold_slowloris(port, hostile, stop)) for _ in range(slowloris)]
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(sampler, *slow)
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
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.05, help="share of requests abandoned mid-way")
    parser.add_argument("--hostile-rate", type=float, default=0.05, help="share of requests with hostile prompts")
    parser.add_argument("--slowloris", type=int, default=100, help="connections dribbling headers all along")
    parser.add_argument("--header-floods", type=int, default=100, help="requests with 100 KB of headers")
    parser.add_argument("--warmup", type=int, default=1_000, help="requests before the RSS baseline")
    parser.add_argument("--capacity-tokens", type=int, default=40_000, help="KV capacity of the engine behind")
    parser.add_argument("--index-max-requests", type=int, default=1_000, help="the gateway's live index cap")
    parser.add_argument("--quick", action="store_true", help="2,000 requests, 20 slowloris connections")
    args = parser.parse_args(argv)
    count = 2_000 if args.quick else args.requests
    if args.quick:
        args.slowloris, args.header_floods, args.warmup = min(args.slowloris, 20), min(args.header_floods, 20), 300
    args.warmup = min(args.warmup, count // 2)

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
        watch = Watch()
        hostile = Hostile()
        setup = (Mix(args.disconnect_rate, args.hostile_rate), hostile, args.slowloris, args.header_floods)
        asyncio.run(_load(gateway_url, oracle_url, range(args.warmup), args.concurrency, gateway.pid, Watch(), setup))
        rss_start = _proc_kib(gateway.pid, "VmRSS")
        totals, problems, elapsed = asyncio.run(
            _load(gateway_url, oracle_url, range(args.warmup, count), args.concurrency, gateway.pid, watch, setup)
        )
        time.sleep(0.5)  # let the last eviction callbacks land
        rss_end = _proc_kib(gateway.pid, "VmRSS")
        hwm = _proc_kib(gateway.pid, "VmHWM")
        stats = httpx.get(f"{gateway_url}/stats", timeout=10).json()["index_stats"]
        exported = httpx.get(f"{gateway_url}/metrics", timeout=10).text
        in_flight = _metric(exported, "prefixgate_in_flight_requests")
        stall = (
            _metric(exported, "prefixgate_event_loop_stall_max_seconds"),
            _metric(exported, "prefixgate_event_loop_busy_max_seconds"),
            _metric(exported, r'prefixgate_gc_pause_max_seconds\{generation="2"\}'),
        )
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
    failed = _report(
        args,
        count - args.warmup,
        totals,
        problems,
        elapsed,
        watch,
        (rss_start, hwm, rss_end),
        stats,
        in_flight,
        sim_stats,
    )
    return report_hostile(args, count, hostile, stall, rss_start, rss_end) or failed


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
    for row in totals.values():
        for note in row.mismatched:
            print(f"  detect≠sent {note}")
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
