"""Block co-occurrence: counts, scores, and the bound on counted pairs."""

from __future__ import annotations

import pytest
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


def test_shrinking_is_amortised(monkeypatch: pytest.MonkeyPatch) -> None:
    shrinks = []
    original = Cooccurrence._shrink

    def counting(self: Cooccurrence) -> None:
        shrinks.append(len(self))
        original(self)

    monkeypatch.setattr(Cooccurrence, "_shrink", counting)
    table = Cooccurrence(max_pairs=400)
    for _ in range(50):
        table.observe(range(10))  # 90 pairs seen 50 times: halving keeps them
    for start in range(100, 2100, 2):
        table.observe([start, start + 1])
        assert len(table) <= 400
    assert len(shrinks) <= 2000 // 100 + 1


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
