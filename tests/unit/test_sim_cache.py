"""The simulated engine's radix prefix cache: matching, splits, LRU leaf eviction, pins and eviction attribution."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.sim.cache import RadixCache


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_empty_cache_matches_nothing() -> None:
    cache = RadixCache(100)
    assert cache.match([1, 2, 3]) == 0
    assert cache.match([]) == 0
    assert cache.stats().miss_tokens == 3


def test_insert_then_match_full_and_partial() -> None:
    cache = RadixCache(100)
    assert cache.insert([1, 2, 3, 4], "a") == 4
    assert cache.match([1, 2, 3, 4]) == 4
    assert cache.match([1, 2, 3, 4, 5]) == 4
    assert cache.match([1, 2, 9]) == 2
    assert cache.match([2, 3]) == 0
    assert cache.match([1, 2, 3, 4], max_len=3) == 3
    assert cache.match([1], max_len=0) == 0
    assert cache.insert([1, 2, 3, 4], "b") == 0
    assert cache.size == 4


def test_divergent_insert_splits_the_edge() -> None:
    cache = RadixCache(100)
    cache.insert([1, 2, 3, 4, 5], "a")
    assert cache.node_count == 1
    assert cache.insert([1, 2, 3, 7, 8], "b") == 2
    assert cache.node_count == 3  # [1,2,3] -> {[4,5], [7,8]}
    assert cache.size == 7
    assert cache.peek([1, 2, 3, 4, 5]) == 5
    assert cache.peek([1, 2, 3, 7, 8]) == 5
    assert cache.peek([1, 2, 3, 7, 9]) == 4
    # A prefix of an edge gets its own node so a request can own exactly its tail.
    assert cache.insert([1, 2], "c") == 0
    assert cache.node_count == 4
    assert cache.peek([1, 2, 3, 4, 5]) == 5


def test_long_edges_split_at_the_exact_token() -> None:
    cache = RadixCache(100_000)
    base = list(range(100, 10_100))
    cache.insert(base, "a")
    for cut in (1, 2, 4095, 4096, 9_999):
        other = [*base[:cut], 7]
        assert cache.peek(other) == cut
    cache.insert([*base[:6000], 7, 7], "b")
    assert cache.peek(base) == 10_000
    assert cache.peek([*base[:6000], 7, 7]) == 6002


def test_lru_leaf_is_evicted_first_and_attributed() -> None:
    cache = RadixCache(8)
    cache.insert([1, 1, 1, 1], "a")
    cache.insert([2, 2, 2, 2], "b")
    cache.match([1, 1, 1, 1])  # a is now more recent than b
    cache.insert([3, 3, 3, 3], "c")
    assert cache.drain_evicted() == ["b"]
    assert cache.peek([2, 2, 2, 2]) == 0
    assert cache.peek([1, 1, 1, 1]) == 4
    assert cache.size == 8
    stats = cache.stats()
    assert stats.evicted_tokens == 4
    assert stats.evicted_nodes == 1
    assert stats.evicted_requests == 1
    assert cache.drain_evicted() == []


def test_eviction_cascades_to_parents_that_become_leaves() -> None:
    cache = RadixCache(6)
    cache.insert([1, 2, 3, 4], "a")
    cache.insert([1, 2, 5, 6], "b")  # [1,2] -> {[3,4], [5,6]}: 6 tokens
    cache.insert([9, 9], "c")  # 8 tokens: evict a's tail ([3,4]) only
    assert cache.drain_evicted() == ["a"]
    assert cache.peek([1, 2, 5, 6]) == 4
    cache.insert([8, 8, 8, 8], "d")  # 10 tokens: evict b's tail, then [1,2] (now a leaf, older than c)
    assert cache.drain_evicted() == ["b"]
    assert cache.peek([1, 2]) == 0
    assert cache.peek([9, 9]) == 2
    assert cache.size == 6


def test_prefix_owner_is_reported_when_its_node_goes() -> None:
    cache = RadixCache(5)
    cache.insert([1, 2, 3, 4], "long")
    cache.insert([1, 2], "short")  # owns the split-off head [1,2]
    cache.insert([7, 7, 7], "other")  # 7 tokens: evict [3,4] (long), then [1,2] (short) is the LRU leaf
    assert cache.drain_evicted() == ["long"]
    cache.insert([6, 6], "x")
    assert cache.drain_evicted() == ["short"]


def test_a_request_tail_moves_when_it_extends_its_own_sequence() -> None:
    cache = RadixCache(10)
    cache.insert([1, 2, 3], "r")
    cache.insert([1, 2, 3, 4, 5], "r")  # prompt + output: one tail, at [4,5]
    cache.insert([9] * 7, "z")  # evicts [4,5] (r reported), then nothing more for r
    assert cache.drain_evicted() == ["r"]
    assert cache.stats().tracked_requests == 1
    cache.insert([8] * 3, "y")  # evicts [1,2,3], which no longer carries r
    assert cache.drain_evicted() == []


def test_a_request_with_several_tails_is_reported_once() -> None:
    cache = RadixCache(12)
    cache.insert([1, 2, 3], "batch")
    cache.insert([4, 5, 6], "batch")  # a second prompt of the same request: a second tail
    cache.insert([9] * 9, "z")
    assert cache.drain_evicted() == ["batch"]
    assert cache.stats().evicted_requests == 1
    assert cache.peek([4, 5, 6]) == 3  # the other tail is still cached, but the id is released


def test_pinned_paths_are_not_evicted_until_unpinned() -> None:
    cache = RadixCache(8)
    cache.insert([1, 1, 1, 1], "a")
    pin = cache.pin([1, 1, 1, 1])
    cache.insert([2, 2, 2, 2], "b")
    cache.insert([3, 3, 3, 3], "c")  # a is LRU but pinned, so b goes
    assert cache.drain_evicted() == ["b"]
    cache.unpin(pin)
    cache.unpin(pin)  # idempotent
    cache.insert([4, 4, 4, 4], "d")
    assert cache.drain_evicted() == ["a"]


def test_pins_survive_a_split_of_the_pinned_node() -> None:
    cache = RadixCache(8)
    cache.insert([1, 2, 3, 4], "a")
    pin = cache.pin([1, 2, 3, 4])
    cache.insert([1, 2, 9, 9], "b")  # splits the pinned node: [1,2] -> {[3,4], [9,9]}
    cache.insert([5, 5, 5], "c")  # 9 tokens: [3,4] and [1,2] are pinned, so b's tail goes
    assert cache.drain_evicted() == ["b"]
    cache.unpin(pin)
    cache.insert([6, 6, 6, 6], "d")  # 11 tokens: a's tail [3,4] goes, then [1,2] (a leaf now, older than c)
    assert cache.drain_evicted() == ["a"]
    assert cache.peek([1, 2]) == 0
    assert cache.peek([5, 5, 5]) == 3
    assert cache.size == 7


def test_pinned_content_may_exceed_capacity_until_released() -> None:
    cache = RadixCache(4)
    cache.insert([1, 1, 1], "a")
    pin = cache.pin([1, 1, 1])
    cache.insert([2, 2, 2], "b")
    assert cache.size == 6
    cache.unpin(pin)
    cache.insert([3], "c")
    assert cache.size <= 4


def test_insert_longer_than_capacity_keeps_the_head() -> None:
    cache = RadixCache(10)
    cache.insert(list(range(1, 26)), "huge")
    assert cache.size == 10
    assert cache.peek(list(range(1, 26))) == 10


def test_owner_overflow_reports_the_oldest_id() -> None:
    cache = RadixCache(100, max_owners_per_node=2)
    for rid in ("r1", "r2", "r3"):
        cache.insert([1, 2, 3], rid)
    assert cache.drain_evicted() == ["r1"]
    cache.insert([1, 2, 3], "r2")  # refreshes r2, so r3 is the oldest now
    cache.insert([1, 2, 3], "r4")
    assert cache.drain_evicted() == ["r3"]


def test_reset_clears_everything() -> None:
    cache = RadixCache(10)
    cache.insert([1, 2, 3], "a")
    pin = cache.pin([1, 2, 3])
    cache.reset()
    assert cache.size == 0
    assert cache.node_count == 0
    assert cache.match([1, 2, 3]) == 0
    cache.unpin(pin)  # a pin from before the reset is harmless
    assert cache.stats().tracked_requests == 0


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RadixCache(0)
    with pytest.raises(ValueError, match="owners"):
        RadixCache(10, max_owners_per_node=0)


def test_heap_stays_bounded_under_repeated_hits() -> None:
    cache = RadixCache(1000)
    cache.insert([1, 2, 3], "a")
    for _ in range(10_000):
        cache.match([1, 2, 3])
    assert len(cache._heap) <= 2 * cache.node_count + 1025


def test_many_requests_and_long_prompts_stay_bounded() -> None:
    rng = random.Random(0)
    capacity = 50_000
    cache = RadixCache(capacity)
    shared = [rng.randrange(16, 150_000) for _ in range(10_000)]
    cache.insert(shared, "shared")
    reported = 0
    for i in range(100_000):
        prefix = rng.choice((0, 10, 500, 2000))
        tokens = [*shared[:prefix], *(rng.randrange(16, 150_000) for _ in range(rng.randint(1, 40)))]
        cache.match(tokens, max_len=len(tokens) - 1)
        cache.insert(tokens, f"r{i}")
        reported += len(cache.drain_evicted())
        assert cache.size <= capacity
    stats = cache.stats()
    assert stats.node_count <= capacity
    assert stats.tracked_requests <= stats.node_count * 256
    assert reported == stats.evicted_requests
    assert reported + stats.tracked_requests == 100_001


sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(sequences, st.lists(st.integers(0, 3), max_size=12))
def test_match_is_the_longest_common_prefix_with_any_inserted_sequence(
    inserted: list[list[int]], query: list[int]
) -> None:
    cache = RadixCache(10_000)
    for i, seq in enumerate(inserted):
        cache.insert(seq, f"r{i}")
    expected = max(_lcp(tuple(query), tuple(seq)) for seq in inserted)
    assert cache.peek(query) == expected
    assert cache.match(query) == expected
    assert cache.size == len({tuple(seq[:k]) for seq in inserted for k in range(1, len(seq) + 1)})


@settings(max_examples=200, deadline=None)
@given(sequences, st.integers(1, 30), st.lists(st.integers(0, 3), max_size=12))
def test_eviction_keeps_the_tree_consistent_with_what_was_inserted(
    inserted: list[list[int]], capacity: int, query: list[int]
) -> None:
    cache = RadixCache(capacity)
    evicted: set[str] = set()
    last_by_id: dict[str, tuple[int, ...]] = {}
    for i, seq in enumerate(inserted):
        rid = f"r{i % 5}"  # ids are reused, like a client reusing request ids
        evicted.discard(rid)
        cache.insert(seq, rid)
        last_by_id[rid] = tuple(seq[:capacity])
        evicted.update(cache.drain_evicted())
        assert cache.size <= capacity
    # Every id not reported evicted still has its last inserted sequence fully cached.
    for rid, seq in last_by_id.items():
        if rid not in evicted:
            assert cache.peek(seq) == len(seq), rid
    # Everything cached is a prefix of something inserted, and the tree is prefix-closed.
    q = tuple(query)
    expected = max(min(_lcp(q, tuple(seq)), cache.peek(seq)) for seq in inserted)
    assert cache.peek(q) == expected
    assert cache.peek(q) <= max(_lcp(q, tuple(seq)) for seq in inserted)
