"""SGLang (tested 0.5.23): which request ids leave the radix cache, for the classic and the unified tree.

``checkpoint`` (``checkpoint_into_tree`` on the unified tree) records the node that holds the request's prompt
tail. Classic ``RadixCache`` reports in ``_delete_leaf`` and ``reset``. ``UnifiedRadixCache`` works with both
TreeCore backends (Rust default, Python): it checks the victims of ``_evict_device_leaf`` and their ancestors. A
node that is only demoted to the host tier keeps its requests until ``evict_host`` or ``_drop_subtree_no_host``
removes it. ``PREFIXGATE_HOOK_SGLANG=backend`` leaves the classes alone and registers a ``prefixgate`` radix-cache
backend (``--radix-cache-backend prefixgate``) that instruments only the cache it builds. Older layouts without
``checkpoint`` (``cache_finished_req`` and ``cache_unfinished_req`` instead) are not patched.
"""

from __future__ import annotations

import importlib
import logging
import os
import types
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .patching import Patch, Wrap, observe, wrap
from .tracking import CacheState, attach, emit, state_of, uncached

__all__ = ["PATCHES", "instrument_sglang_radix_cache", "instrument_sglang_unified_cache"]

logger = logging.getLogger("prefixgate.hook")

_TESTED = ("0.5.23",)


def _prompt_pages_len(cache: Any, req: Any) -> int:
    page = max(int(getattr(cache, "page_size", 1) or 1), 1)
    return len(req.origin_input_ids) // page * page


def _radix_attach(cache: Any, _seen: None, _result: Any, req: Any, /, *_args: Any, **_kwargs: Any) -> None:
    """Classic tree: walk up from ``req.last_node`` to the node holding the last full page of the prompt."""
    node, rid, root = getattr(req, "last_node", None), getattr(req, "rid", None), cache.root_node
    if not isinstance(rid, str):
        return
    prompt_len = _prompt_pages_len(cache, req)
    chain = []
    while node is not None and node is not root and prompt_len > 0:
        chain.append(node)
        node = node.parent
    end = sum(len(n.key) for n in chain)
    for n in chain:
        start = end - len(n.key)
        if start < prompt_len:
            attach(cache, rid, (n.id,))
            return
        end = start
    uncached(cache, rid, req)


def _unified_attach(cache: Any, _seen: None, _result: Any, req: Any, /, *_args: Any, **_kwargs: Any) -> None:
    node_id, rid = getattr(req, "last_node", None), getattr(req, "rid", None)
    if not isinstance(rid, str):
        return
    prompt_len = _prompt_pages_len(cache, req)
    if node_id is not None and prompt_len > 0 and not cache.tree_core.is_root(node_id):
        for info in reversed(cache.tree_core.collect_path_info([node_id])[0]):
            if info.path_start < prompt_len:
                attach(cache, rid, (info.node_id,))
                return
    uncached(cache, rid, req)


def _released(cache: Any, _seen: None, _result: Any, req: Any, /, *_args: Any, **kwargs: Any) -> None:
    rid = getattr(req, "rid", None)
    if not kwargs.get("checkpointed", True) and isinstance(rid, str):
        uncached(cache, rid, req)


def _leaf_deleted(cache: Any, _seen: None, _result: Any, node: Any, /, *_args: Any, **_kwargs: Any) -> None:
    rids = state_of(cache).tails.evict(getattr(node, "id", None))
    if rids:
        emit(rids)


def _reset(cache: Any, _seen: None, _result: Any, /, *_args: Any, **_kwargs: Any) -> None:
    state = state_of(cache)
    state.host_only.clear()
    rids = state.tails.clear()
    if rids:
        emit(rids)


def _check(cache: Any, state: CacheState, node_ids: Iterable[Hashable]) -> None:
    """Report tracked nodes that left the tree; remember the ones that live on only in the host tier."""
    tree, tails, gone = cache.tree_core, state.tails, []
    for node_id in node_ids:
        if node_id not in tails.by_entry:
            state.host_only.discard(node_id)
            continue
        try:
            on_host_only = tree.is_full_device_evicted(node_id)
        except KeyError:
            state.host_only.discard(node_id)
            gone.extend(tails.evict(node_id))
            continue
        if on_host_only:
            state.host_only.add(node_id)
        else:
            state.host_only.discard(node_id)
    if gone:
        emit(gone)


def _victim_path(cache: Any, node_id: Any, /, *_args: Any, **_kwargs: Any) -> list[Any] | None:
    """``_evict_device_leaf(node_id, ...)``: the ids of the victim and its ancestors (None when nothing is tracked)."""
    if not state_of(cache).tails.by_entry:
        return None
    return [info.node_id for info in cache.tree_core.collect_path_info([node_id])[0]]


def _victim_checker(*, with_host_only: bool) -> Callable[..., None]:
    """The victim and its tombstone ancestors may have left the tree.

    ``_drop_subtree_no_host`` also drops the victim's host-only descendants, hence ``with_host_only``.
    """

    def victims_gone(cache: Any, path: list[Any] | None, _result: Any, /, *_args: Any, **_kwargs: Any) -> None:
        if path is not None:
            state = state_of(cache)
            _check(cache, state, [*path, *state.host_only] if with_host_only else path)

    return victims_gone


