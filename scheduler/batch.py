"""Batch plan for ``/reorder``: reorder each context's blocks and choose an execution order for the batch.

The default ``"insert"`` strategy plans the contexts one after another against a private prefix trie (the live
snapshot's, when ``view`` is given, else an empty one): each context takes the longest path already in the trie
that its blocks can form (``scheduler.trie.match``), its other blocks follow by batch-wide frequency (then block
id), and its sequence is inserted for the next contexts to match. The execution order is a depth-first walk of
the final trie (sequences sorted by block frequency rank), so consecutive contexts share the longest prefixes,
and ``groups`` are its top-level subtrees. About O(total blocks x trie depth); no pairwise distances (the
reference clusters with O(N^2) time and memory).

Two cheaper strategies are kept because ``python -m bench scheduler`` compares them, and they lose:

- ``"tree"``: a greedy top-down prefix tree (an FP-tree whose item order is chosen per node): at each node every
  context descends along its most frequent remaining block among the contexts at that node, blocks shared by
  all are taken at once. Splitting on one block at a time is myopic: a context follows its most popular block
  away from the contexts it shares most blocks with.
- ``"freq"``: every context sorted by batch-wide frequency, then run in lexicographic order.

With ``view``, ``cached[i]`` is how many leading blocks of context ``i``'s new order the live index already holds.
Duplicate blocks inside a context are kept (placed next to each other): every output is a permutation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Literal, TypeAlias, TypeVar

from .order import permutation
from .trie import MATCH_BUDGET, Trie, TrieView, match

__all__ = ["BatchPlan", "Strategy", "plan_batch"]

Strategy: TypeAlias = Literal["insert", "tree", "freq"]
T = TypeVar("T")


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
    strategy: Strategy = "insert",
    search_budget: int = MATCH_BUDGET,
) -> BatchPlan:
    """Plan a batch of contexts (block ids, see ``scheduler.blocks.block_id``).

    Pure: reads ``view`` (an immutable snapshot) and nothing else, so it may run in a worker thread.
    """
    rank = _batch_rank(contexts)
    if strategy == "insert":
        sequences, order = _by_insertion(contexts, view, rank, search_budget)
    elif strategy in ("tree", "freq"):
        prefixes = [view.match(context, search_budget) if view is not None else [] for context in contexts]
        free, extra = _free_blocks(contexts, prefixes)
        if strategy == "tree":
            sequences, order = _TreeBuilder(prefixes, free, extra, rank).build()
        else:
            sequences, order = _by_frequency(prefixes, free, extra, rank)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    permutations = [permutation(context, sequence) for context, sequence in zip(contexts, sequences, strict=True)]
    return BatchPlan(
        permutations=permutations,
        order=order,
        groups=_groups(sequences, order),
        cached=[view.prefix_length(sequence) for sequence in sequences] if view is not None else [0] * len(contexts),
        shared=_shared(sequences, order),
    )


def _by_insertion(
    contexts: Sequence[Sequence[int]], view: TrieView | None, rank: dict[int, int], budget: int
) -> tuple[list[list[int]], list[int]]:
    trie = view.overlay() if view is not None else Trie()
    by_rank = rank.__getitem__
    sequences: list[list[int]] = []
    for clock, context in enumerate(contexts, start=1):
        remaining = Counter(context)
        sequence = match(trie.root, remaining, budget)
        for block in sorted((block for block, count in remaining.items() if count), key=by_rank):
            count = remaining[block]
            if count == 1:
                sequence.append(block)
            else:
                sequence += [block] * count
        trie.insert(sequence, clock)
        sequences.append(sequence)
    return sequences, _depth_first(sequences, rank)


def _depth_first(sequences: list[list[int]], rank: dict[int, int]) -> list[int]:
    """Order sequences as a depth-first walk of their trie (a context before its extensions)."""
    keys = [[rank[block] for block in sequence] for sequence in sequences]
    return sorted(range(len(sequences)), key=keys.__getitem__)


def _free_blocks(
    contexts: Sequence[Sequence[int]], prefixes: list[list[int]]
) -> tuple[list[set[int]], list[dict[int, int] | None]]:
    """Split each context into the distinct blocks left after its cached prefix, and their multiplicities
    (``None`` when every block left occurs once)."""
    free: list[set[int]] = []
    extra: list[dict[int, int] | None] = []
    for context, prefix in zip(contexts, prefixes, strict=True):
        blocks = set(context)
        if not prefix and len(blocks) == len(context):
            free.append(blocks)
            extra.append(None)
            continue
        left = Counter(context)
        left.subtract(prefix)
        multiplicity = {block: count for block, count in left.items() if count > 0}
        free.append(set(multiplicity))
        extra.append(multiplicity if any(count > 1 for count in multiplicity.values()) else None)
    return free, extra


def _batch_rank(contexts: Sequence[Sequence[int]]) -> dict[int, int]:
    """Rank every block by how many contexts contain it (descending), then by block id."""
    frequency = Counter(chain.from_iterable(map(set, contexts)))
    ordered = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
    return {block: position for position, (block, _) in enumerate(ordered)}


def _expand(blocks: list[int], multiplicity: dict[int, int] | None) -> list[int]:
    if multiplicity is None:
        return blocks
    return [block for block in blocks for _ in range(multiplicity[block])]


def _by_frequency(
    prefixes: list[list[int]], free: list[set[int]], extra: list[dict[int, int] | None], rank: dict[int, int]
) -> tuple[list[list[int]], list[int]]:
    sequences = [
        prefix + _expand(sorted(blocks, key=rank.__getitem__), multiplicity)
        for prefix, blocks, multiplicity in zip(prefixes, free, extra, strict=True)
    ]
    return sequences, _depth_first(sequences, rank)


class _TreeBuilder:
    """Greedy top-down prefix tree over one batch (see the module docstring)."""

    def __init__(
        self, prefixes: list[list[int]], free: list[set[int]], extra: list[dict[int, int] | None], rank: dict[int, int]
    ) -> None:
        self.prefixes = prefixes
        self.forced = [0] * len(prefixes)  # how much of each cached prefix has been consumed
        self.free = free
        self.extra = extra
        self.rank = rank
        self.sequences: list[list[int]] = [[] for _ in prefixes]
        self.order: list[int] = []

    def build(self) -> tuple[list[list[int]], list[int]]:
        stack = [list(range(len(self.prefixes)))]
        while stack:
            active = self._active(stack.pop())
            if len(active) == 1:
                self._finish(active[0])
            elif active:
                stack.extend(reversed(self._split(active)))
        return self.sequences, self.order

    def _active(self, members: list[int]) -> list[int]:
        """Emit the contexts that end at this node (before the subtrees below it); return the others."""
        active = []
        for index in members:
            if self.free[index] or self.forced[index] < len(self.prefixes[index]):
                active.append(index)
            else:
                self.order.append(index)
        return active

    def _finish(self, index: int) -> None:
        prefix = self.prefixes[index]
        rest = sorted(self.free[index], key=self.rank.__getitem__)
        self.sequences[index] += prefix[self.forced[index] :] + _expand(rest, self.extra[index])
        self.free[index] = set()
        self.forced[index] = len(prefix)
        self.order.append(index)

    def _split(self, active: list[int]) -> list[list[int]]:
        """Move every active context one step down; return the child groups, largest first."""
        forced = [index for index in active if self.forced[index] < len(self.prefixes[index])]
        if forced:
            pinned = set(forced)
            counts = Counter(self.prefixes[index][self.forced[index]] for index in forced)
            counts.update(chain.from_iterable(self.free[index] for index in active if index not in pinned))
        else:
            counts = Counter(chain.from_iterable(map(self.free.__getitem__, active)))
            common = [block for block, count in counts.items() if count == len(active)]
            if common:
                self._take_common(active, common)
                return [active]
        rank = self.rank
        bound = len(rank) + 1
        score = {block: count * bound - rank[block] for block, count in counts.items()}
        groups: dict[int, list[int]] = {}
        for index in active:
            groups.setdefault(self._step(index, score), []).append(index)
        children = sorted(groups.items(), key=lambda item: (-len(item[1]), rank[item[0]]))
        return [members for _, members in children]

    def _take_common(self, active: list[int], common: list[int]) -> None:
        common.sort(key=self.rank.__getitem__)
        for index in active:
            self.sequences[index] += _expand(common, self.extra[index])
            self.free[index].difference_update(common)

    def _step(self, index: int, score: dict[int, int]) -> int:
        prefix, position = self.prefixes[index], self.forced[index]
        if position < len(prefix):
            block = prefix[position]
            self.forced[index] = position + 1
            self.sequences[index].append(block)
            return block
        free = self.free[index]
        block = max(free, key=score.__getitem__)
        free.discard(block)
        multiplicity = self.extra[index]
        self.sequences[index] += [block] * (multiplicity[block] if multiplicity is not None else 1)
        return block


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
