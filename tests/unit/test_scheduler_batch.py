"""Batch plans for /reorder: permutations, execution order, groups, the live view, request ids."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import BatchPlan, LiveIndex, block_ids, plan_batch

block_values = st.integers(0, 8) | st.sampled_from([-7, 2**63 + 1, 2**80])
batches = st.lists(st.lists(block_values, max_size=8), max_size=25)


def check_plan(contexts: list[list[int]], plan: BatchPlan) -> None:
    n = len(contexts)
    assert len(plan.permutations) == len(plan.cached) == len(plan.shared) == n
    for context, perm in zip(contexts, plan.permutations, strict=True):
        assert sorted(perm) == list(range(len(context)))
    assert sorted(plan.order) == list(range(n))
    assert [index for group in plan.groups for index in group] == plan.order
    reordered = plan.apply(contexts)
    for k, index in enumerate(plan.order):
        assert sorted(reordered[k]) == sorted(contexts[index])  # reordered[k] belongs to contexts[order[k]]
    for group in plan.groups:
        firsts = {tuple(reordered[plan.order.index(i)][:1]) for i in group}
        assert len(firsts) == 1
    for k in range(1, n):
        a, b = reordered[k - 1], reordered[k]
        shared = 0
        while shared < min(len(a), len(b)) and a[shared] == b[shared]:
            shared += 1
        assert plan.shared[plan.order[k]] == shared


@pytest.mark.parametrize("refine", [0, 6])
@settings(max_examples=80, deadline=None)
@given(contexts=batches)
def test_every_context_is_permuted_and_every_context_scheduled(refine: int, contexts: list[list[int]]) -> None:
    plan = plan_batch(contexts, refine=refine)
    check_plan(contexts, plan)
    assert plan.cached == [0] * len(contexts)


@settings(max_examples=60, deadline=None)
@given(live=batches, contexts=batches)
def test_against_a_live_view(live: list[list[int]], contexts: list[list[int]]) -> None:
    index = LiveIndex()
    for number, context in enumerate(live):
        index.commit("k", f"live{number}", index.plan("k", context).blocks)
    paths = [index.path(rid) or () for rid in index.request_ids()]
    plan = plan_batch(contexts, view=index.snapshot("k"), popularity=index.popularity("k"))
    check_plan(contexts, plan)
    for index_, context in enumerate(contexts):
        sequence = [context[j] for j in plan.permutations[index_]]
        longest = max((n for path in paths for n in range(len(path) + 1) if list(path[:n]) == sequence[:n]), default=0)
        assert plan.cached[index_] == longest


def test_shared_blocks_form_a_common_prefix_and_similar_contexts_run_together() -> None:
    contexts = [[9, 1, 2, 3], [4, 5, 6], [3, 2, 1, 8], [6, 7, 5, 4], [2, 3, 1]]
    plan = plan_batch(contexts)
    reordered = plan.apply(contexts)
    positions = {index: k for k, index in enumerate(plan.order)}
    assert abs(positions[0] - positions[2]) <= 2 and abs(positions[1] - positions[3]) == 1
    for k in (positions[0], positions[2], positions[4]):
        assert set(reordered[k][:3]) == {1, 2, 3}
    assert sum(plan.shared) >= 3 + 3 + 3
    assert len(plan.groups) == 2


def test_subsets_run_before_their_extensions() -> None:
    contexts = [[3, 1, 2, 4], [2, 1], [1, 2, 4]]
    plan = plan_batch(contexts)
    assert plan.order == [1, 2, 0]
    assert plan.apply(contexts) == [[1, 2], [1, 2, 4], [1, 2, 4, 3]]


def test_duplicate_contexts_and_blocks() -> None:
    contexts = [[5, 5, 1], [1, 5, 5], [5, 1, 5], [7]]
    plan = plan_batch(contexts)
    check_plan(contexts, plan)
    reordered = plan.apply(contexts)
    assert reordered.count(reordered[0]) >= 3


def test_cached_paths_come_first_with_a_view() -> None:
    index = LiveIndex()
    index.commit("k", "old", [8, 6, 4])
    plan = plan_batch([[1, 4, 6, 8], [4, 6, 8, 2], [1, 2]], view=index.snapshot("k"))
    reordered = plan.apply([[1, 4, 6, 8], [4, 6, 8, 2], [1, 2]])
    assert [r[:3] for r in reordered if len(r) == 4] == [[8, 6, 4], [8, 6, 4]]
    assert sorted(plan.cached) == [0, 3, 3]
    assert index.path("old") == (8, 6, 4)  # planning does not change the index


def test_string_documents_via_block_ids() -> None:
    docs = [["doc a", "doc b", "doc c"], ["doc c", "doc a"], ["doc b", "doc c", "doc a", "doc d"]]
    plan = plan_batch([block_ids(context) for context in docs])
    reordered = plan.apply(docs)
    assert all(r[:2] == reordered[0][:2] for r in reordered)
    assert {tuple(sorted(r)) for r in reordered} == {tuple(sorted(d)) for d in docs}


def test_empty_batch_and_empty_contexts() -> None:
    assert plan_batch([]).order == []
    plan = plan_batch([[], [1], []])
    check_plan([[], [1], []], plan)
    assert plan.groups[0] == [0] and plan.groups[1] == [2]  # empty contexts each make their own group


@settings(max_examples=80, deadline=None)
@given(contexts=batches, data=st.data())
def test_conversations_run_in_input_order(contexts: list[list[int]], data: st.DataObject) -> None:
    conversations = data.draw(st.lists(st.none() | st.integers(0, 4), min_size=len(contexts), max_size=len(contexts)))
    plan = plan_batch(contexts, conversations=conversations)
    check_plan(contexts, plan)
    position = {index: k for k, index in enumerate(plan.order)}
    for i, a in enumerate(conversations):
        for j in range(i + 1, len(contexts)):
            if a is not None and conversations[j] == a:
                assert position[i] < position[j]


def test_a_later_turn_that_sorts_first_waits_for_its_earlier_turn() -> None:
    # turn 2 (input 1) is a subset-like prefix of the shared path, so the trie walk would run it first
    contexts = [[1, 2, 3, 9], [1, 2], [1, 2, 3, 8]]
    assert plan_batch(contexts).order[0] == 1
    plan = plan_batch(contexts, conversations=["a", "a", None])
    assert plan.order.index(0) < plan.order.index(1)
    with pytest.raises(ValueError, match="one entry per context"):
        plan_batch(contexts, conversations=["a"])


def test_live_popularity_orders_a_single_context_like_the_online_plan() -> None:
    index = LiveIndex()
    for number in range(5):
        index.commit("k", f"r{number}", [7, 3, number + 100])
    index.evict([f"r{number}" for number in range(5)])  # nothing cached, popularity remembered
    context = [1, 3, 5, 7]
    online = index.plan("k", context).blocks
    plan = plan_batch([context], view=index.snapshot("k"), popularity=index.popularity("k"))
    assert plan.apply([context])[0] == list(online) == [3, 7, 1, 5]
    assert plan_batch([context]).apply([context])[0] == [1, 3, 5, 7]  # batch-local frequency alone: by id


def test_local_search_moves_early_contexts_onto_paths_that_later_ones_share() -> None:
    contexts = [[6, 7, 3], [2, 7, 3, 1, 5], [1, 3, 4], [1, 5, 2, 6, 7], [0, 1, 4, 3, 7]]
    greedy = plan_batch(contexts, refine=0)
    refined = plan_batch(contexts)
    check_plan(contexts, refined)
    assert sum(greedy.shared) == 6
    assert sum(refined.shared) == 8  # [1,3,4] + [1,3,4,7,0] and [1,7,2,5,3] + [1,7,2,5,6]


def test_fan_out_over_a_thousand_unrelated_contexts() -> None:
    contexts = [[number, 100_000 + number] for number in range(1500)] + [[7, 100_007, 3]]
    plan = plan_batch(contexts)
    assert len(plan.groups) == 1500
    assert plan.apply(contexts)[plan.order.index(1500)][:2] == [7, 100_007]


@pytest.mark.slow
def test_two_thousand_contexts_are_fast() -> None:
    contexts = [[(i * 7 + j * 13) % 500 for j in range(10 + i % 10)] for i in range(2000)]
    start = time.process_time()
    plan_batch(contexts)
    assert time.process_time() - start < 1.0  # target 0.2 s; generous for shared CI machines


@settings(max_examples=60, deadline=None)
@given(contexts=batches, data=st.data())
def test_token_weighted_plans_are_permutations(contexts: list[list[int]], data: st.DataObject) -> None:
    blocks = sorted({block for context in contexts for block in context})
    tokens = {block: data.draw(st.integers(1, 900)) for block in blocks}
    check_plan(contexts, plan_batch(contexts, tokens=tokens))


def test_the_trie_walk_takes_the_heaviest_path_when_blocks_have_tokens() -> None:
    index = LiveIndex()
    index.commit("k", "short-heavy", [1, 2])
    index.commit("k", "long-light", [3, 4, 5])
    view = index.snapshot("k")
    tokens = {1: 900, 2: 900, 3: 40, 4: 40, 5: 40}
    context = [5, 4, 3, 2, 1]
    assert plan_batch([context], view=view).apply([context])[0][:3] == [3, 4, 5]
    assert plan_batch([context], view=view, tokens=tokens).apply([context])[0][:2] == [1, 2]


def test_the_tail_after_a_shared_path_follows_what_most_contexts_holding_that_path_share() -> None:
    # after [2], {2, 4} is held by three contexts and {2, 3} by two: 4 comes next, so [2, 4], [2, 4, 3] and
    # [2, 4, 3, 1] nest (the canonical order alone gives [2, 3, 4] and one shared block less)
    contexts = [[2, 4, 3, 1], [1, 3], [2, 3, 4], [4, 2]]
    plan = plan_batch(contexts)
    assert plan.apply(contexts)[:3] == [[2, 4], [2, 4, 3], [2, 4, 3, 1]]
    assert sum(plan.shared) == 5
