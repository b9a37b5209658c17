"""Batch plan for ``/reorder``: reorder each context's blocks and choose an execution order for the batch.

1. **Insertion.** The contexts are planned one after another against a private prefix trie (an overlay of the
   live snapshot when ``view`` is given, else an empty one) by the one context planner,
   :func:`scheduler.order.arrange`, that the online plan uses too: the longest path already in the trie that
   the context's blocks can form, then its other blocks in the context's canonical order, and the sequence is
   inserted for the next contexts to match. That order puts first the blocks that co-occur most with the
   context's other blocks (in the batch, and with ``cooccurrence`` in the live index's history), weighted by
   their tokens; then by rank: how many contexts of the batch contain a block plus, with ``popularity`` (the
   live index's, for a stateful ``/reorder``), how many requests did; then block id. Measured against the
   batch frequency alone: +11% hit ratio on heavy overlap, +3% on heavy head (``python -m bench compare``).
   In batches small enough for pairwise work, the blocks after the matched path are then chosen one by one by
   how many *other* contexts of the batch hold the path so far plus that block, times its tokens
   (``_Continuation``; +0.3 to +1.7 points of hit ratio).
2. **Local search** (``refine`` passes at most): each context is taken out of the trie and put back along the
   heaviest path (in tokens, with ``tokens``; +1% to +2% hit ratio over the longest in blocks) its blocks can
   form among all the *other* contexts, so that an early context no longer
   anchors a path that later ones could not follow; stops when a pass moves nothing or after ``refine``
   passes (2 by default: with the continuation and the second start below, passes 3 to 6 changed nothing
   measurable on the bench presets and cost about as much as the first two).
   A stateless batch of up to ``SECOND_START_BLOCKS`` blocks gets a second start, top-down over the whole batch
   (:func:`scheduler.partition.partition`), refined the same way; the start whose trie shares more tokens is
   kept (heavy overlap and heavy head +1.5 points; the insertion start wins on nested conversations).
   With ``shake``, an iterated local search follows (:meth:`scheduler.search.Search.shake`): a group of contexts
   that share a block is taken out and put back together, kept only if the trie shares at least as many tokens
   (750 contexts, ``shake=20``: heavy overlap 43.7% -> 45.3% of document tokens shared, for ~1.8 s more CPU).
3. **Execution order**: a depth-first walk of the final trie (sequences sorted by canonical rank), so consecutive
   contexts share the longest prefixes; ``groups`` are its top-level subtrees. With ``conversations``, contexts
   of the same conversation run in input order (turn 2 never before turn 1): a context whose earlier turn has
   not run yet waits and runs right after it.

About O(passes x total blocks x trie depth); no pairwise distances (the reference clusters with O(N^2) time and
memory). With ``view``, ``cached[i]`` is how many leading blocks of context ``i``'s new order the live index
already holds. Duplicate blocks inside a context are kept (placed next to each other): every output is a
permutation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Any, TypeVar

from .cooccur import MAX_COUNTED, Cooccurrence
from .order import Popularity, arrange, permutation
from .partition import partition
from .search import Search
from .trie import MATCH_BUDGET, Trie, TrieView

__all__ = ["BatchPlan", "plan_batch"]

T = TypeVar("T")
REFINE_PASSES = 2
# block visits the local search may spend (passes x blocks in the batch): all passes for a few thousand
# contexts, none from ~10,000 on (the 10,000-context target is 1 s)
REFINE_BLOCKS = 120_000
COOCCURRENCE_BUDGET = 600_000
# blocks in the batch up to which the top-down second start is refined too (it doubles the local search's work:
# ~0.2 s more CPU at 20,000 blocks, i.e. 1,500 contexts of 13 blocks)
SECOND_START_BLOCKS = 20_000
# the iterated local search (``Search.shake``) places at most ``shake`` blocks per block of the batch, and
# ``SHAKE_MAX_BLOCKS`` in all, ~10 us each: off by default (``--batch-search``), since a batch of 2,000 contexts
# plans in ~0.2 s without it and ~1 s more with ``shake=5``
SHAKE_PER_BLOCK = 0
SHAKE_MAX_BLOCKS = 200_000


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """The plan of a batch. Per-context lists are indexed by *input* position.

    - ``permutations[i]``: a permutation of ``range(len(contexts[i]))``; the new order of context ``i`` is
      ``[contexts[i][j] for j in permutations[i]]``.
    - ``order``: the execution order, as input positions (a permutation of ``range(len(contexts))``).
    - ``groups``: ``order`` cut into runs of contexts with the same first block (one subtree each).
    - ``cached[i]``: leading blocks of context ``i`` the live view predicts cached (0 without a view).
    - ``shared[i]``: leading blocks context ``i`` shares with the context executed just before it.
    """

    permutations: list[list[int]]
    order: list[int]
    groups: list[list[int]]
    cached: list[int]
    shared: list[int]

    def apply(self, contexts: Sequence[Sequence[T]]) -> list[list[T]]:
        """Return the reordered contexts *in execution order*: item ``k`` belongs to ``contexts[order[k]]``."""
        return [[contexts[index][j] for j in self.permutations[index]] for index in self.order]


def plan_batch(
    contexts: Sequence[Sequence[int]],
    *,
    view: TrieView | None = None,
    popularity: Popularity | None = None,
    conversations: Sequence[Hashable | None] | None = None,
    cooccurrence: Cooccurrence | None = None,
    tokens: Mapping[int, int] | None = None,
    refine: int = REFINE_PASSES,
    shake: int = SHAKE_PER_BLOCK,
    search_budget: int = MATCH_BUDGET,
) -> BatchPlan:
    """Plan a batch of contexts (block ids, see ``scheduler.blocks.block_id``).

    Pure: reads ``view`` (an immutable snapshot), ``popularity`` and ``cooccurrence`` (the live index's, single
    lookups) and nothing else, so it may run in a worker thread. ``conversations[i]``, when not ``None``, names
    context ``i``'s conversation; ``tokens`` maps a block to its token count (estimated from its text, or the
    engine's), 1 when absent. ``shake``: blocks the iterated local search may place per block of the batch (0:
    none; it runs on batches small enough for the pairwise work).
    """
    if conversations is not None and len(conversations) != len(contexts):
        raise ValueError("conversations must have one entry per context")
    rank = _rank(contexts, popularity)
    affordable = _affordable(contexts)
    keys = _context_keys(contexts, rank, tokens, cooccurrence) if affordable else [rank.__getitem__] * len(contexts)
    extend = _Continuation(contexts, tokens) if len(contexts) > 1 and affordable else None
    trie = view.overlay() if view is not None else Trie()
    sequences: list[list[int]] = []
    for clock, context in enumerate(contexts, start=1):
        sequence, _ = arrange(trie.root, context, keys[clock - 1], search_budget, tokens, extend=extend)
        trie.insert(sequence, clock)
        sequences.append(sequence)
    total = sum(map(len, contexts))
    passes = min(refine, REFINE_BLOCKS // max(total, 1))
    search = Search(contexts, keys, max(search_budget, 2 * MATCH_BUDGET), tokens, extend=extend)
    kept: Trie | None = search.refine(trie, sequences, passes)
    if view is None and extend is not None and passes and total <= SECOND_START_BLOCKS:
        # a second start, top-down over the whole batch; the better of the two is kept
        other = partition(contexts, keys, tokens)
        other_trie = search.refine(None, other, passes)
        if _saved(other, rank, tokens) > _saved(sequences, rank, tokens):
            sequences, kept = other, other_trie
    if extend is not None and shake:
        search.shake(kept, sequences, min(SHAKE_MAX_BLOCKS, shake * total))
    order = _depth_first(sequences, rank)
    if conversations is not None:
        order = _in_turn_order(order, conversations)
    permutations = [permutation(context, sequence) for context, sequence in zip(contexts, sequences, strict=True)]
    return BatchPlan(
        permutations=permutations,
        order=order,
        groups=_groups(sequences, order),
        cached=[view.prefix_length(sequence) for sequence in sequences] if view is not None else [0] * len(contexts),
        shared=_shared(sequences, order),
    )


def _saved(sequences: list[list[int]], rank: dict[int, int], tokens: Mapping[int, int] | None) -> int:
    """The tokens (blocks without ``tokens``) that a trie of ``sequences`` shares: in depth-first order, each
    sequence's longest common prefix with any earlier one is the one with the sequence just before it."""
    order = _depth_first(sequences, rank)
    shared = _shared(sequences, order)
    weight = tokens.get if tokens is not None else None
    return sum(
        sum(weight(block, 1) for block in sequences[index][: shared[index]]) if weight else shared[index]
        for index in order
    )


