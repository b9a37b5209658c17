"""What any order could reach on a workload: upper bounds and an oracle, for ``python -m bench compare --bounds``.

A prefix-cache hit is the prompt's leading tokens shared with *one* cached prompt (a radix path is a prefix of
one earlier prompt), rounded down to a page. Hence, with an infinite cache and every order allowed:

- **online bound**: each request shares at most its documents in common with one *earlier* request;
- **batch bound**: in any execution order each context shares with one context run before it, and these
  "parent" links form a forest, so the total is at most the maximum spanning forest of the graph whose edge
  weights are the tokens two contexts have in common.

Both are loose (one context's order cannot put first what each of its neighbours shares with it), but no
planner can beat them. The **popularity oracle** is an online plan that knows each document's true popularity
(counted on a run 16 times as long of the same preset and seed, whose first 1/16th is the workload): the cached
path first, then the documents by popularity times tokens. It shows what a perfect estimate of popularity would
give where the history seen so far is too short to rank documents (low overlap).
"""

from __future__ import annotations

from collections import Counter

from bench.cachesim import PrefixCacheSim
from bench.scheduler_bench import segments
from bench.workload import Workload, generate
from scheduler import LiveIndex
from scheduler.order import arrange

__all__ = ["batch_bound", "online_bound", "popularity_oracle"]

PAGE = 16


def _total(workload: Workload) -> int:
    return sum(workload.prompt_tokens(query) for query in workload.queries)


def _postings(workload: Workload) -> dict[int, list[int]]:
    postings: dict[int, list[int]] = {}
    for index, query in enumerate(workload.queries):
        for doc in set(query.doc_ids):
            postings.setdefault(doc, []).append(index)
    return postings


def online_bound(workload: Workload) -> float:
    """Hit ratio if every request shared all it has in common with its best earlier request."""
    lengths, seen = workload.docs.lengths, _postings(workload)
    position = dict.fromkeys(seen, 0)  # how many of a document's holders came before the current request
    cached = 0
    for query in workload.queries:
        shared: Counter[int] = Counter()
        for doc in set(query.doc_ids):
            earlier = seen[doc][: position[doc]]
            position[doc] += 1
            for other in earlier:
                shared[other] += lengths[doc]
        cached += max(shared.values(), default=0) // PAGE * PAGE
    return cached / _total(workload)


def batch_bound(workload: Workload) -> float:
    """Hit ratio of the maximum spanning forest of shared tokens (Kruskal over the pairs sharing a document)."""
    lengths = workload.docs.lengths
    pairs: Counter[tuple[int, int]] = Counter()
    for doc, holders in _postings(workload).items():
        for i, a in enumerate(holders):
            for b in holders[i + 1 :]:
                pairs[a, b] += lengths[doc]
    parent = list(range(len(workload.queries)))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    cached = 0
    for (a, b), tokens in sorted(pairs.items(), key=lambda item: -item[1]):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
            cached += tokens // PAGE * PAGE
    return cached / _total(workload)


def popularity_oracle(workload: Workload, capacity: float, sample: int = 16) -> float:
    """Online hit ratio (``capacity``-token LRU cache, evictions fed back) knowing the true popularity."""
    lengths = workload.docs.lengths
    # the corpus is drawn per (preset, seed): a longer run of the same seed, whose first queries are the workload
    population = generate(workload.name, workload.seed, n_queries=len(workload.queries) * sample)
    counts: Counter[int] = Counter(doc for query in population.queries for doc in set(query.doc_ids))
    key = ("oracle",)
    index = LiveIndex(max_requests=None)
    sim = PrefixCacheSim(capacity)
    for query in workload.queries:
        order, _ = arrange(
            index.snapshot(key).root, query.doc_ids, lambda doc: (-counts[doc] * lengths[doc], doc), weight=lengths
        )
        request_id = f"oracle-{query.query_id:x}"
        index.commit(key, request_id, order)
        served = sim.serve(request_id, segments(workload, query, order))
        if served.evicted:
            index.evict(served.evicted)
    return sim.hit_ratio
