"""The live index: per key, what was sent to an engine and is believed cached, and the online plan.

A *key* is any hashable that separates prefix caches, e.g. ``(engine replica, model, preamble hash)``. Under
each key a :class:`~scheduler.trie.Trie` holds the block paths of committed requests. The online loop is::

    plan = index.plan(key, blocks)             # cached path first, then co-occurrence and popularity
    ... send the request with blocks in plan.blocks order, stamped with request_id ...
    index.commit(key, request_id, plan.blocks)
    ... later, the engine reports the request's KV evicted ...
    index.evict([request_id])

Request ids are global across keys (a request lives under one key). Memory is bounded, and no bound is ever
exceeded: past ``max_requests`` live requests or ``max_nodes`` trie blocks, the least recently committed request
is dropped (an engine also evicts the least recently used tail first, and a request's tail was last used when it
was committed); a new key past ``max_keys`` drops the least recently used key without live requests, or, when
every key has some, the least recently used key with its requests. Each costs amortised O(1) per commit.

Thread-safety: a ``LiveIndex`` has a single writer and is not locked; call it from the event loop only.
:meth:`LiveIndex.snapshot` returns an immutable copy-on-write view of one key in O(1), which a worker thread
may read (e.g. ``scheduler.batch.plan_batch(..., view=...)``) while the loop keeps writing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .cooccur import Cooccurrence
from .ids import request_id_candidates
from .order import Popularity, PopularityMode, arrange, permutation
from .trie import MATCH_BUDGET, Trie, TrieView, match, prefix_length

__all__ = ["EvictResult", "IndexStats", "LiveIndex", "Plan", "continuation_key"]


@dataclass(frozen=True, slots=True)
class Plan:
    """The order in which to send one context's blocks.

    ``order`` is a permutation of ``range(len(blocks))``: position ``j`` of the new order holds input block
    ``order[j]``; ``blocks`` are the block ids in the new order; ``cached`` is how many leading blocks the index
    predicts the engine has cached.
    """

    order: tuple[int, ...]
    blocks: tuple[int, ...]
    cached: int

    @property
    def changed(self) -> bool:
        """Whether the plan differs from the input order."""
        return any(position != index for position, index in enumerate(self.order))


@dataclass(frozen=True, slots=True)
class EvictResult:
    """``evicted``: ids that were live and are now released; ``not_found``: ids the index did not hold."""

    evicted: list[str]
    not_found: list[str]


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Counters of a :class:`LiveIndex`. ``nodes`` counts trie blocks (one per block position, as in an
    uncompressed trie); ``radix_nodes`` the nodes actually allocated."""

    keys: int
    requests: int
    nodes: int
    radix_nodes: int
    inserts: int
    evictions: int
    lru_evictions: int
    plans: int
    hits: int
    planned_blocks: int
    hit_blocks: int


class _Key:
    """The state of one key: its trie, the popularity behind its canonical order, and its live requests."""

    __slots__ = ("cooccurrence", "key", "popularity", "requests", "trie")

    def __init__(self, key: Hashable, popularity: Popularity, cooccurrence: Cooccurrence) -> None:
        self.key = key
        self.trie = Trie()
        self.popularity = popularity
        self.cooccurrence = cooccurrence
        self.requests: dict[str, None] = {}  # an insertion-ordered set