def _depth_first(sequences: list[list[int]], rank: dict[int, int]) -> list[int]:
    """Order sequences as a depth-first walk of their trie (a context before its extensions)."""
    keys = [[rank[block] for block in sequence] for sequence in sequences]
    return sorted(range(len(sequences)), key=keys.__getitem__)


def _in_turn_order(order: list[int], conversations: Sequence[Hashable | None]) -> list[int]:
    """Repair ``order`` so that the contexts of each conversation run in input order; a context that comes
    before its previous turn waits and runs right after it (the other contexts keep their places)."""
    previous: dict[int, int] = {}  # context -> the previous turn of its conversation
    last: dict[Hashable, int] = {}
    for index, conversation in enumerate(conversations):
        if conversation is not None:
            if conversation in last:
                previous[index] = last[conversation]
            last[conversation] = index
    if not previous:
        return order
    waiting: dict[int, int] = {}  # earlier turn -> the next turn waiting for it
    done: set[int] = set()
    repaired: list[int] = []
    for index in order:
        before = previous.get(index)
        if before is not None and before not in done:
            waiting[before] = index
            continue
        turn: int | None = index
        while turn is not None:
            repaired.append(turn)
            done.add(turn)
            turn = waiting.pop(turn, None)
    return repaired


def _context_keys(
    contexts: Sequence[Sequence[int]],
    rank: dict[int, int],
    tokens: Mapping[int, int] | None,
    live: Cooccurrence | None,
) -> list[Callable[[int], Any]]:
    """Each context's canonical order: its blocks by how often they co-occur with its *other* blocks in the
    rest of the batch and in the live index's history (``live``), times their tokens (the core of its topic
    first), then by rank. On one context without a batch this is the online plan's order.

    Counting co-occurrences costs the sum of squared context sizes: past ``COOCCURRENCE_BUDGET`` (a few
    thousand contexts, see :func:`_affordable`) the caller falls back to the rank alone, to stay within the
    time budget.
    """
    by_rank = rank.__getitem__
    sets = [set(context) for context in contexts]
    together: dict[int, Counter[int]] = {}
    if len(contexts) > 1:
        for blocks in sets:
            for block in blocks:
                row = together.get(block)
                if row is None:
                    row = together[block] = Counter()
                row.update(blocks)
    elif live is None:
        return [by_rank]
    weight = tokens.get if tokens is not None else None
    keys: list[Callable[[int], Any]] = []
    for context, blocks in zip(contexts, sets, strict=True):
        own = len(blocks)  # this context's own contribution to every row
        score = live.scores(context) if live is not None else dict.fromkeys(blocks, 0)
        for block in blocks:
            row = together.get(block)
            shared = score[block] + (sum(row[other] for other in blocks) - row[block] - own + 1 if row else 0)
            score[block] = -shared * (weight(block, 1) if weight is not None else 1)
        keys.append(_ScoreKey(score, rank))
    return keys