def _demoted(cache: Any, _seen: None, _result: Any, node_id: Any, /, *_args: Any, **_kwargs: Any) -> None:
    """``_demote(node_id, ...)`` (write-back): the node may now live on only in the host tier."""
    _check(cache, state_of(cache), [node_id])


def _host_evicted(cache: Any, _seen: None, _result: Any, /, *_args: Any, **_kwargs: Any) -> None:
    """``evict_host``: host-only nodes may leave the tree (the Rust core does not say which)."""
    state = state_of(cache)
    if state.host_only:
        _check(cache, state, list(state.host_only))


_RADIX_WRAPS: dict[str, Wrap] = {
    "_delete_leaf": observe(_leaf_deleted),
    "reset": observe(_reset),
    "on_release": observe(_released),
}
_UNIFIED_WRAPS: dict[str, Wrap] = {
    "reset": observe(_reset),
    "on_release": observe(_released),
    "_evict_device_leaf": observe(_victim_checker(with_host_only=False), before=_victim_path),
    "_drop_subtree_no_host": observe(_victim_checker(with_host_only=True), before=_victim_path),
    "_demote": observe(_demoted),
    "evict_host": observe(_host_evicted),
}


def _radix_wraps(cls: Any) -> dict[str, Wrap] | str:
    if not hasattr(cls, "checkpoint") or not hasattr(cls, "_delete_leaf"):
        return "RadixCache has no checkpoint/_delete_leaf (the older cache_finished_req layout is not supported)"
    wraps = {name: wrapper for name, wrapper in _RADIX_WRAPS.items() if hasattr(cls, name)}
    return {**wraps, "checkpoint": observe(_radix_attach)}


def _unified_wraps(cls: Any) -> dict[str, Wrap] | str:
    missing = [n for n in ("checkpoint", "_evict_device_leaf", "reset") if not hasattr(cls, n)]
    if missing:
        return "UnifiedRadixCache lacks " + ", ".join(missing)
    wraps = {name: wrapper for name, wrapper in _UNIFIED_WRAPS.items() if hasattr(cls, name)}
    entry = "checkpoint_into_tree" if hasattr(cls, "checkpoint_into_tree") else "checkpoint"
    return {**wraps, entry: observe(_unified_attach)}


def instrument_sglang_radix_cache(target: Any) -> str | None:
    """Instrument the classic ``RadixCache`` class or one cache instance; a reason string when it does not fit."""
    wraps = _radix_wraps(target if isinstance(target, type) else type(target))
    return wraps if isinstance(wraps, str) else wrap(target, wraps)


def instrument_sglang_unified_cache(target: Any) -> str | None:
    """Instrument ``UnifiedRadixCache`` (the class or one instance); a reason string when it does not fit."""
    wraps = _unified_wraps(target if isinstance(target, type) else type(target))
    return wraps if isinstance(wraps, str) else wrap(target, wraps)


def _backend_mode() -> bool:
    return os.environ.get("PREFIXGATE_HOOK_SGLANG", "patch").strip().lower() == "backend"


def _patch_radix(module: types.ModuleType) -> str | None:
    if _backend_mode():
        return "skipped"
    cls = getattr(module, "RadixCache", None)
    return instrument_sglang_radix_cache(cls) if cls is not None else "no RadixCache"


def _patch_unified(module: types.ModuleType) -> str | None:
    if _backend_mode():
        return "skipped"
    cls = getattr(module, "UnifiedRadixCache", None)
    return instrument_sglang_unified_cache(cls) if cls is not None else "no UnifiedRadixCache"


def _backend_factory(ctx: Any) -> Any:
    registry = importlib.import_module("sglang.srt.mem_cache.registry")
    cache = registry.default_radix_cache_factory(ctx)
    unified = importlib.import_module("sglang.srt.mem_cache.unified_radix_cache").UnifiedRadixCache
    instrument = instrument_sglang_unified_cache if isinstance(cache, unified) else instrument_sglang_radix_cache
    problem = instrument(cache)
    if problem == "skipped":
        logger.info("prefixgate hook: %s is already instrumented", type(cache).__name__)
    elif problem:
        logger.warning("prefixgate hook: %s cache not instrumented: %s", type(cache).__name__, problem)
    else:
        logger.info("prefixgate hook: radix-cache backend 'prefixgate' instrumented %s", type(cache).__name__)
    return cache


def _register_backend(module: types.ModuleType) -> str | None:
    if not _backend_mode():
        return "skipped"
    register = getattr(module, "register_radix_cache_backend", None)
    if register is None:
        return "no register_radix_cache_backend"
    if "prefixgate" not in module.registered_radix_cache_backends():
        register("prefixgate", _backend_factory)
    return None


PATCHES = {
    "sglang.srt.mem_cache.radix_cache": Patch("sglang", _TESTED, _patch_radix),
    "sglang.srt.mem_cache.unified_radix_cache": Patch("sglang", _TESTED, _patch_unified),
    "sglang.srt.mem_cache.registry": Patch("sglang", _TESTED, _register_backend),
}
