"""Scheduler benchmark: prefix-cache hit ratio of each ordering policy, and planning speed and memory.

``python -m bench scheduler [--quick] [--seed=N] [--no-timing] [--no-ablation]``

1. Hit ratio (cached prompt tokens / prompt tokens) and prefill tokens on the simulated paged radix cache
   (``bench.cachesim``) for each workload preset (``bench.workload``) and capacity (infinite, 256k, 64k tokens):
   - original: documents in retrieval order, queries in arrival order;
   - batch: ``plan_batch`` over the whole workload, run in the planned order (the ``/reorder`` use);
   - online: one request at a time through ``LiveIndex`` (plan, commit, then the simulator's evictions are fed
     back to ``evict``), in arrival order (the proxy use);
   (ContextPilot 0.5.0 itself runs in ``python -m bench compare``.)
2. Ablations on the 256k cache: the canonical-order popularity modes of the online plan, and the batch plan
   with and without its local search (and batch intra-context ordering alone, kept in arrival order).
3. Timing, each in a fresh subprocess: batch plan wall time and peak RSS growth for 2,000 / 10,000 / 100,000
   contexts; online plan and commit p50/p99 with 100,000 live requests, and the index's memory (tracemalloc);
   100,000 commits each under a new prefix key into an index never evicted from (throughput, first vs last).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence

from bench.cachesim import PrefixCacheSim
from bench.workload import PRESETS, Query, Workload, generate
from scheduler import LiveIndex, block_id, plan_batch
from scheduler.batch import REFINE_PASSES

CAPACITIES: list[tuple[str, float]] = [("inf", math.inf), ("256k", 256_000), ("64k", 64_000)]
KEY = ("sim", "model", 0)


def segments(workload: Workload, query: Query, doc_order: Sequence[int]) -> list[tuple[object, int]]:
    lengths = workload.docs.lengths
    return [(doc, lengths[doc]) for doc in doc_order] + [(("q", query.query_id), len(query.question))]


def run_original(workload: Workload, capacity: float) -> PrefixCacheSim:
    sim = PrefixCacheSim(capacity)
    for query in workload.queries:
        sim.serve(f"q{query.query_id}", segments(workload, query, query.doc_ids))
    return sim


def run_batch(
    workload: Workload, capacity: float, refine: int = REFINE_PASSES, arrival: bool = False
) -> PrefixCacheSim:
    queries = workload.queries
    plan = plan_batch([query.doc_ids for query in queries], refine=refine)
    sim = PrefixCacheSim(capacity)
    for index in range(len(queries)) if arrival else plan.order:
        query = queries[index]
        order = [query.doc_ids[j] for j in plan.permutations[index]]
        sim.serve(f"q{query.query_id}", segments(workload, query, order))
    return sim


def run_online(workload: Workload, capacity: float, popularity: str = "count") -> PrefixCacheSim:
    index = LiveIndex(max_requests=None, popularity=popularity)  # type: ignore[arg-type]
    sim = PrefixCacheSim(capacity)
    for query in workload.queries:
        plan = index.plan(KEY, query.doc_ids)
        request_id = f"req-{query.query_id:x}"
        index.commit(KEY, request_id, plan.blocks)
        served = sim.serve(request_id, segments(workload, query, plan.blocks))
        if served.evicted:
            index.evict(served.evicted)
    return sim


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    print(f"\n{title}")
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)), flush=True)


def cell(sim: PrefixCacheSim, baseline: PrefixCacheSim | None = None) -> str:
    text = f"{sim.hit_ratio * 100:5.1f}% {sim.prefill_tokens / 1e6:6.2f}M"
    if baseline is not None and baseline.hit_ratio > 0:
        text += f" x{sim.hit_ratio / baseline.hit_ratio:.1f}"
    return text


def hit_ratio_tables(workloads: dict[str, Workload]) -> None:
    headers = ["preset", "cache", "queries", "original", "prefixgate batch", "prefixgate online"]
    rows = []
    for name, workload in workloads.items():
        for label, capacity in CAPACITIES:
            original = run_original(workload, capacity)
            batch = run_batch(workload, capacity)
            online = run_online(workload, capacity)
            rows.append(
                [
                    name,
                    label,
                    str(len(workload.queries)),
                    cell(original),
                    cell(batch, original),
                    cell(online, original),
                ]
            )
    table("Hit ratio (cached/prompt tokens), prefill tokens, x = hit ratio vs original", headers, rows)
    print("ContextPilot 0.5.0 itself on the same workloads: python -m bench compare")


def ablation_table(workloads: dict[str, Workload]) -> None:
    capacity = 256_000
    headers = ["preset", "online count", "online log2", "online first_seen", "batch", "batch, no local search"]
    headers += ["batch, arrival order"]
    rows = []
    for name, workload in workloads.items():
        row = [name]
        row += [cell(run_online(workload, capacity, mode)) for mode in ("count", "log2", "first_seen")]
        row += [cell(run_batch(workload, capacity)), cell(run_batch(workload, capacity, refine=0))]
        row.append(cell(run_batch(workload, capacity, arrival=True)))
        rows.append(row)
    table("Ablation on a 256k-token cache: online canonical order and batch strategy", headers, rows)


def child_batch(size: int, seed: int) -> dict[str, float]:
    contexts = [list(query.doc_ids) for query in generate("large", seed, n_queries=size).queries]
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    plan = plan_batch(contexts)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    blocks = sum(map(len, contexts))
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak_rss_mb(), "blocks": blocks, "groups": len(plan.groups)}


def peak_rss_mb() -> float:
    """This process's peak RSS. ``ru_maxrss`` survives ``exec`` (it would report the parent's), VmHWM does not."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_online(size: int, seed: int, probes: int = 10_000) -> dict[str, float]:
    queries = generate("large", seed, n_queries=size + probes).queries
    index = LiveIndex(max_requests=None)
    sequences = []
    for query in queries[:size]:
        # fresh 64-bit ids per request, as the gateway gets from hashing block text
        blocks = [block_id(f"doc-{doc}") for doc in query.doc_ids]
        sequences.append(index.plan(KEY, blocks).blocks)
        index.commit(KEY, f"req-{query.query_id:032x}", sequences[-1])
    plan_ns, plan_cpu_ns, commit_ns = [], [], []
    for query in queries[size:]:
        blocks = [block_id(f"doc-{doc}") for doc in query.doc_ids]
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        plan = index.plan(KEY, blocks)
        plan_cpu_ns.append(time.thread_time_ns() - cpu)
        plan_ns.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        index.commit(KEY, f"probe-{query.query_id}", plan.blocks)
        commit_ns.append(time.perf_counter_ns() - start)
        index.evict([f"probe-{query.query_id}"])  # keep the index at `size` live requests
    stats = index.stats()
    del index, queries
    return {
        "memory_mb": index_memory(sequences) / 2**20,
        "plan_p50_us": percentile(plan_ns, 50) / 1000,
        "plan_p99_us": percentile(plan_ns, 99) / 1000,
        "plan_cpu_p99_us": percentile(plan_cpu_ns, 99) / 1000,
        "commit_p50_us": percentile(commit_ns, 50) / 1000,
        "commit_p99_us": percentile(commit_ns, 99) / 1000,
        "nodes": stats.nodes,
        "radix_nodes": stats.radix_nodes,
    }


