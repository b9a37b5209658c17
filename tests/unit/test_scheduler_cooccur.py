"""Block co-occurrence: counts, scores, and the bound on counted pairs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Cooccurrence, LiveIndex
from scheduler.cooccur import MAX_COUNTED


def test_pairs_count_once_per_request_and_score_the_other_blocks() -> None:
    table = Cooccurrence()
    table.observe([1, 2, 3, 3])
    table.observe([2, 3])
    assert table.count(2, 3) == table.count(3, 2) == 2
    assert table.count(1, 2) == 1 and table.count(1, 1) == 0
    assert table.scores([3, 1, 2, 9]) == {3: 3, 1: 2, 2: 3, 9: 0}
    assert len(table) == 6


def test_one_request_counts_its_first_blocks_only() -> None:
    table = Cooccurrence()
    table.observe(range(1000))
    assert len(table) == MAX_COUNTED * (MAX_COUNTED - 1)


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(st.lists(st.integers(0, 30), max_size=8), max_size=60))
def test_the_table_never_exceeds_its_bound(requests: list[list[int]]) -> None:
    table = Cooccurrence(max_pairs=40)
    for blocks in requests:
        table.observe(blocks)
        assert len(table) <= 40


def test_the_least_recently_observed_rows_go_first() -> None:
    table = Cooccurrence(max_pairs=6)
    table.observe([1, 2])
    table.observe([3, 4])
    table.observe([1, 5])  # row 1 is recent again; rows 2, then 3 and 4 are the oldest
    assert len(table) <= 6
    table.observe([6, 7])
    assert len(table) <= 6
    assert table.count(1, 5) == 1 and table.count(6, 7) == 1
    assert table.count(2, 1) == 0 and table.count(3, 4) == 0


def test_the_online_plan_puts_the_blocks_that_came_with_the_others_first() -> None:
    index = LiveIndex()
    for number in range(3):
        index.commit("k", f"topic{number}", [10, 11, 100 + number])
    for number in range(5):
        index.commit("k", f"popular{number}", [50, 200 + number])
    index.evict([f"topic{n}" for n in range(3)] + [f"popular{n}" for n in range(5)])
    # 50 is the most popular block, but 10 and 11 came together three times
    assert index.plan("k", [50, 11, 10]).blocks == (10, 11, 50)
    assert index.plan("k", [50, 11]).blocks == (50, 11)  # no co-occurrence among these: popularity
