"""The KV-event tracker: attribution, release policies, tiers and groups, resets, bounded memory."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.kvevents import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    KVEventTracker,
    UnknownEvent,
)


class Recorder:
    def __init__(self) -> None:
        self.evicted: list[list[str]] = []
        self.resets = 0
        self.log: list[Any] = []

    def on_evicted(self, ids: list[str]) -> None:
        self.evicted.append(list(ids))
        self.log.append(("evicted", sorted(ids)))

    def on_reset(self) -> None:
        self.resets += 1
        self.log.append("reset")


def tracker(**kwargs: Any) -> tuple[KVEventTracker, Recorder]:
    recorder = Recorder()
    return KVEventTracker(on_evicted=recorder.on_evicted, on_reset=recorder.on_reset, **kwargs), recorder


def batch(*events: KVEvent) -> EventBatch:
    return EventBatch(ts=0.0, events=events)


def stored(rid: str | None, *hashes: BlockHash, medium: str | None = "GPU", group: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, medium=medium, session_id=rid, group_idx=group)


def removed(*hashes: BlockHash, medium: str | None = "GPU", group: int | None = None) -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes, medium=medium, group_idx=group)


def test_attribution_includes_prefixes_reannounced_for_a_new_request() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1, 2, 3)))
    t.apply(batch(stored("r2", 1, 2), stored("r2", 4)))  # kv_cache_report_mode="full" re-announces 1, 2
    assert t.requests_holding(1) == {"r1", "r2"}
    assert t.requests_holding(3) == {"r1"}
    assert t.blocks_of("r2") == (1, 2, 4)
    assert (t.tracked_requests, t.tracked_blocks) == (2, 4)
    assert t.counters.stored == 3


def test_release_all_waits_for_the_last_block() -> None:
    t, rec = tracker(release="all")
    t.apply(batch(stored("r1", 1, 2, 3), stored("r2", 1, 4)))
    assert t.apply(batch(removed(3), removed(1))) == []
    assert t.blocks_of("r1") == (2,)
    assert t.apply(batch(removed(2), removed(4))) == ["r1", "r2"]
    assert rec.evicted == [["r1", "r2"]]  # one call per batch
    assert not t.is_cached("r1")
    assert t.tracked_blocks == 0
    assert t.counters.released_requests == 2


def test_release_first_when_the_root_goes() -> None:
    t, rec = tracker(release="first")
    t.apply(batch(stored("r1", 1, 2, 3), stored("r2", 1, 4), stored("r3", 5, 6)))
    assert t.apply(batch(removed(3))) == []
    assert t.apply(batch(removed(1))) == ["r1", "r2"]
    assert t.apply(batch(removed(6))) == []
    assert t.is_cached("r3")
    assert t.requests_holding(2) == frozenset()  # released with r1
    assert rec.evicted == [["r1", "r2"]]


def test_release_any_on_the_first_loss() -> None:
    t, _ = tracker(release="any")
    t.apply(batch(stored("r1", 1, 2, 3), stored("r2", 1, 4)))
    assert t.apply(batch(removed(4))) == ["r2"]
    assert t.requests_holding(1) == {"r1"}
    assert t.apply(batch(removed(3))) == ["r1"]


def test_a_host_copy_keeps_the_request_cached() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1, 2), stored(None, 1, 2, medium="CPU")))  # offload events carry no session
    assert t.apply(batch(removed(1, 2, medium="GPU"))) == []
    assert t.is_cached("r1")
    assert t.apply(batch(removed(1, 2, medium="CPU"))) == ["r1"]


def test_a_removal_without_medium_clears_every_tier() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1, medium=None), stored("r1", 1, medium="CPU_PINNED")))
    assert t.apply(batch(removed(1, medium=None))) == ["r1"]


def test_a_store_without_medium_is_gpu() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1, medium=None)))
    assert t.apply(batch(removed(1, medium="CPU"))) == []
    assert t.apply(batch(removed(1, medium="GPU"))) == ["r1"]


def test_media_filter_counts_only_the_chosen_tiers() -> None:
    t, _ = tracker(media={"GPU"})
    t.apply(batch(stored("r1", 1), stored("r1", 1, medium="CPU"), stored("r2", 2, medium="CPU")))
    assert not t.is_cached("r2")
    assert t.apply(batch(removed(1, medium="CPU"))) == []
    assert t.apply(batch(removed(1, medium="GPU"))) == ["r1"]
    assert t.counters.ignored_media == 3


def test_kv_cache_groups_are_separate_locations() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1, group=0), stored("r1", 1, group=1)))
    assert t.apply(batch(removed(1, group=1))) == []
    assert t.apply(batch(removed(1, group=0))) == ["r1"]
    t.apply(batch(stored("r2", 2, group=0), stored("r2", 2, group=1)))
    assert t.apply(batch(removed(2, group=None))) == ["r2"]  # no group: every group


def test_unattributed_and_unknown_blocks_are_not_tracked() -> None:
    t, rec = tracker()
    t.apply(batch(stored(None, 1, 2), stored("", 3), removed(9), removed(1)))
    assert (t.tracked_requests, t.tracked_blocks) == (0, 0)
    assert rec.evicted == []


def test_int_and_bytes_hashes_are_distinct_keys() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1), stored("r2", b"\x01")))
    assert t.apply(batch(removed(b"\x01"))) == ["r2"]
    assert t.is_cached("r1")


def test_all_blocks_cleared_releases_what_it_tracked_and_keeps_what_is_stored_after() -> None:
    """vLLM publishes the clear of /reset_prefix_cache with the next step's stores: r3, sent after the reset, is
    cached, and a full reset (``on_reset``: the owner drops its whole index) would lose it."""
    t, rec = tracker()
    t.apply(batch(stored("r1", 1), stored("r2", 2)))
    out = t.apply(batch(removed(1), AllBlocksCleared(), stored("r3", 3)))
    assert out == ["r1", "r2"]
    assert rec.log == [("evicted", ["r1"]), ("evicted", ["r2"])]
    assert t.is_cached("r3") and not t.is_cached("r2")
    assert (t.counters.cleared, t.counters.resets) == (1, 0)


def test_reset_calls_on_reset_even_when_empty() -> None:
    t, rec = tracker()
    assert t.reset() == []
    assert rec.resets == 1
    assert rec.evicted == []


def test_unknown_and_malformed_events_are_counted() -> None:
    t, _ = tracker()
    t.apply(batch(UnknownEvent(type="BlockInactive"), UnknownEvent(type="BlockStored", malformed=True)))
    assert (t.counters.unknown, t.counters.malformed, t.counters.batches) == (2, 1, 1)


def test_request_cap_drops_the_least_recently_stored_to() -> None:
    t, rec = tracker(max_requests=2)
    t.apply(batch(stored("r1", 1), stored("r2", 2)))
    t.apply(batch(stored("r1", 3)))  # r1 is now the most recent
    assert t.apply(batch(stored("r3", 4))) == ["r2"]
    assert rec.evicted == [["r2"]]
    assert t.counters.dropped_requests == 1
    assert t.tracked_blocks == 3


def test_block_cap_drops_whole_requests() -> None:
    t, _ = tracker(max_blocks=4)
    t.apply(batch(stored("r1", 1, 2), stored("r2", 2, 3)))
    assert t.apply(batch(stored("r3", 4, 5))) == ["r1"]
    assert t.tracked_blocks == 4
    assert t.requests_holding(2) == {"r2"}
    assert t.apply(batch(stored("r4", *range(10, 20)))) == ["r2", "r3", "r4"]  # larger than the cap by itself
    assert (t.tracked_requests, t.tracked_blocks) == (0, 0)
    assert t.counters.dropped_requests == 4


def test_forget_has_no_callback() -> None:
    t, rec = tracker()
    t.apply(batch(stored("r1", 1, 2), stored("r2", 2)))
    assert t.forget("r1")
    assert not t.forget("r1")
    assert t.requests_holding(2) == {"r2"}
    assert t.tracked_blocks == 1
    assert rec.evicted == []


def test_a_released_request_can_be_stored_again() -> None:
    t, _ = tracker()
    t.apply(batch(stored("r1", 1)))
    assert t.apply(batch(removed(1), stored("r1", 1, 2))) == ["r1"]
    assert t.blocks_of("r1") == (1, 2)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="release"):
        KVEventTracker(release="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        KVEventTracker(max_blocks=0)


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"),
            st.sampled_from(["a", "b", "c", "d", None]),
            st.lists(st.integers(0, 12), min_size=1, max_size=4),
            st.sampled_from(["GPU", "CPU"]),
        ),
        st.tuples(
            st.just("remove"),
            st.none(),
            st.lists(st.integers(0, 12), max_size=4),
            st.sampled_from(["GPU", "CPU", None]),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, release=st.sampled_from(["all", "first", "any"]), cap=st.integers(1, 20))
def test_invariants_hold_and_removing_everything_releases_everything(ops: list[Any], release: Any, cap: int) -> None:
    t, _ = tracker(release=release, max_blocks=cap, max_requests=3)
    lifetimes = 0
    released = 0
    for kind, rid, hashes, medium in ops:
        if kind == "store":
            lifetimes += rid is not None and not t.is_cached(rid)
            released += len(t.apply(batch(stored(rid, *hashes, medium=medium))))
        else:
            released += len(t.apply(batch(removed(*hashes, medium=medium))))
        assert t.tracked_requests <= 3
        assert t.tracked_blocks <= cap
        for request_id in ("a", "b", "c", "d"):
            for block in t.blocks_of(request_id):
                assert request_id in t.requests_holding(block)
    released += len(t.apply(batch(removed(*range(13), medium=None))))
    assert (t.tracked_requests, t.tracked_blocks) == (0, 0)
    assert released == lifetimes == t.counters.released_requests


def chain(rid: str, *hashes: BlockHash, parent: BlockHash | None = None, size: int = 128) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, block_size=size, medium="GPU", session_id=rid)


def shortening(**kwargs: Any) -> tuple[KVEventTracker, Recorder, list[dict[str, int]]]:
    recorder, shortened = Recorder(), []
    t = KVEventTracker(on_evicted=recorder.on_evicted, on_shortened=shortened.append, **kwargs)
    return t, recorder, shortened


def test_an_evicted_tail_shortens_the_request_to_the_tokens_its_unbroken_head_holds() -> None:
    """vLLM frees a finished request's blocks tail first: the head of its prompt stays cached after its tail went,
    and the gateway hears how many of its tokens the engine still holds."""
    t, recorder, shortened = shortening()
    t.apply(batch(chain("r1", 1, 2), chain("r1", 3, 4, parent=2)))  # full mode: the chain from its first block
    t.apply(batch(removed(4)))
    t.apply(batch(removed(3), removed(2)))
    assert shortened == [{"r1": 384}, {"r1": 128}]
    assert recorder.evicted == [] and t.is_cached("r1")
    t.apply(batch(removed(1)))
    assert recorder.evicted == [["r1"]] and shortened == [{"r1": 384}, {"r1": 128}]
    assert t.counters.shortened_requests == 2


def test_a_block_lost_past_an_earlier_break_or_a_request_released_in_the_batch_says_nothing_more() -> None:
    t, recorder, shortened = shortening()
    t.apply(batch(chain("r1", 1, 2, 3, 4), chain("r2", 9, 8)))
    t.apply(batch(removed(2)))
    t.apply(batch(removed(4)))  # past the break at block 2: the engine held 128 tokens and still does
    t.apply(batch(removed(3), removed(9), removed(8)))
    assert shortened == [{"r1": 128}]
    assert recorder.evicted == [["r2"]]


def test_shared_prefix_blocks_shorten_every_request_that_reused_them() -> None:
    t, _, shortened = shortening()
    t.apply(batch(chain("r1", 1, 2, 3)))
    t.apply(batch(chain("r2", 1, 2), chain("r2", 5, parent=2)))  # r2 reused 1, 2 (re-announced) and stored 5
    t.apply(batch(removed(2)))
    assert shortened == [{"r1": 128, "r2": 128}]


def test_a_chain_of_unknown_start_is_never_shortened() -> None:
    """Without ``kv_cache_report_mode="full"`` a request's first store continues a prefix it reused: where its
    blocks start in its prompt is unknown, so losing one says nothing of how much the engine holds."""
    t, recorder, shortened = shortening()
    t.apply(batch(chain("r1", 5, 6, 7, parent=2)))
    t.apply(batch(chain("r2", 1, 2), chain("r2", 9, parent=7)))  # a store that does not continue its chain
    t.apply(batch(removed(6), removed(2)))
    assert shortened == [] and recorder.evicted == []
