"""vLLM 0.33.0: evictions in the real ``BlockPool`` are reported under the request ids whose prompt tail they held."""

from __future__ import annotations

import pytest
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_manager import KVCacheManager

from engines import hooks as hook
from engines.hooks import tracking, vllm_cache
from tests.enginehooks.realcaches import VLLM_BLOCK, VllmSetup, make_vllm

# Internal ids as vLLM 0.33 makes them: "<external id>-<8 random hex>".
A, B, C = "req-a-0123abcd", "req-b-89abcdef", "req-c-00ff00ff"


def _prompt(*blocks: int) -> list[int]:
    """One distinct token run per block id, so equal block ids mean a shared prefix block."""
    return [t for b in blocks for t in range(b * 100, b * 100 + VLLM_BLOCK)]


def _evict_until(v: VllmSetup, reported: list[str], count: int) -> list[str]:
    """Allocate one block at a time (LRU order) until ``count`` requests were reported."""
    while len(reported) < count and v.pool.get_num_free_blocks():
        v.allocate(1)
    return reported


def test_the_real_classes_are_patched() -> None:
    assert "_remove_cached_block_hashes" in BlockPool.__prefixgate_hook__  # type: ignore[attr-defined]
    assert "free" in KVCacheManager.__prefixgate_hook__  # type: ignore[attr-defined]


def test_shared_prefix_reports_each_request_when_its_own_tail_goes(reported: list[str]) -> None:
    v = make_vllm(16)
    v.run(A, _prompt(1, 2, 3))
    v.run(B, _prompt(1, 2, 4))  # hits blocks 1-2 of A, adds its own third block
    assert reported == []
    free_unhashed = v.pool.get_num_free_blocks() - 4  # A3, B4, 2, 1 are cached and evictable
    v.allocate(free_unhashed)
    assert reported == []
    v.allocate(1)  # LRU: A's tail (freed first)
    assert reported == ["req-a"]
    v.allocate(1)  # B's tail
    assert reported == ["req-a", "req-b"]
    v.allocate(2)  # the shared prefix blocks: nobody's tail any more
    assert reported == ["req-a", "req-b"]


def test_generated_tokens_do_not_count(reported: list[str]) -> None:
    v = make_vllm(8)
    request = v.request(A, _prompt(1, 2))
    v.prefill(request)
    v.decode(request, [7] * (VLLM_BLOCK + 1))  # fills one block of output
    v.finish(request)
    free_unhashed = v.pool.get_num_free_blocks() - 3  # output block, prompt blocks 2 and 1 are cached
    v.allocate(free_unhashed + 1)  # the output block goes first (freed in reverse order)
    assert reported == []
    v.allocate(1)
    assert reported == ["req-a"]


def test_prompt_fully_hit_is_tracked_on_the_block_it_shares(reported: list[str]) -> None:
    v = make_vllm(16)
    v.run(A, [*_prompt(1, 2), 9])  # 2 full blocks + 1 token (its partial block is never cached)
    request = v.request(B, [*_prompt(1, 2), 8])
    assert v.prefill(request) == 2 * VLLM_BLOCK  # B adds no block of its own
    v.finish(request)
    assert _evict_until(v, reported, 2) == ["req-a", "req-b"]


def test_a_hash_reported_only_when_its_last_copy_goes(reported: list[str]) -> None:
    v = make_vllm(16)
    v.run(A, _prompt(1, 2))
    # vLLM never hits the last prompt token, so B recomputes block 2 into a second block with the same hash.
    v.run(B, _prompt(1, 2))
    key = v.pool.blocks[2].block_hash
    copies = [blk.block_id for blk in v.pool.blocks if blk.block_hash == key]
    assert len(copies) == 2
    v.pool.evict_blocks({copies[0]})
    assert reported == []
    v.pool.evict_blocks({copies[1]})
    assert sorted(reported) == ["req-a", "req-b"]


def test_evict_blocks_and_moved_hashes(reported: list[str]) -> None:
    v = make_vllm(16)
    v.run(A, _prompt(1, 2))
    v.run(C, _prompt(5, 6))
    tail_a = next(blk for blk in v.pool.blocks if blk.block_hash is not None and blk.block_hash_num_tokens == 8)
    # move_block_hashes removes and re-inserts the hash: the entry never left the cache.
    spare = v.allocate(1)[0]
    v.pool.move_block_hashes(tail_a, spare)
    assert reported == []
    v.pool.evict_blocks({spare.block_id})
    assert reported == ["req-a"]


def test_reset_prefix_cache_reports_everything(reported: list[str]) -> None:
    v = make_vllm(16)
    v.run(A, _prompt(1, 2))
    v.run(B, _prompt(3, 4))
    assert v.manager.reset_prefix_cache()
    assert sorted(reported) == ["req-a", "req-b"]
    reported.clear()
    v.allocate(v.pool.get_num_free_blocks())
    assert reported == []


def test_a_finished_request_with_nothing_cached_is_reported_at_release(reported: list[str]) -> None:
    v = make_vllm(8)
    v.run(A, [1, 2, 3])  # shorter than one block: no block hash
    assert reported == ["req-a"]


def test_with_prefix_caching_off_every_finished_request_is_reported_at_release(reported: list[str]) -> None:
    v = make_vllm(8, enable_caching=False)
    v.run(A, _prompt(1, 2))
    assert reported == ["req-a"]


def test_a_preempted_request_is_not_reported_at_release(reported: list[str]) -> None:
    v = make_vllm(8)
    request = v.request(A, [1, 2, 3])
    v.prefill(request)
    v.manager.free(request)  # preemption: status stays RUNNING/PREEMPTED
    assert reported == []


def test_a_failing_hook_never_breaks_the_engine(
    reported: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def settle_that_breaks(pool: object, state: object) -> None:
        raise RuntimeError("internals changed")

    monkeypatch.setattr(vllm_cache, "_settle", settle_that_breaks)
    monkeypatch.setattr(tracking, "_failed", set())
    v = make_vllm(8)
    v.run(A, _prompt(1, 2))
    assert len(v.allocate(v.pool.get_num_free_blocks())) == 7  # evicts everything, as without the hook
    assert reported == []
    assert "settle_that_breaks failed; the engine is unaffected" in caplog.text


@pytest.mark.parametrize("randomized", [True, False])
def test_external_id(randomized: bool) -> None:
    assert hook.vllm_external_id("chatcmpl-req-1-abcdef12", randomized) == (
        "chatcmpl-req-1" if randomized else "chatcmpl-req-1-abcdef12"
    )