def _affordable(contexts: Sequence[Sequence[int]]) -> bool:
    """Whether the batch is small enough for the pairwise work (co-occurrence, continuation) in the budget."""
    return sum(min(len(set(context)), MAX_COUNTED) ** 2 for context in contexts) <= COOCCURRENCE_BUDGET


class _Continuation:
    """The tail after the matched path, chosen block by block: next, the block that the most *other* contexts
    of the batch holding the whole path so far also hold, times its tokens (ties and the rest: canonical order).
    A context's canonical order says which blocks go with its own; this says which of them the contexts that
    could follow it share. Measured (quick presets): heavy head +1.7 points of hit ratio, heavy overlap +0.4,
    10,000 contexts +0.6, multi-turn +0.3."""

    __slots__ = ("postings", "tokens")

    def __init__(self, contexts: Sequence[Sequence[int]], tokens: Mapping[int, int] | None) -> None:
        self.postings: dict[int, set[int]] = {}
        for index, context in enumerate(contexts):
            for block in context:
                self.postings.setdefault(block, set()).add(index)
        self.tokens = tokens

    def __call__(self, path: Sequence[int], tail: list[int]) -> list[int]:
        postings, weight = self.postings, self.tokens.get if self.tokens is not None else None
        holders: set[int] | None = None  # the contexts holding every block of the path (this one included)
        for block in dict.fromkeys(path):
            holders = postings[block] if holders is None else holders & postings[block]  # never mutated
        left = [block for block in tail if len(postings[block]) > 1]  # the others gain nothing anywhere
        chosen: list[int] = []
        while left and (holders is None or len(holders) > 1):
            best, best_gain = -1, 0
            for position, block in enumerate(left):
                shared = len(postings[block]) if holders is None else len(holders & postings[block])
                gain = (shared - 1) * (weight(block, 1) if weight is not None else 1)
                if gain > best_gain:
                    best, best_gain = position, gain
            if best < 0:
                break
            block = left.pop(best)
            chosen.append(block)
            holders = postings[block] if holders is None else holders & postings[block]
        if not chosen:
            return tail
        placed = set(chosen)
        return chosen + [block for block in tail if block not in placed]


class _ScoreKey:
    """Sort key of one context's blocks: by score, then by rank."""

    __slots__ = ("rank", "score")

    def __init__(self, score: dict[int, int], rank: dict[int, int]) -> None:
        self.score = score
        self.rank = rank

    def __call__(self, block: int) -> tuple[int, int]:
        return self.score[block], self.rank[block]


def _rank(contexts: Sequence[Sequence[int]], popularity: Popularity | None) -> dict[int, int]:
    """Rank every block by how many contexts contain it plus its live popularity (descending), then by id."""
    frequency = Counter(chain.from_iterable(map(set, contexts)))
    if popularity is not None and popularity.mode != "first_seen":
        live = popularity.count
        for block in frequency:
            frequency[block] += live(block)
    ordered = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
    return {block: position for position, (block, _) in enumerate(ordered)}


def _groups(sequences: list[list[int]], order: list[int]) -> list[list[int]]:
    groups: list[list[int]] = []
    previous: object = object()
    for index in order:
        first = sequences[index][0] if sequences[index] else None
        if not groups or first != previous or first is None:
            groups.append([])
        groups[-1].append(index)
        previous = first
    return groups


def _shared(sequences: list[list[int]], order: list[int]) -> list[int]:
    shared = [0] * len(sequences)
    for before, index in pairwise(order):
        a, b = sequences[before], sequences[index]
        limit = min(len(a), len(b))
        length = 0
        while length < limit and a[length] == b[length]:
            length += 1
        shared[index] = length
    return shared
