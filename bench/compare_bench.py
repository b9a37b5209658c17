"""prefixgate against ContextPilot 0.5.0 itself, on the same seeded workloads and the same prefix-cache simulator.

``python -m bench compare [--quick] [--seed=N] [--capacity=TOKENS] [--presets=a,b] [--no-reference]
[--reference-batch-max=N] [--bounds] [--batch-search=N]``

For each preset (``bench.workload``: heavy overlap, heavy head, low overlap, 10,000 contexts, multi-turn) and
each mode, the hit ratio (cached / prompt tokens) on the paged LRU radix cache of ``bench.cachesim`` at a
256k-token capacity (``--capacity``):

- **batch**: the whole workload as one ``/reorder`` batch, run in the planned order. prefixgate: ``plan_batch``
  as the index API calls it, with each document's token count (the API estimates it from the text; multi-turn:
  with the conversation constraint, so turn 2 never runs before turn 1; the reference has none).
  Reference: ``ContextPilot.schedule_only`` (its stateless ``/reorder``), skipped above
  ``--reference-batch-max`` contexts (5,000; its O(N^2) clustering takes many minutes on 10,000).
- **batch, search N**: the same with the extra search the gateway's ``--batch-search N`` turns on
  (``Search.shake``; N=20 unless ``--batch-search`` says otherwise, 0 skips the row).
- **online**: one request at a time, in arrival order, each planned against what is live, and every eviction
  the simulator makes is fed back to the index's evict (``/evict``). prefixgate: ``LiveIndex.plan`` (the proxy)
  and ``plan_batch`` with the live snapshot and popularity on one context (a stateful ``/reorder`` call, as the
  index API makes it for text contexts: with each document's token count, like the batch rows); reference:
  ``ContextPilot.build_incremental`` on one context (its stateful ``/reorder``; ContextPilot's server runs
  ``build_and_schedule`` on the first call instead, which ``build_incremental`` does itself on an empty index,
  and its ``/evict`` calls ``remove_requests``, as here).

Every row also shows the unchanged order (documents in retrieval order, arrival order). The reference runs in
its own venv (``bench.reference``); ``--no-reference`` skips it. ``--bounds`` adds a second table: what any order
could reach on each preset (``bench.bounds``: upper bounds online and batch, and an online popularity oracle).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

from bench.bounds import batch_bound, online_bound, popularity_oracle
from bench.cachesim import PrefixCacheSim
from bench.reference import Reference, ReferenceUnavailable
from bench.scheduler_bench import segments, table
from bench.workload import Query, Workload, generate
from scheduler import LiveIndex, plan_batch

__all__ = ["main"]

KEY = ("sim", "model", 0)
PRESETS: dict[str, tuple[str, int]] = {  # label -> (workload preset, contexts)
    "heavy overlap": ("overlap", 3000),
    "heavy head": ("heavy-head", 3000),
    "low overlap": ("low-overlap", 3000),
    "10k contexts": ("large", 10_000),
    "multi-turn": ("multiturn", 3000),
}


def conversations(workload: Workload) -> list[int | None]:
    """The conversation of each query (multi-turn presets); ``None`` for single-turn ones."""
    sessions = [query.session_id for query in workload.queries]
    return list(sessions) if len(set(sessions)) < len(sessions) else [None] * len(sessions)


def serve_in_order(workload: Workload, capacity: float, plan: Sequence[tuple[Query, Sequence[int]]]) -> PrefixCacheSim:
    sim = PrefixCacheSim(capacity)
    for query, order in plan:
        sim.serve(f"q{query.query_id}", segments(workload, query, order))
    return sim


def original(workload: Workload, capacity: float) -> PrefixCacheSim:
    return serve_in_order(workload, capacity, [(query, query.doc_ids) for query in workload.queries])


def ours_batch(workload: Workload, capacity: float, shake: int = 0) -> PrefixCacheSim:
    queries = workload.queries
    plan = plan_batch(
        [query.doc_ids for query in queries],
        conversations=conversations(workload),
        tokens=workload.docs.lengths,
        shake=shake,
    )
    check_turns(workload, plan.order)
    return serve_in_order(
        workload,
        capacity,
        [(queries[i], [queries[i].doc_ids[j] for j in plan.permutations[i]]) for i in plan.order],
    )


def check_turns(workload: Workload, order: Sequence[int]) -> int:
    """How many contexts run before an earlier turn of their conversation (must be 0 for prefixgate)."""
    seen: dict[int, int] = {}
    late = 0
    for index in order:
        query = workload.queries[index]
        if seen.get(query.session_id, 0) > query.turn:
            late += 1
        seen[query.session_id] = max(seen.get(query.session_id, 0), query.turn)
    return late


def online(
    workload: Workload, capacity: float, plan: Callable[[LiveIndex, Sequence[int]], Sequence[int]]
) -> PrefixCacheSim:
    index = LiveIndex(max_requests=None)
    sim = PrefixCacheSim(capacity)
    for query in workload.queries:
        blocks = plan(index, query.doc_ids)
        request_id = f"req-{query.query_id:x}"
        index.commit(KEY, request_id, blocks)
        served = sim.serve(request_id, segments(workload, query, blocks))
        if served.evicted:
            index.evict(served.evicted)
    return sim


def proxy_plan(index: LiveIndex, blocks: Sequence[int]) -> Sequence[int]:
    return index.plan(KEY, blocks).blocks


def reorder_plan(index: LiveIndex, blocks: Sequence[int], tokens: Mapping[int, int] | None = None) -> Sequence[int]:
    """A one-context stateful ``/reorder``; with ``tokens``, as the API plans text contexts (it estimates each
    document's tokens from its text), without them as it plans integer ids."""
    plan = plan_batch(
        [blocks],
        view=index.snapshot(KEY),
        popularity=index.popularity(KEY),
        cooccurrence=index.cooccurrence(KEY),
        tokens=tokens,
    )
    return [blocks[j] for j in plan.permutations[0]]


def reference_batch(reference: Reference, workload: Workload, capacity: float) -> PrefixCacheSim:
    queries = workload.queries
    reordered, order = reference.batch([query.doc_ids for query in queries])
    return serve_in_order(workload, capacity, [(queries[i], docs) for i, docs in zip(order, reordered, strict=True)])


def reference_online(reference: Reference, workload: Workload, capacity: float) -> PrefixCacheSim:
    reference.reset()
    sim = PrefixCacheSim(capacity)
    for query in workload.queries:
        docs, request_id = reference.online(query.doc_ids)
        served = sim.serve(request_id, segments(workload, query, docs))
        if served.evicted:
            reference.evict(served.evicted)
    return sim


def ratio(ours: PrefixCacheSim, other: PrefixCacheSim | None) -> str:
    if other is None or other.hit_ratio == 0:
        return "n/a"
    return f"{ours.hit_ratio / other.hit_ratio:.2f}x"


def pct(sim: PrefixCacheSim | None) -> str:
    return f"{sim.hit_ratio * 100:.1f}%" if sim is not None else "n/a"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of every workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=float, default=256_000)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated labels")
    parser.add_argument("--modes", default="batch,online")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--bounds", action="store_true", help="also print upper bounds and the popularity oracle")
    parser.add_argument(
        "--batch-search",
        type=int,
        default=20,
        help="also plan each batch with this much extra search (the gateway's --batch-search); 0: that row skipped",
    )
    parser.add_argument(
        "--reference-batch-max",
        type=int,
        default=5000,
        help="skip the reference's batch plan above this many contexts (it is O(N^2): minutes); 0: no limit",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    reference: Reference | None = None
    if not args.no_reference:
        try:
            reference = Reference()
        except ReferenceUnavailable as exc:
            print(f"ContextPilot {exc}: reference columns skipped", file=sys.stderr)
    modes = args.modes.split(",")
    rows: list[list[str]] = []
    bounds: list[list[str]] = []
    try:
        for label in args.presets.split(","):
            name, size = PRESETS[label]
            workload = generate(name, args.seed, n_queries=size // 4 if args.quick else size)
            base = original(workload, args.capacity)
            size_text = f"{len(workload.queries):,}"
            if "batch" in modes:
                ours = ours_batch(workload, args.capacity)
                limit = args.reference_batch_max
                run_reference = reference is not None and (not limit or len(workload.queries) <= limit)
                other = reference_batch(reference, workload, args.capacity) if reference and run_reference else None
                shown = pct(other) if other or not reference else f"skipped (> {limit:,})"
                rows.append([label, "batch", size_text, pct(base), pct(ours), shown, ratio(ours, other)])
                rows[-1].append(ratio(ours, base))
                if args.batch_search:
                    searched = ours_batch(workload, args.capacity, args.batch_search)
                    mode = f"batch, search {args.batch_search}"
                    rows.append([label, mode, size_text, pct(base), pct(searched), shown, ratio(searched, other)])
                    rows[-1].append(ratio(searched, base))
            if "online" in modes:
                proxy = online(workload, args.capacity, proxy_plan)
                api = online(workload, args.capacity, partial(reorder_plan, tokens=workload.docs.lengths))
                other = reference_online(reference, workload, args.capacity) if reference else None
                rows.append([label, "online proxy", size_text, pct(base), pct(proxy), pct(other), ratio(proxy, other)])
                rows[-1].append(ratio(proxy, base))
                rows.append([label, "online /reorder", size_text, pct(base), pct(api), pct(other), ratio(api, other)])
                rows[-1].append(ratio(api, base))
            if args.bounds:
                oracle = popularity_oracle(workload, args.capacity)
                bounds.append([label, f"{online_bound(workload):.1%}", f"{oracle:.1%}", f"{batch_bound(workload):.1%}"])
            print(f"  {label}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        if reference is not None:
            reference.close()
    headers = ["preset", "mode", "contexts", "unchanged", "prefixgate", "ContextPilot 0.5.0", "vs reference"]
    headers.append("vs unchanged")
    capacity = f"{args.capacity / 1000:.0f}k" if args.capacity < float("inf") else "infinite"
    table(f"Hit ratio (cached / prompt tokens), {capacity}-token paged LRU cache, seed {args.seed}", headers, rows)
    if bounds:
        headers = ["preset", "online bound (any order, infinite cache)", "online, true popularity", "batch bound"]
        table("What any order could reach (bench.bounds)", headers, bounds)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
