"""The canonical block order shared by all requests, and mapping a new order back to input positions.

Blocks that no cached path covers are put in one order that every request agrees on, so that requests which
arrive before anything is cached still converge on common prefixes: popular blocks first, then by block id.

Popularity changes between requests, and a changed order could break a prefix (if A overtakes B after request
1, request 2 puts A first). Three keys are kept and measured by ``python -m bench scheduler``:

- ``"count"`` (default): exact counts. Measured best (by ~0.5 point of hit ratio over ``"log2"`` on every
  preset and seed): the longest-path match puts cached paths first whatever the canonical order says, so a flip
  costs little, while exact counts rank the blocks that will recur more accurately.
- ``"log2"``: the bit length of the count (popularity quantised to powers of two), which changes only when a
  count doubles.
- ``"first_seen"``: order of first appearance, which never changes; measured worst.

The table is bounded and never holds more than ``max_blocks`` blocks: past them the least recently observed
block is forgotten (in ``"first_seen"`` mode the first seen), one per new block: O(1) per block and no
stop-the-world pass (halving or sorting a million counts would stall the event loop for a large part of a
second).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

from .trie import MATCH_BUDGET, Node, match, match_weighted

__all__ = ["Popularity", "PopularityMode", "arrange", "permutation"]

PopularityMode: TypeAlias = Literal["log2", "count", "first_seen"]
SortKey: TypeAlias = Callable[[int], tuple[int, int]]


class Popularity:
    """Per-block popularity and the canonical order derived from it; not thread-safe (single writer)."""

    __slots__ = ("_counts", "_max_blocks", "_mode")

    def __init__(self, mode: PopularityMode = "count", max_blocks: int = 1_000_000) -> None:
        if mode not in ("log2", "count", "first_seen"):
            raise ValueError(f"unknown popularity mode {mode!r}")
        if max_blocks < 1:
            raise ValueError("max_blocks must be positive")
        self._mode: PopularityMode = mode
        self._max_blocks = max_blocks
        # count per block, least recently observed first; in "first_seen" mode the value is the block's rank of
        # first appearance instead, in that order
        self._counts: OrderedDict[int, int] = OrderedDict()

    @property
    def mode(self) -> PopularityMode:
        return self._mode

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, block: int) -> int:
        """How many observed requests contained ``block`` (its rank in ``"first_seen"`` mode)."""
        return self._counts.get(block, 0)

    def observe(self, blocks: Iterable[int]) -> None:
        """Record one request; each distinct block counts once."""
        counts = self._counts
        if self._mode == "first_seen":
            rank = len(counts) and next(reversed(counts.values())) + 1
            for block in dict.fromkeys(blocks):
                if block not in counts:
                    counts[block] = rank
                    rank += 1
        else:
            for block in dict.fromkeys(blocks):
                count = counts.get(block)
                if count is None:
                    counts[block] = 1
                else:
                    counts[block] = count + 1
                    counts.move_to_end(block)
        while len(counts) > self._max_blocks:
            counts.popitem(last=False)

    def sort_key(self) -> SortKey:
        """Return the canonical sort key: smaller sorts first."""
        get = self._counts.get
        if self._mode == "log2":
            return lambda block: (-get(block, 0).bit_length(), block)
        if self._mode == "count":
            return lambda block: (-get(block, 0), block)

        def first_seen(block: int) -> tuple[int, int]:
            rank = get(block)
            return (0, rank) if rank is not None else (1, block)

        return first_seen

    def ordered(self, blocks: Iterable[int]) -> list[int]:
        """Return ``blocks`` sorted in canonical order (duplicates kept, adjacent)."""
        return sorted(blocks, key=self.sort_key())


def arrange(
    root: Node,
    blocks: Sequence[int],
    sort_key: Callable[[int], Any],
    budget: int = MATCH_BUDGET,
    weight: Mapping[int, int] | None = None,
    *,
    extend: Callable[[Sequence[int], list[int]], list[int]] | None = None,
) -> tuple[list[int], int]:
    """Order one context: the longest path under ``root`` its blocks can form first (the trie walk, see
    :func:`scheduler.trie.match`; the heaviest with ``weight``, e.g. tokens per block), then the other blocks in
    canonical order (``sort_key``; duplicates adjacent). ``extend(path, tail)``, when given, may reorder the
    distinct other blocks (``tail``, in canonical order) after the matched ``path`` (the batch plan's
    continuation by the contexts that share the path).

    Returns the new sequence and the length of its matched path. The one context planner: the online plan
    (``LiveIndex.plan``) and the batch plan (``plan_batch``) both call it.
    """
    remaining: dict[int, int] = {}
    for block in blocks:
        remaining[block] = remaining.get(block, 0) + 1
    if not root.children:
        sequence = []
    elif weight is None:
        sequence = match(root, remaining, budget)
    else:
        sequence = match_weighted(root, remaining, weight, budget)
    cached = len(sequence)
    if cached < len(blocks):
        tail = sorted((block for block, count in remaining.items() if count), key=sort_key)
        for block in extend(sequence, tail) if extend is not None else tail:
            count = remaining[block]
            if count == 1:
                sequence.append(block)
            else:
                sequence += [block] * count
    return sequence, cached


def permutation(blocks: Sequence[int], ordered: Sequence[int]) -> list[int]:
    """Return ``perm`` with ``[blocks[i] for i in perm] == list(ordered)``.

    Equal blocks keep their relative input order, so the result is unique. Raises ``ValueError`` if
    ``ordered`` is not a rearrangement of ``blocks``.
    """
    if len(ordered) != len(blocks):
        raise ValueError("ordered is not a permutation of blocks")
    positions = {block: index for index, block in enumerate(blocks)}
    try:
        if len(positions) == len(blocks):
            perm = [positions[block] for block in ordered]
            if len(set(perm)) != len(perm):
                raise ValueError("ordered is not a permutation of blocks")
            return perm
        return _permutation_with_duplicates(blocks, ordered)
    except (KeyError, IndexError):
        raise ValueError("ordered is not a permutation of blocks") from None


def _permutation_with_duplicates(blocks: Sequence[int], ordered: Sequence[int]) -> list[int]:
    stacks: dict[int, list[int]] = {}
    for index in range(len(blocks) - 1, -1, -1):
        stacks.setdefault(blocks[index], []).append(index)
    return [stacks[block].pop() for block in ordered]
