"""Block co-occurrence: how often two blocks were sent in the same request, the online plan's first preference.

After the cached path, the online plan puts first the blocks that co-occurred most with the request's *other*
blocks (the core of its topic), then the popular ones. Measured by ``python -m bench compare`` on a 256k-token
cache against popularity alone: +13% hit ratio on heavy overlap, +9% on 10,000 contexts, +1% on heavy head,
unchanged on low overlap and multi-turn.

Bounded: at most ``max_pairs`` counted pairs. The table is one row of counts per block, kept in least recently
observed order; past the bound the least recently observed rows are dropped whole. Each pair is added once and
dropped at most once, so the work is amortised O(1) per counted pair, and there is no stop-the-world pass (a
halving of a million pairs would stall the event loop for a large part of a second). A request counts its
first ``MAX_COUNTED`` distinct blocks only, so one request costs at most that squared.
Not thread-safe for writers; a worker thread may read (single dict lookups) while the loop writes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice

__all__ = ["MAX_COUNTED", "Cooccurrence"]

MAX_COUNTED = 48


class Cooccurrence:
    """Pair counts of blocks sent together (single writer)."""

    __slots__ = ("_max_pairs", "_pairs", "_rows")

    def __init__(self, max_pairs: int = 1_000_000) -> None:
        if max_pairs < 1:
            raise ValueError("max_pairs must be positive")
        self._max_pairs = max_pairs
        self._rows: OrderedDict[int, dict[int, int]] = OrderedDict()  # least recently observed first
        self._pairs = 0

    def __len__(self) -> int:
        """Counted pairs (ordered: ``(a, b)`` and ``(b, a)`` are two)."""
        return self._pairs

    def observe(self, blocks: Iterable[int]) -> None:
        """Record one request: every pair of its distinct blocks (the first ``MAX_COUNTED``) counts once."""
        distinct = list(islice(dict.fromkeys(blocks), MAX_COUNTED))
        if len(distinct) < 2:
            return
        rows = self._rows
        added = 0
        for block in distinct:
            row = rows.get(block)
            if row is None:
                row = rows[block] = {}
            else:
                rows.move_to_end(block)
            for other in distinct:
                if other != block:
                    count = row.get(other)
                    if count is None:
                        row[other] = 1
                        added += 1
                    else:
                        row[other] = count + 1
        self._pairs += added
        while self._pairs > self._max_pairs and rows:
            _, row = rows.popitem(last=False)
            self._pairs -= len(row)

    def count(self, a: int, b: int) -> int:
        """How many observed requests held both ``a`` and ``b`` (0 once ``a``'s row was dropped)."""
        row = self._rows.get(a)
        return row.get(b, 0) if row is not None else 0

    def scores(self, blocks: Sequence[int]) -> dict[int, int]:
        """For each distinct block: its co-occurrences with the other blocks (the first ``MAX_COUNTED``)."""
        distinct = list(dict.fromkeys(blocks))
        counted = distinct[:MAX_COUNTED]
        rows = self._rows
        scores = dict.fromkeys(distinct, 0)
        for block in counted:
            row = rows.get(block)
            if row:
                scores[block] = sum(row.get(other, 0) for other in counted)
        return scores
