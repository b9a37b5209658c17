"""The canonical order and the permutation helper."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.order import Popularity, permutation

blocks_lists = st.lists(st.integers(-3, 5) | st.integers(2**63, 2**64), max_size=12)


@given(blocks_lists, st.randoms(use_true_random=False))
def test_permutation_maps_any_rearrangement_back(blocks: list[int], rng) -> None:  # type: ignore[no-untyped-def]
    ordered = list(blocks)
    rng.shuffle(ordered)
    perm = permutation(blocks, ordered)
    assert sorted(perm) == list(range(len(blocks)))
    assert [blocks[index] for index in perm] == ordered


def test_equal_blocks_keep_their_input_order() -> None:
    assert permutation([7, 1, 7, 7], [7, 7, 1, 7]) == [0, 2, 1, 3]


@pytest.mark.parametrize(("blocks", "ordered"), [([1, 2], [1, 1]), ([1, 2], [1]), ([1, 1, 2], [1, 2, 2]), ([1], [3])])
def test_rejects_non_permutations(blocks: list[int], ordered: list[int]) -> None:
    with pytest.raises(ValueError, match="permutation"):
        permutation(blocks, ordered)


def test_count_mode_orders_by_popularity_then_id() -> None:
    popularity = Popularity("count")
    popularity.observe([5, 9])
    popularity.observe([9, 9, 9])  # duplicates count once per request
    popularity.observe([1])
    assert popularity.count(9) == 2
    assert popularity.ordered([1, 5, 9, 2, 9]) == [9, 9, 1, 5, 2]


def test_log2_mode_quantises() -> None:
    popularity = Popularity("log2")
    for _ in range(3):
        popularity.observe([10])
    popularity.observe([20])
    popularity.observe([20])
    # counts 3 and 2 share bit length 2: the tie goes to the smaller id
    assert popularity.ordered([20, 10]) == [10, 20]
    popularity.observe([20])
    popularity.observe([20])  # 4 has bit length 3
    assert popularity.ordered([10, 20]) == [20, 10]


def test_first_seen_mode_never_changes_order() -> None:
    popularity = Popularity("first_seen")
    popularity.observe([30, 10])
    for _ in range(5):
        popularity.observe([20])
    assert popularity.ordered([20, 10, 30, 99, 1]) == [30, 10, 20, 1, 99]


@pytest.mark.parametrize("mode", ["count", "log2", "first_seen"])
def test_table_is_bounded(mode: str) -> None:
    popularity = Popularity(mode, max_blocks=100)  # type: ignore[arg-type]
    popularity.observe([0])
    popularity.observe([0])
    for block in range(1, 1000):
        popularity.observe([block])
        assert len(popularity) <= 100
    assert popularity.ordered([0, 999])[0] in (0, 999)


def test_the_least_recently_observed_block_is_forgotten_first() -> None:
    popularity = Popularity("count", max_blocks=3)
    for block, times in ((1, 8), (2, 4), (3, 2)):
        for _ in range(times):
            popularity.observe([block])
    popularity.observe([1])
    popularity.observe([4])  # over the cap: 2 was observed least recently
    assert len(popularity) == 3
    assert (popularity.count(1), popularity.count(2), popularity.count(3), popularity.count(4)) == (9, 0, 2, 1)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        Popularity("zipf")  # type: ignore[arg-type]