class LiveIndex:
    """Per-key prefix tries of committed requests, with bounded memory and counters (single writer)."""

    def __init__(
        self,
        *,
        max_requests: int | None = 200_000,
        max_nodes: int | None = None,
        max_keys: int = 1024,
        popularity: PopularityMode = "count",
        max_tracked_blocks: int = 1_000_000,
        max_pairs: int = 1_000_000,
        search_budget: int = MATCH_BUDGET,
    ) -> None:
        if max_requests is not None and max_requests < 1:
            raise ValueError("max_requests must be positive or None")
        if max_nodes is not None and max_nodes < 1:
            raise ValueError("max_nodes must be positive or None")
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        Popularity(popularity, max_tracked_blocks)  # validate early
        Cooccurrence(max_pairs)
        self._max_requests = max_requests
        self._max_nodes = max_nodes
        self._max_keys = max_keys
        self._popularity_mode: PopularityMode = popularity
        self._max_tracked_blocks = max_tracked_blocks
        self._max_pairs = max_pairs
        self._search_budget = search_budget
        self._keys: OrderedDict[Hashable, _Key] = OrderedDict()  # least recently used first
        self._idle: OrderedDict[Hashable, None] = OrderedDict()  # the keys without live requests, LRU first
        # request id -> (key state, committed path); ordered by last commit (LRU first)
        self._requests: OrderedDict[str, tuple[_Key, tuple[int, ...]]] = OrderedDict()
        self._clock = 0
        self._nodes = 0
        self._radix_nodes = 0
        self._inserts = self._evictions = self._lru_evictions = 0
        self._plans = self._hits = self._planned_blocks = self._hit_blocks = 0

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def plan(
        self, key: Hashable, blocks: Sequence[int], unseen_as_sent: bool = False, sizes: Sequence[int] | None = None
    ) -> Plan:
        """Order one context: the longest cached path first, in cached order, then the continuation (see
        :func:`continuation_key`).

        Blocks never seen under the key follow the others: the client's first block (a retriever's top hit, the
        one a rephrased or repeated question most likely puts first again) first, then by block id, so that
        requests sharing new blocks still converge. ``unseen_as_sent``: they keep the whole order sent instead.
        For groups that later requests may not show as blocks (boundaries learned from traffic: the same
        documents then go out in the client's order), where a canonical order of new blocks converges on nothing
        and costs the prefix the client's own order (a retriever's ranking, which consecutive questions tend to
        share) would have hit; once seen, they take the canonical order.

        ``sizes`` (each block's length, in any unit) comes before both: blocks of one co-occurrence and popularity,
        and blocks never seen, go longest first, and only blocks of one length by the order above. With nothing to
        tell which block a later request will share, each is as likely to be the one, and a later request hits
        the block sent first: the longest pays back the most (``bench apps``, five draws of questions on the
        simulated engine: ``create_retrieval_chain`` 1.35x to 1.40x direct's cached share, LlamaIndex 1.23x to
        1.26x). Not with ``first_seen`` popularity, where the rank of first sight decides."""
        sent: dict[int, int] = {}  # block -> its first position as sent
        for position, block in enumerate(blocks):
            sent.setdefault(block, position)
        unseen: Callable[[int], tuple[int, ...]] = _as_sent(sent) if unseen_as_sent else _top_first(sent)
        state = self._keys.get(key)
        length = None
        if sizes is not None and self._popularity_mode != "first_seen":
            longest: dict[int, int] = {}
            for block, size in zip(blocks, sizes, strict=True):
                longest[block] = max(longest.get(block, 0), size)
            length = longest.__getitem__
            unseen = _longest_first(unseen, length)
        if state is None:
            ordered, cached = arrange(_EMPTY, blocks, unseen)
        else:
            popularity = state.popularity
            sort_key = continuation_key(
                state.cooccurrence.scores(blocks),
                popularity.sort_key(),
                unseen if popularity.mode != "first_seen" else None,  # first_seen: the rank of first sight decides
                length,
            )
            ordered, cached = arrange(state.trie.root, blocks, sort_key, self._search_budget)
        self._count_plan(len(blocks), cached)
        return Plan(tuple(permutation(blocks, ordered)), tuple(ordered), cached)

    def cached(self, key: Hashable, blocks: Sequence[int], budget: int | None = None) -> int:
        """How many leading blocks :meth:`plan` would predict cached, without ordering the rest or counting a
        plan in the stats (a router asks every replica's index this for each request). A smaller search
        ``budget`` than the index's gives a lower bound, found sooner."""
        state = self._keys.get(key)
        if state is None or not state.trie.root.children:
            return 0
        remaining: dict[int, int] = {}
        for block in blocks:
            remaining[block] = remaining.get(block, 0) + 1
        return len(match(state.trie.root, remaining, self._search_budget if budget is None else budget))

    def held(self, key: Hashable, sequence: Sequence[int]) -> int:
        """How many leading blocks of ``sequence``, in this order, the index holds: the prediction for blocks
        sent in an order chosen before (a text the planner's memo knows). Counted in the stats as a plan."""
        state = self._keys.get(key)
        cached = prefix_length(state.trie.root, sequence) if state is not None else 0
        self._count_plan(len(sequence), cached)
        return cached

    def _count_plan(self, blocks: int, cached: int) -> None:
        self._plans += 1
        self._planned_blocks += blocks
        if cached:
            self._hits += 1
            self._hit_blocks += cached

    def popularity(self, key: Hashable) -> Popularity | None:
        """The popularity behind ``key``'s canonical order (for ``plan_batch``), or ``None`` for a new key.

        A worker thread may read it while the loop writes (single dict lookups): a count read mid-update is
        at most one request stale, which only nudges the order.
        """
        state = self._keys.get(key)
        return state.popularity if state is not None else None

    def cooccurrence(self, key: Hashable) -> Cooccurrence | None:
        """The block co-occurrence of ``key`` (for ``plan_batch``; readable from a worker thread, as above)."""
        state = self._keys.get(key)
        return state.cooccurrence if state is not None else None

    def commit(self, key: Hashable, request_id: str, blocks: Sequence[int]) -> int:
        """Record that ``request_id`` was sent with ``blocks`` in this order; return the blocks already indexed.

        Committing a live id again replaces its path. May drop least recently committed requests (possibly this
        one, if it alone exceeds ``max_nodes``) to respect the caps.
        """
        if request_id in self._requests:
            self._release(request_id)
        state = self._state(key)
        path = tuple(blocks)
        self._clock += 1
        nodes, radix = state.trie.blocks, state.trie.nodes
        shared = state.trie.insert(path, self._clock)
        self._nodes += state.trie.blocks - nodes
        self._radix_nodes += state.trie.nodes - radix
        state.popularity.observe(path)
        state.cooccurrence.observe(path)
        self._requests[request_id] = (state, path)
        state.requests[request_id] = None
        self._idle.pop(key, None)
        self._inserts += 1
        self._enforce_caps()
        return shared

    def shorten(self, request_id: str, keep: int) -> bool:
        """Keep only the first ``keep`` blocks of a live request's path (the engine evicted the rest of its prompt
        and kept the head); ``keep`` 0 releases it. False when the request is not live or already that short."""
        entry = self._requests.get(request_id)
        if entry is None or keep >= len(entry[1]):
            return False
        if keep <= 0:
            self._release(request_id)
            self._evictions += 1
            return True
        state, path = entry
        nodes, radix = state.trie.blocks, state.trie.nodes
        state.trie.release(path)
        state.trie.insert(path[:keep], self._clock)
        self._nodes += state.trie.blocks - nodes
        self._radix_nodes += state.trie.nodes - radix
        self._requests[request_id] = (state, path[:keep])
        return True

    def evict(self, request_ids: Iterable[str]) -> EvictResult:
        """Release the given requests (exact ids; see :meth:`resolve`). Idempotent: unknown ids are reported."""
        evicted: list[str] = []
        not_found: list[str] = []
        for request_id in request_ids:
            if request_id in self._requests:
                self._release(request_id)
                self._evictions += 1
                evicted.append(request_id)
            else:
                not_found.append(request_id)
        return EvictResult(evicted, not_found)

    def resolve(self, raw_id: str) -> str | None:
        """Return the live request id an engine-reported id stands for, or ``None``."""
        for candidate in request_id_candidates(raw_id):
            if candidate in self._requests:
                return candidate
        return None

    def snapshot(self, key: Hashable) -> TrieView:
        """Return an immutable view of ``key``'s trie, safe to read from another thread (O(1))."""
        state = self._keys.get(key)
        return state.trie.view() if state is not None else Trie().view()

    def path(self, request_id: str) -> tuple[int, ...] | None:
        """The blocks ``request_id`` was committed with, or ``None`` if it is not live."""
        entry = self._requests.get(request_id)
        return entry[1] if entry is not None else None

    def requests_sharing(self, key: Hashable, prefix: Sequence[int]) -> list[str]:
        """Live requests under ``key`` whose committed path starts with ``prefix`` (O(requests under the key))."""
        state = self._keys.get(key)
        if state is None or not prefix:
            return []
        wanted = tuple(prefix)
        size = len(wanted)
        return [rid for rid in state.requests if self._requests[rid][1][:size] == wanted]

    def request_ids(self) -> list[str]:
        """Live request ids, least recently committed first."""
        return list(self._requests)

    def cache_keys(self) -> list[Hashable]:
        """The keys that have a trie (live requests or remembered popularity), least recently used first."""
        return list(self._keys)

    def stats(self) -> IndexStats:
        return IndexStats(
            keys=len(self._keys),
            requests=len(self._requests),
            nodes=self._nodes,
            radix_nodes=self._radix_nodes,
            inserts=self._inserts,
            evictions=self._evictions,
            lru_evictions=self._lru_evictions,
            plans=self._plans,
            hits=self._hits,
            planned_blocks=self._planned_blocks,
            hit_blocks=self._hit_blocks,
        )

    def reset(self) -> None:
        """Forget every key and request (counters are kept)."""
        self._keys.clear()
        self._idle.clear()
        self._requests.clear()
        self._nodes = self._radix_nodes = 0

    def _state(self, key: Hashable) -> _Key:
        state = self._keys.get(key)
        if state is not None:
            self._keys.move_to_end(key)
            return state
        while len(self._keys) >= self._max_keys:
            self._drop_key()
        state = _Key(key, Popularity(self._popularity_mode, self._max_tracked_blocks), Cooccurrence(self._max_pairs))
        self._keys[key] = state
        self._idle[key] = None
        return state

    def _drop_key(self) -> None:
        """Forget one key in amortised O(1): the least recently used idle key, else the least recently used key
        with its live requests (each request is released at most once, so the cost is paid by its commit)."""
        if self._idle:
            key, _ = self._idle.popitem(last=False)
            del self._keys[key]
            return
        key = next(iter(self._keys))
        state = self._keys[key]
        for request_id in list(state.requests):
            self._release(request_id)
            self._lru_evictions += 1
        self._idle.pop(key, None)
        del self._keys[key]

    def _release(self, request_id: str) -> None:
        state, path = self._requests.pop(request_id)
        state.requests.pop(request_id, None)
        if not state.requests and state.key in self._keys:
            self._idle[state.key] = None
        nodes, radix = state.trie.blocks, state.trie.nodes
        state.trie.release(path)
        self._nodes += state.trie.blocks - nodes
        self._radix_nodes += state.trie.nodes - radix

    def _enforce_caps(self) -> None:
        max_requests, max_nodes = self._max_requests, self._max_nodes
        while self._requests and (
            (max_requests is not None and len(self._requests) > max_requests)
            or (max_nodes is not None and self._nodes > max_nodes)
        ):
            self._release(next(iter(self._requests)))
            self._lru_evictions += 1


