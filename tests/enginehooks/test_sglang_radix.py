"""SGLang 0.5.23: radix-tree evictions are reported under the rids whose prompt tail the evicted node held.

Runs on the classic ``RadixCache`` and on the default ``UnifiedRadixCache`` with both TreeCore backends
(``rust``, the default, and ``python``), and on the unified cache's host tier.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from tests.enginehooks.realcaches import SglangSetup, enable_cpu_hicache, make_sglang

KINDS = [("radix", None), ("unified", "rust"), ("unified", "python")]


@pytest.fixture(params=KINDS, ids=["RadixCache", "Unified-rust", "Unified-python"])
def sgl(request: pytest.FixtureRequest) -> Iterator[SglangSetup]:
    kind, backend = request.param
    setup = make_sglang(kind, backend)
    if backend:
        assert type(setup.cache.tree_core).__name__ == (
            "RustUnifiedTreeCore" if backend == "rust" else "UnifiedTreeCore"
        )
    yield setup


def _evict(setup: SglangSetup, tokens: int) -> int:
    return int(setup.cache.evict(EvictParams(num_tokens=tokens)).num_tokens_evicted)


def test_the_real_classes_are_patched() -> None:
    assert "_delete_leaf" in RadixCache.__prefixgate_hook__  # type: ignore[attr-defined]
    assert "_evict_device_leaf" in UnifiedRadixCache.__prefixgate_hook__  # type: ignore[attr-defined]


def test_output_is_evicted_before_the_prompt_tail(sgl: SglangSetup, reported: list[str]) -> None:
    sgl.run("A", [1, 2, 3, 4, 5, 6], [7, 8])
    # SGLang splits the leaf at the prompt boundary and gives the prompt a higher priority: output goes first.
    assert _evict(sgl, 2) == 2
    assert reported == []
    assert _evict(sgl, 1) >= 1
    assert reported == ["A"]


def test_shared_prefix_reports_only_the_request_whose_tail_went(sgl: SglangSetup, reported: list[str]) -> None:
    sgl.run("A", [1, 2, 3, 4, 5, 6])
    sgl.run("B", [1, 2, 3, 4, 9, 9])
    sgl.run("C", [1, 2, 3, 4])  # its whole prompt is the shared prefix
    _evict(sgl, 2)  # LRU: A's own suffix
    assert reported == ["A"]
    _evict(sgl, 2)
    assert reported == ["A", "B"]
    _evict(sgl, 4)  # the shared prefix is C's prompt tail
    assert reported == ["A", "B", "C"]


def test_extending_a_request_moves_nothing_until_the_tail_goes(sgl: SglangSetup, reported: list[str]) -> None:
    sgl.run("A", [1, 2, 3, 4])
    sgl.run("B", [1, 2, 3, 4, 5, 6])  # A's tail node becomes an inner node: it cannot go before B's
    _evict(sgl, 2)
    assert reported == ["B"]
    _evict(sgl, 4)
    assert reported == ["B", "A"]


def test_reset_reports_everything(sgl: SglangSetup, reported: list[str]) -> None:
    sgl.run("A", [1, 2, 3])
    sgl.run("B", [4, 5, 6])
    sgl.cache.reset()
    assert sorted(reported) == ["A", "B"]


def test_released_without_caching_is_reported_at_once(sgl: SglangSetup, reported: list[str]) -> None:
    sgl.run("A", [1, 2, 3], checkpoint=False)
    assert reported == ["A"]


@pytest.mark.parametrize(("kind", "backend"), KINDS)
def test_a_disabled_tree_reports_at_release(kind: str, backend: str | None, reported: list[str]) -> None:
    setup = make_sglang(kind, backend, disable=True)
    setup.run("A", [1, 2, 3, 4])
    assert reported == ["A"]


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
@pytest.mark.parametrize("backend", ["rust", "python"])
def test_host_tier(backend: str, policy: str, reported: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    setup = make_sglang("unified", backend)
    enable_cpu_hicache(setup, monkeypatch, policy)
    cache = setup.cache
    try:
        a = setup.run("A", [1, 2, 3, 4, 5, 6], [7, 8])
        setup.run("B", [1, 2, 3, 4, 9, 9])
        cache.writing_check(write_back=True)
        # write-through backs nodes up as they are inserted; write-back only when they are evicted
        assert cache.tree_core.is_backuped(a.last_node) == (policy == "write_through")
        # Device eviction only demotes backed-up nodes to the host tier: their prompts are still cached.
        assert _evict(setup, 100) > 0
        assert reported == []
        assert len(cache.__dict__["_prefixgate_state"].host_only) == 2  # both prompt tails now live on the host
        assert cache.evict_host(100) > 0
        assert sorted(reported) == ["A", "B"]
    finally:
        cache.release_host_resources()
