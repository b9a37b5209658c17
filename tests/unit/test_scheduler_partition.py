from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from scheduler import LiveIndex, plan_batch
from scheduler.partition import partition


def by_id(block: int) -> int:
    return block


def test_the_block_most_contexts_hold_goes_first_then_the_same_inside_its_group() -> None:
    contexts = [[1, 2, 3], [3, 2], [2, 4], [5]]
    assert partition(contexts, [by_id] * 4) == [[2, 3, 1], [2, 3], [2, 4], [5]]


def test_tokens_weigh_the_choice_and_duplicates_stay_adjacent() -> None:
    assert partition([[1, 1, 2], [2, 1]], [by_id] * 2) == [[1, 1, 2], [1, 2]]  # a tie: the smaller id
    assert partition([[1, 2], [2, 1]], [by_id] * 2, {2: 5}) == [[2, 1], [2, 1]]


@given(st.lists(st.lists(st.integers(0, 12), max_size=8), max_size=12))
def test_every_sequence_is_a_permutation_of_its_context(contexts: list[list[int]]) -> None:
    sequences = partition(contexts, [by_id] * len(contexts))
    assert [sorted(sequence) for sequence in sequences] == [sorted(context) for context in contexts]


def test_a_stateless_batch_keeps_the_top_down_start_when_it_shares_more() -> None:
    contexts = [[7, 3, 2], [4, 5, 2, 7], [6, 4], [5, 6]]
    stateless = plan_batch(contexts)  # both starts, the better kept: [6, 4] and [6, 5] share 6
    single = plan_batch(contexts, view=LiveIndex().snapshot("key"))  # with a view: the insertion start only
    assert sum(stateless.shared) == 3
    assert sum(single.shared) == 2
