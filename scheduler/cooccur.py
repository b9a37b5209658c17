"""Block co-occurrence: how often two blocks were sent in the same request, the online plan's first preference.

After the cached path, the online plan puts first the blocks that co-occurred most with the request's *other*
blocks (the core of its topic), then the popular ones. Measured by ``python -m bench compare`` on a 256k-token
cache against popularity alone: +13% hit ratio on heavy overlap, +9% on 10,000 contexts, +1% on heavy head,
unchanged on low overlap and multi-turn.

Bounded: at most ``max_pairs`` counted pairs. When the table outgrows it, every count is halved and zeros are
dropped until a quarter of the room is free (each halving is O(n) and frees at least the pairs seen once since
the last, so a shrink happens at most once per ``max_pairs / 4`` new pairs: amortised O(log count) per pair).
A request counts its first ``MAX_COUNTED`` distinct blocks only, so one request costs at most that squared.
Not thread-safe for writers; a worker thread may read (single dict lookups) while the loop writes.
"""

from __future__ import annotations

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
        self._rows: dict[int, dict[int, int]] = {}
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
            for other in distinct:
                if other != block:
                    count = row.get(other)
                    if count is None:
                        row[other] = 1
                        added += 1
                    else:
                        row[other] = count + 1
        self._pairs += added
        if self._pairs > self._max_pairs:
            self._shrink()

    def count(self, a: int, b: int) -> int:
        """How many observed requests held both ``a`` and ``b`` (decayed by shrinks)."""
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

    def _shrink(self) -> None:
        keep = self._max_pairs - max(1, self._max_pairs // 4)
        rows = self._rows
        while self._pairs > keep:
            halved: dict[int, dict[int, int]] = {}
            pairs = 0
            for block, row in rows.items():
                kept = {other: count >> 1 for other, count in row.items() if count > 1}
                if kept:
                    halved[block] = kept
                    pairs += len(kept)
            self._rows = rows = halved
            self._pairs = pairs
