"""The batch plan's extra search (``plan_batch(shake=...)``, the gateway's ``--batch-search``): never worse than the
plan without it, strictly better where moving one context at a time cannot improve, deterministic, and the
trie's release reports what it kept (the search's bookkeeping)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import BatchPlan, plan_batch
from scheduler.trie import Trie
from tests.unit.test_scheduler_batch import batches, check_plan

# A and B share block 6, C and D share block 4, A and D share 1, A and C share 2. The insertion and the
# local search settle on a trie sharing one block; two pairs sharing one block each need A and C moved together.
TWO_PAIRS = [[6, 1, 2], [5, 8, 6], [2, 4, 7], [4, 1]]


@settings(max_examples=80, deadline=None)
@given(contexts=batches, tokens=st.none() | st.just({block: 1 + block % 7 * 100 for block in range(9)}))
def test_the_search_is_a_valid_plan_never_sharing_less(
    contexts: list[list[int]], tokens: dict[int, int] | None
) -> None:
    base = plan_batch(contexts, tokens=tokens)
    searched = plan_batch(contexts, tokens=tokens, shake=30)
    check_plan(contexts, searched)

    assert shared_tokens(contexts, searched, tokens) >= shared_tokens(contexts, base, tokens)


def shared_tokens(contexts: list[list[int]], plan: BatchPlan, tokens: dict[int, int] | None) -> int:
    """The tokens each context shares with the one run before it (blocks without ``tokens``)."""
    total = 0
    for context, permutation, shared in zip(contexts, plan.permutations, plan.shared, strict=True):
        leading = [context[j] for j in permutation][:shared]
        total += sum(tokens.get(block, 1) for block in leading) if tokens is not None else len(leading)
    return total


def test_groups_moved_together_find_what_single_moves_cannot() -> None:
    base = plan_batch(TWO_PAIRS)
    searched = plan_batch(TWO_PAIRS, shake=50)
    check_plan(TWO_PAIRS, searched)
    assert sum(base.shared) == 1
    assert sum(searched.shared) == 2  # 6 shared by A and B, 4 by C and D
    assert plan_batch(TWO_PAIRS, shake=50) == searched, "deterministic"


def test_off_by_default() -> None:
    assert plan_batch(TWO_PAIRS, shake=0) == plan_batch(TWO_PAIRS)


def test_release_returns_the_leading_blocks_other_requests_still_hold() -> None:
    trie = Trie()
    trie.insert([1, 2, 3], 1)
    assert trie.insert([1, 2, 4, 5], 2) == 2
    trie.insert([7], 3)
    assert trie.release([1, 2, 4, 5]) == 2  # 1, 2 stay for [1, 2, 3]
    assert trie.release([1, 2, 3]) == 0
    assert trie.insert([7], 4) == 1
    assert trie.release([7]) == 1  # the other [7] is still live
    assert trie.release([7]) == 0
    assert trie.blocks == 0
