"""Seeded synthetic RAG workloads: a corpus of documents (token ids) and queries that retrieve top-k of them.

Usage (other benchmarks reuse this)::

    from bench.workload import generate, PRESETS
    workload = generate("overlap", seed=0)          # or n_queries=...
    for query in workload.queries:
        query.doc_ids          # retrieved documents, in retrieval-rank order
        query.question         # question token ids (unique per query)
        workload.docs[doc_id]  # the document's token ids (generated lazily, deterministic)

How queries are drawn: documents are split into topic clusters; a query picks a topic (Zipf over topics), then
k documents, each from its topic (Zipf inside the topic) or, with probability ``p_global``, from the whole
corpus (Zipf over all documents: a popular head). The retrieval-rank order is shuffled per query, as a real
retriever's scores would be. Document ids are random 62-bit ints, so nothing can exploit id order.

Presets: ``overlap`` (strong overlap), ``heavy-head`` (a few documents in most queries), ``low-overlap``,
``large`` (12,000 queries), ``multiturn`` (interleaved sessions whose later turns add documents to earlier ones).
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

__all__ = ["PRESETS", "Corpus", "Preset", "Query", "Workload", "generate"]

VOCAB = 32_000


@dataclass(frozen=True)
class Preset:
    n_docs: int
    n_topics: int
    n_queries: int
    k: tuple[int, int]
    topic_zipf: float = 1.0
    doc_zipf: float = 1.0
    global_zipf: float = 1.0
    p_global: float = 0.1
    doc_tokens: tuple[int, int] = (150, 400)
    question_tokens: tuple[int, int] = (12, 40)
    turns: tuple[int, int] = (1, 1)  # turns per session
    added_per_turn: tuple[int, int] = (1, 4)
    concurrent_sessions: int = 1


PRESETS: dict[str, Preset] = {
    "overlap": Preset(n_docs=800, n_topics=40, n_queries=3000, k=(5, 15), p_global=0.15),
    "heavy-head": Preset(
        n_docs=3000, n_topics=100, n_queries=3000, k=(8, 20), doc_zipf=0.8, global_zipf=1.4, p_global=0.4
    ),
    "low-overlap": Preset(
        n_docs=20_000, n_topics=800, n_queries=3000, k=(5, 10), topic_zipf=0.4, doc_zipf=0.4, p_global=0.05
    ),
    "large": Preset(n_docs=6000, n_topics=200, n_queries=12_000, k=(5, 20), p_global=0.15),
    "multiturn": Preset(
        n_docs=2000, n_topics=80, n_queries=3000, k=(5, 10), p_global=0.1, turns=(1, 6), concurrent_sessions=24
    ),
}


@dataclass(frozen=True)
class Query:
    query_id: int
    doc_ids: tuple[int, ...]  # retrieval-rank order
    question: tuple[int, ...]
    session_id: int
    turn: int  # 1-based


class Corpus(Mapping[int, list[int]]):
    """Doc id -> token ids, generated on access from (seed, doc id): no memory for large corpora."""

    def __init__(self, seed: int, lengths: dict[int, int]) -> None:
        self._seed = seed
        self.lengths = lengths

    def __getitem__(self, doc_id: int) -> list[int]:
        length = self.lengths[doc_id]  # KeyError for unknown ids
        rng = random.Random(f"{self._seed}:{doc_id}")
        return [rng.randrange(VOCAB) for _ in range(length)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Workload:
    name: str
    seed: int
    docs: Corpus
    queries: list[Query] = field(default_factory=list)

    def doc_text(self, doc_id: int) -> str:
        """A deterministic text rendering of a document (one pseudo-word per token)."""
        return " ".join(f"w{token}" for token in self.docs[doc_id])

    def prompt_tokens(self, query: Query, doc_order: Sequence[int] | None = None) -> int:
        order = query.doc_ids if doc_order is None else doc_order
        return sum(self.docs.lengths[doc] for doc in order) + len(query.question)


class _Zipf:
    def __init__(self, items: Sequence[int], exponent: float) -> None:
        self.items = items
        self.cumulative = list(accumulate(1.0 / (rank**exponent) for rank in range(1, len(items) + 1)))

    def draw(self, rng: random.Random) -> int:
        return self.items[bisect_left(self.cumulative, rng.random() * self.cumulative[-1])]


class _Sampler:
    def __init__(self, preset: Preset, rng: random.Random) -> None:
        ids = list(dict.fromkeys(rng.getrandbits(62) for _ in range(preset.n_docs * 2)))[: preset.n_docs]
        rng.shuffle(ids)
        self.lengths = {doc: rng.randint(*preset.doc_tokens) for doc in ids}
        size = max(1, len(ids) // preset.n_topics)
        self.topics = [_Zipf(ids[i : i + size], preset.doc_zipf) for i in range(0, len(ids), size)]
        self.topic_zipf = _Zipf(range(len(self.topics)), preset.topic_zipf)
        self.global_zipf = _Zipf(ids, preset.global_zipf)
        self.preset = preset
        self.rng = rng

    def docs(self, topic: int, k: int, exclude: Sequence[int] = ()) -> list[int]:
        chosen = dict.fromkeys(exclude)
        start = len(chosen)
        for _ in range(k * 20):
            if len(chosen) - start >= k:
                break
            source = self.global_zipf if self.rng.random() < self.preset.p_global else self.topics[topic]
            chosen.setdefault(source.draw(self.rng), None)
        return list(chosen)[start:]

    def question(self) -> tuple[int, ...]:
        return tuple(self.rng.randrange(VOCAB) for _ in range(self.rng.randint(*self.preset.question_tokens)))


def generate(preset: str, seed: int = 0, n_queries: int | None = None) -> Workload:
    """Generate the named preset's workload; the same (preset, seed, n_queries) always gives the same one."""
    config = PRESETS[preset]
    rng = random.Random(f"{preset}:{seed}")
    sampler = _Sampler(config, rng)
    workload = Workload(preset, seed, Corpus(seed, sampler.lengths))
    total = config.n_queries if n_queries is None else n_queries
    if config.turns == (1, 1):
        for query_id in range(total):
            doc_ids = sampler.docs(sampler.topic_zipf.draw(rng), rng.randint(*config.k))
            rng.shuffle(doc_ids)
            workload.queries.append(Query(query_id, tuple(doc_ids), sampler.question(), query_id, 1))
    else:
        workload.queries = _sessions(sampler, total)
    return workload


def _sessions(sampler: _Sampler, total: int) -> list[Query]:
    """Interleave ``concurrent_sessions`` conversations; each turn keeps the previous turn's documents."""
    config, rng = sampler.preset, sampler.rng
    queries: list[Query] = []
    active: list[tuple[int, int, int, list[int], int]] = []  # session, topic, turns left, docs, turn
    next_session = 0
    while len(queries) < total:
        while len(active) < config.concurrent_sessions:
            topic = sampler.topic_zipf.draw(rng)
            active.append((next_session, topic, rng.randint(*config.turns), [], 0))
            next_session += 1
        slot = rng.randrange(len(active))
        session, topic, left, docs, turn = active[slot]
        added = sampler.docs(topic, rng.randint(*config.k) if not docs else rng.randint(*config.added_per_turn), docs)
        docs = list(docs)
        for doc in added:  # a new retrieval ranks the new documents anywhere among the old ones
            docs.insert(rng.randint(0, len(docs)), doc)
        queries.append(Query(len(queries), tuple(docs), sampler.question(), session, turn + 1))
        if left <= 1:
            active.pop(slot)
        else:
            active[slot] = (session, topic, left - 1, docs, turn + 1)
    return queries