def child_keys(size: int, seed: int, window: int = 5_000) -> dict[str, float]:
    """``size`` commits, each under a new prefix key (a question before the documents), into an index with the
    gateway's bounds that the engine never evicts from: commits per second over the first and last ``window``."""
    rng = random.Random(seed)
    index = LiveIndex()  # the gateway's defaults: max_keys 1,024, max_requests 200,000
    contexts = [[rng.getrandbits(62) for _ in range(8)] for _ in range(64)]
    rates = []
    for start in (0, size - window):
        if start:
            for number in range(window, start):
                index.commit(("key", number), f"req-{number:032x}", contexts[number % 64])
        begin = time.perf_counter()
        for number in range(start, start + window):
            key = ("key", number)
            index.commit(key, f"req-{number:032x}", index.plan(key, contexts[number % 64]).blocks)
        rates.append(window / (time.perf_counter() - begin))
    stats = index.stats()
    return {"first": rates[0], "last": rates[1], "keys": stats.keys, "requests": stats.requests}


def index_memory(sequences: list[tuple[int, ...]]) -> int:
    """Bytes held by an index of these committed sequences, block ints included (rebuilt under tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    index = LiveIndex(max_requests=None)
    for number, sequence in enumerate(sequences):
        index.commit(KEY, f"req-{number:032x}", [block + 0 for block in sequence])  # own int objects
    gc.collect()
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return memory


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def in_subprocess(kind: str, size: int, seed: int) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.scheduler_bench", f"--child={kind}", f"--size={size}", f"--seed={seed}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def timing_tables(quick: bool, seed: int) -> None:
    sizes = [2_000, 10_000] if quick else [2_000, 10_000, 100_000]
    targets = {2_000: 0.2, 10_000: 1.0, 100_000: 15.0}
    rows = []
    for size in sizes:
        result = in_subprocess("batch", size, seed)
        rows.append(
            [
                f"{size:,}",
                f"{int(result['blocks']):,}",
                f"{result['seconds']:.3f} s",
                f"{result['cpu']:.3f} s",
                f"< {targets[size]} s",
                f"{result['peak_mb']:.0f} MB",
                f"{int(result['groups']):,}",
            ]
        )
    table(
        "Batch plan (plan_batch), fresh process",
        ["contexts", "blocks", "wall", "cpu", "target", "process peak RSS", "groups"],
        rows,
    )
    live = 20_000 if quick else 100_000
    result = in_subprocess("online", live, seed)
    rows = [
        [
            f"{live:,}",
            f"{result['plan_p50_us']:.0f} us",
            f"{result['plan_p99_us']:.0f} us",
            f"{result['plan_cpu_p99_us']:.0f} us",
            f"{result['commit_p50_us']:.0f} us",
            f"{result['commit_p99_us']:.0f} us",
            f"{result['memory_mb']:.0f} MB",
            f"{int(result['nodes']):,} / {int(result['radix_nodes']):,}",
        ]
    ]
    headers = [
        "live requests",
        "plan p50",
        "plan p99",
        "plan p99 (thread cpu)",
        "commit p50",
        "commit p99",
        "index memory",
        "blocks / radix nodes",
    ]
    table("Online plan (targets: p99 < 1 ms, 100,000 live requests < 500 MB)", headers, rows)
    commits = 20_000 if quick else 100_000
    result = in_subprocess("keys", commits, seed)
    rows = [
        [
            f"{commits:,}",
            f"{result['first']:,.0f}/s",
            f"{result['last']:,.0f}/s",
            f"{result['last'] / result['first']:.2f}",
            f"{int(result['keys']):,}",
            f"{int(result['requests']):,}",
        ]
    ]
    headers = ["distinct-prefix commits", "first 5,000", "last 5,000", "last / first", "keys", "live requests"]
    table("Index bounds: one new key per commit, never evicted (target: last / first >= 0.8)", headers, rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scheduler", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads and timing sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--child", choices=["batch", "online", "keys"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = {"batch": child_batch, "online": child_online, "keys": child_keys}[args.child]
        print(json.dumps(run(args.size, args.seed)))
        return
    started = time.perf_counter()
    workloads = {
        name: generate(name, args.seed, n_queries=(preset.n_queries // 4 if args.quick else None))
        for name, preset in PRESETS.items()
    }
    hit_ratio_tables(workloads)
    if not args.no_ablation:
        ablation_table(workloads)
    if not args.no_timing:
        timing_tables(args.quick, args.seed)
    print(f"\n(seed {args.seed}, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
