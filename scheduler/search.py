"""The batch plan's improvement steps over a trie of the batch's sequences (see :mod:`scheduler.batch`).

- :meth:`Search.refine`, the local search: take each context out of the trie and put it back along the heaviest
  path the others leave, until a pass moves nothing. Converges in a few passes to a trie where no *single*
  context can do better.
- :meth:`Search.shake`, an iterated local search past that point: take out a group of contexts that share a
  block (at most ``SHAKE_GROUP`` of them), put them back in another order (half the time with that block first
  after the path they match), refine the group alone, and keep the result only if the trie shares at least as
  many tokens as before; else put the group back as it was. Each round moves several contexts at once, which the
  local search cannot. Deterministic: the rounds are drawn from a generator seeded by the batch's size. Measured
  (``python -m bench compare --quick``) in the change that added it, see ``docs/benchmarks.md``.

Both keep the trie and ``sequences`` in step; the tokens the trie shares are tracked as they change (``insert``
and ``release`` return the blocks already there and still there), so a round costs its group, not the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .order import arrange
from .trie import Trie

__all__ = ["SHAKE_GROUP", "Search"]

SHAKE_GROUP = 40  # contexts taken out together in one round of ``shake`` (more: fewer rounds in the same work)


class Search:
    """The improvement steps of one batch: its contexts, their canonical orders (``keys``), the trie-walk
    budget, block tokens and the tail continuation (``extend``) that the insertion used."""

    __slots__ = ("budget", "contexts", "extend", "keys", "tokens")

    def __init__(
        self,
        contexts: Sequence[Sequence[int]],
        keys: list[Callable[[int], Any]],
        budget: int,
        tokens: Mapping[int, int] | None,
        extend: Callable[[Sequence[int], list[int]], list[int]] | None,
    ) -> None:
        self.contexts, self.keys, self.budget, self.tokens, self.extend = contexts, keys, budget, tokens, extend

    def refine(self, trie: Trie | None, sequences: list[list[int]], passes: int) -> Trie:
        """Refine ``sequences`` in place; ``trie`` holds them (``None``: a new trie of them is built). Returns
        the trie."""
        trie = trie if trie is not None else _trie_of(sequences)
        for _ in range(passes):
            if not self._reinsert(trie, sequences, range(len(self.contexts)))[0]:
                break
        return trie

    def shake(self, trie: Trie | None, sequences: list[list[int]], work: int) -> int:
        """Improve ``sequences`` in place (``trie`` holds them, or ``None``) by rounds of :meth:`_round` until
        about ``work`` blocks have been placed; return the tokens the trie shares more than before."""
        trie = trie if trie is not None else _trie_of(sequences)
        holders: dict[int, list[int]] = {}
        for index, context in enumerate(self.contexts):
            for block in dict.fromkeys(context):
                holders.setdefault(block, []).append(index)
        shared = sorted(block for block, held in holders.items() if len(held) > 1)
        rng = random.Random(len(self.contexts))
        gained = 0
        while shared and work > 0:
            block = rng.choice(shared)
            group = holders[block]
            group = rng.sample(group, SHAKE_GROUP) if len(group) > SHAKE_GROUP else list(group)
            rng.shuffle(group)
            gain, placed = self._round(trie, sequences, group, block if rng.random() < 0.5 else None)
            gained += gain
            work -= placed
        return gained

    def _round(self, trie: Trie, sequences: list[list[int]], group: list[int], first: int | None) -> tuple[int, int]:
        """Take ``group`` out, put it back (``first`` leading its tail), refine it; undo unless the trie shares
        as much as before. Returns (tokens gained, blocks placed)."""
        before = [sequences[index] for index in group]
        delta = -sum(self._release(trie, sequences[index]) for index in group)
        for index in group:
            key = self.keys[index]
            if first is None:
                sequence, _ = arrange(
                    trie.root, self.contexts[index], key, self.budget, self.tokens, extend=self.extend
                )
            else:  # the block this round is about, first after the matched path

                def leading(block: int, key: Callable[[int], Any] = key) -> tuple[bool, Any]:
                    return block != first, key(block)

                sequence, _ = arrange(trie.root, self.contexts[index], leading, self.budget, self.tokens)
            delta += self._insert(trie, sequence, index)
            sequences[index] = sequence
        delta += self._reinsert(trie, sequences, group)[1]  # one refining sweep, with all of the group back
        placed = 2 * sum(len(sequences[index]) for index in group)
        if delta >= 0:
            return delta, placed
        for index in group:
            trie.release(sequences[index])
        for index, sequence in zip(group, before, strict=True):
            trie.insert(sequence, index + 1)
            sequences[index] = sequence
        return 0, placed

    def _reinsert(self, trie: Trie, sequences: list[list[int]], indexes: Sequence[int]) -> tuple[int, int]:
        """Take each context of ``indexes`` out and put it back along the heaviest path the others leave; return
        how many moved and the tokens the trie shares more than before."""
        moved = delta = 0
        for index in indexes:
            old = sequences[index]
            delta -= self._release(trie, old)
            sequence, _ = arrange(
                trie.root, self.contexts[index], self.keys[index], self.budget, self.tokens, extend=self.extend
            )
            delta += self._insert(trie, sequence, index)
            if sequence != old:
                sequences[index] = sequence
                moved += 1
        return moved, delta

    def _insert(self, trie: Trie, sequence: list[int], index: int) -> int:
        """Insert; return the tokens of ``sequence`` the trie already held (shared by this insertion)."""
        return self._tokens(sequence[: trie.insert(sequence, index + 1)])

    def _release(self, trie: Trie, sequence: list[int]) -> int:
        """Release; return the tokens of ``sequence`` the trie still holds (it shared them)."""
        return self._tokens(sequence[: trie.release(sequence)])

    def _tokens(self, blocks: Sequence[int]) -> int:
        weight = self.tokens
        return len(blocks) if weight is None else sum(weight.get(block, 1) for block in blocks)


def _trie_of(sequences: list[list[int]]) -> Trie:
    trie = Trie()
    for clock, sequence in enumerate(sequences, start=1):
        trie.insert(sequence, clock)
    return trie
