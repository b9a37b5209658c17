"""vLLM v1 (tested 0.33): which request ids leave the prefix cache when ``BlockPool`` drops block hashes.

``KVCacheManager.free``/``pop_blocks_for_free`` record the request's prompt-tail block hash per KV-cache group.
``BlockPool._remove_cached_block_hashes`` is the chokepoint for every hash removal: LRU reuse in
``get_new_blocks``, ``evict_blocks``, direct ``_maybe_evict_cached_block`` calls and partial-block replacement.
Removals are settled when the outermost ``BlockPool`` call returns, so hashes that ``move_block_hashes`` or a
partial-to-full promotion re-inserts are not reported. ``reset_prefix_cache`` reports everything. The
``-<8 hex>`` suffix that vLLM appends to external ids is stripped. A ``BlockPool`` without
``_remove_cached_block_hashes`` (older v1) is followed through ``_maybe_evict_cached_block`` (best effort,
untested).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import types
from collections.abc import Hashable
from typing import Any

from .patching import Patch, Wrap, observe, wrap
from .tracking import CacheState, attach, emit, safely, state_of, uncached

__all__ = ["PATCHES", "vllm_external_id"]

_TESTED = ("0.33.",)
_SUFFIX = re.compile(r"-[0-9a-f]{8}\Z")
_OUTER = ("get_new_blocks", "evict_blocks", "cache_full_blocks", "cache_partial_block", "move_block_hashes")


def vllm_external_id(request_id: str, randomized: bool = True) -> str:
    """The id the client sent: vLLM >= 0.1x runs requests as ``<external id>-<8 hex>`` unless told not to."""
    return _SUFFIX.sub("", request_id, count=1) if randomized else request_id


def _ids_randomized() -> bool:
    try:
        envs = importlib.import_module("vllm.envs")
    except ImportError:
        return False
    if "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION" not in getattr(envs, "environment_variables", {}):
        return False
    return os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0").strip() in ("", "0")


def _still_cached(pool: Any, key: Hashable) -> bool:
    cached = pool.cached_block_hash_to_block
    get_one = getattr(cached, "get_one_block", None)
    return get_one(key) is not None if get_one is not None else bool(cached.get(key))


def _settle(pool: Any, state: CacheState) -> None:
    removed, state.removed = state.removed, []
    tails = state.tails
    if not tails.by_entry:
        return
    gone: list[str] = []
    for key in removed:
        if key in tails.by_entry and not _still_cached(pool, key):
            gone.extend(tails.evict(key))
    if gone:
        emit(gone)


def _removed(pool: Any, state: CacheState, keys: Any) -> None:
    state.removed.extend(keys)
    if not state.depth:
        safely(_settle, pool, state)


def _enter(pool: Any, /, *_args: Any, **_kwargs: Any) -> CacheState:
    state = state_of(pool)
    state.depth += 1
    return state


def _leave(pool: Any, state: CacheState | None, _result: Any, /, *_args: Any, **_kwargs: Any) -> None:
    """Settle hash removals once, when the outermost BlockPool call returns (re-inserted hashes are not gone)."""
    if state is not None:
        state.depth -= 1
        if not state.depth and state.removed:
            safely(_settle, pool, state)


def _hashes_removed(pool: Any, _seen: None, removed: Any, /, *_args: Any) -> None:
    if removed:
        _removed(pool, state_of(pool), removed)


def _block_key(_pool: Any, block: Any, /) -> Any:
    return getattr(block, "block_hash", None)


def _legacy_evicted(pool: Any, key: Any, evicted: Any, /, *_args: Any) -> None:
    """For BlockPools without ``_remove_cached_block_hashes``: the block's hash before eviction is what left."""
    if evicted and key is not None:
        _removed(pool, state_of(pool), [key])


def _reset(pool: Any, _seen: None, done: Any, /, *_args: Any, **_kwargs: Any) -> None:
    if done:
        state = state_of(pool)
        state.removed.clear()
        rids = state.tails.clear()
        if rids:
            emit(rids)


def _track(randomized: bool, manager: Any, request: Any, /, *_args: Any, **_kwargs: Any) -> None:
    """Before the blocks go back to the pool: remember the hash of the last cached block of the prompt per group."""
    pool = manager.block_pool
    groups = manager.get_blocks(request.request_id).blocks if pool.enable_caching else ()
    rid = vllm_external_id(request.request_id, randomized)
    prompt_len = request.num_prompt_tokens
    tails: dict[Any, list[Hashable]] = {}
    for blocks in groups:
        for block in reversed(blocks):
            key, covered = block.block_hash, getattr(block, "block_hash_num_tokens", None)
            if key is None or block.is_null or (covered is not None and covered > prompt_len):
                continue
            tails.setdefault(getattr(block, "pool", None) or pool, []).append(key)
            break
    if not tails:
        uncached(pool, rid, request)
    for owner, keys in tails.items():
        attach(owner, rid, keys)


def _patch_block_pool(module: types.ModuleType) -> str | None:
    cls = getattr(module, "BlockPool", None)
    needed = ("get_new_blocks", "evict_blocks", "reset_prefix_cache", "_maybe_evict_cached_block")
    if cls is None or not all(hasattr(cls, name) for name in needed):
        return "BlockPool lacks " + ", ".join(n for n in needed if not hasattr(cls, n)) if cls else "no BlockPool"
    outer = observe(_leave, before=_enter, always=True)
    wraps: dict[str, Wrap] = {"reset_prefix_cache": observe(_reset)}
    wraps.update((name, outer) for name in _OUTER if hasattr(cls, name))
    if hasattr(cls, "_remove_cached_block_hashes"):
        wraps["_remove_cached_block_hashes"] = observe(_hashes_removed)
    else:
        wraps["_maybe_evict_cached_block"] = observe(_legacy_evicted, before=_block_key)
    return wrap(cls, wraps)


def _patch_kv_cache_manager(module: types.ModuleType) -> str | None:
    cls = getattr(module, "KVCacheManager", None)
    if cls is None or not hasattr(cls, "free") or not hasattr(cls, "get_blocks"):
        return "KVCacheManager lacks free/get_blocks"
    release = observe(before=functools.partial(_track, _ids_randomized()))
    return wrap(cls, {name: release for name in ("free", "pop_blocks_for_free") if hasattr(cls, name)})


PATCHES = {
    "vllm.v1.core.block_pool": Patch("vllm", _TESTED, _patch_block_pool),
    "vllm.v1.core.kv_cache_manager": Patch("vllm", _TESTED, _patch_kv_cache_manager),
}