def continuation_key(
    scores: dict[int, int],
    popularity_key: Callable[[int], tuple[int, int]],
    unseen: Callable[[int], tuple[int, ...]] | None = None,
    length: Callable[[int], int] | None = None,
) -> Callable[[int], Any]:
    """The online order after the cached path: most co-occurrence with the request's other blocks first, then
    the canonical (popularity) order; with ``unseen``, blocks never seen (a popularity of 0, after every seen
    one) go by ``unseen`` instead of by block id; with ``length``, seen blocks of one popularity go longest first
    (``LiveIndex.plan``)."""
    if unseen is None and length is None:
        return lambda block: (-scores[block], popularity_key(block))

    def key(block: int) -> tuple[int, tuple[int, ...]]:
        rank = popularity_key(block)
        if unseen is not None and not rank[0]:
            return (-scores[block], unseen(block))
        if length is not None:
            return (-scores[block], (rank[0], -length(block), rank[1]))
        return (-scores[block], rank)

    return key


def _as_sent(sent: dict[int, int]) -> Callable[[int], tuple[int, int]]:
    return lambda block: (0, sent[block])


def _top_first(sent: dict[int, int]) -> Callable[[int], tuple[int, int]]:
    return lambda block: (0, -1) if sent[block] == 0 else (0, block)  # block ids are never negative


def _longest_first(
    order: Callable[[int], tuple[int, ...]], length: Callable[[int], int]
) -> Callable[[int], tuple[int, ...]]:
    return lambda block: (0, -length(block), order(block)[1])


_EMPTY = Trie().root
