"""prefixgate's in-engine eviction hook: tells the gateway which requests' prompts left an engine's prefix cache.

This one stdlib-only file is the whole hook, so that it can be copied on its own into an engine's environment
(``python hook.py --install`` installs it there as ``prefixgate_hook.py`` plus ``prefixgate_hook.pth``). Inside
prefixgate's own environment it is ``engines.hooks.hook`` and ``prefixgate install-hook`` writes the ``.pth``.

Activation: the ``.pth`` line checks ``PREFIXGATE_INDEX_URL`` (or ``CONTEXTPILOT_INDEX_URL``) itself and imports
nothing when neither is set. When one is set, :func:`activate` puts a ``sys.meta_path`` finder in front that
patches an engine module right after it is first imported. Only the engine processes that import those modules
pay anything. The environment is read here directly: this code runs inside engines, not under the gateway's
``Settings``.

What is reported, and when. A request is reported (once) when the cache entry holding the last full block or page
of its *prompt*, its "prompt tail", leaves the cache in every tier: tokens it generated do not count. Its
prompt is then no longer fully reusable. Requests that share a prefix share entries only up to the fork, so
evicting one request's tail does not report the others. A finished request whose prompt tail was never cached
(caching off, aborted during prefill, prompt shorter than one block) is reported when it is released. A full
reset reports every tracked request. ``PREFIXGATE_HOOK_MAX_TRACKED`` (default 100,000) bounds the bookkeeping per
cache. Past it the oldest request is reported early, so the gateway forgets it rather than keep a ghost.

- vLLM v1 (tested 0.33.0): ``KVCacheManager.free``/``pop_blocks_for_free`` record the request's prompt-tail
  block hash per KV-cache group. ``BlockPool._remove_cached_block_hashes`` is the chokepoint for every hash
  removal: LRU reuse in ``get_new_blocks``, ``evict_blocks``, direct ``_maybe_evict_cached_block`` calls and
  partial-block replacement. Removals are settled when the outermost ``BlockPool`` call returns, so hashes that
  ``move_block_hashes`` or a partial-to-full promotion re-inserts are not reported. ``reset_prefix_cache``
  reports everything. The ``-<8 hex>`` suffix that vLLM appends to external ids is stripped. A ``BlockPool``
  without ``_remove_cached_block_hashes`` (older v1) is followed through ``_maybe_evict_cached_block``
  (best effort, untested).
- SGLang (tested 0.5.23): ``checkpoint`` (``checkpoint_into_tree`` on the unified tree) records the node that
  holds the request's prompt tail. Classic ``RadixCache`` reports in ``_delete_leaf`` and ``reset``.
  ``UnifiedRadixCache`` works with both TreeCore backends (Rust default, Python). It checks the victims
  of ``_evict_device_leaf`` and their ancestors. A node that is only demoted to the host tier keeps its requests
  until ``evict_host`` or ``_drop_subtree_no_host`` removes it. ``PREFIXGATE_HOOK_SGLANG=backend`` leaves the
  classes alone and registers a ``prefixgate`` radix-cache backend (``--radix-cache-backend prefixgate``) that
  instruments only the cache it builds. Older layouts without ``checkpoint`` (``cache_finished_req`` and
  ``cache_unfinished_req`` instead) are not patched.

Anything that does not match is left alone with a warning. An untested version whose internals match is
patched with a warning. A failure in the hook's own bookkeeping is logged once and never reaches the engine.

Sending never happens on the engine's thread. Ids go to a bounded queue (``PREFIXGATE_HOOK_QUEUE``, default
100,000; overflow is dropped and counted). A daemon thread coalesces them for a few milliseconds and POSTs
``{"request_ids": [...]}`` to ``{index_url}/evict`` over one kept-alive connection, with the bearer token from
``PREFIXGATE_ADMIN_TOKEN``. It retries with exponential backoff while the gateway is down.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import threading
import time
import types
import urllib.parse
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import http.client

# http.client, json, argparse, shutil and sysconfig are imported where used: an engine process that never
# evicts, or any other process that merely has the variable set, does not pay for them (http.client ~20 ms).

__all__ = [
    "INDEX_URL_VARS",
    "PTH_NAME",
    "STANDALONE_MODULE",
    "TOKEN_VAR",
    "EvictionReporter",
    "Residency",
    "activate",
    "index_url",
    "install_standalone",
    "instrument_sglang_radix_cache",
    "instrument_sglang_unified_cache",
    "main",
    "patch_module",
    "patch_targets",
    "pth_line",
    "remove_standalone",
    "set_sink",
    "vllm_external_id",
]

INDEX_URL_VARS = ("PREFIXGATE_INDEX_URL", "CONTEXTPILOT_INDEX_URL")
TOKEN_VAR = "PREFIXGATE_ADMIN_TOKEN"  # noqa: S105 (the variable's name, not a secret)
STANDALONE_MODULE = "prefixgate_hook"
PTH_NAME = STANDALONE_MODULE + ".pth"
_MARK = "__prefixgate_hook__"
_STATE = "_prefixgate_state"
_TESTED = {"vllm": ("0.33.",), "sglang": ("0.5.23",)}

logger = logging.getLogger("prefixgate.hook")
_Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def index_url(environ: Mapping[str, str] = os.environ) -> str | None:
    """The gateway URL the hook reports to, or ``None`` when the hook is off."""
    for name in INDEX_URL_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def pth_line(module: str) -> str:
    """The one ``.pth`` line: reads the environment itself, imports ``module`` only when the hook is on."""
    check = " or ".join(f"os.environ.get({name!r})" for name in INDEX_URL_VARS)
    return f"import os; ({check}) and __import__({module!r}, fromlist=['activate']).activate()\n"


# ---------------------------------------------------------------------------------------------------- sending


class EvictionReporter:
    """Posts evicted request ids to ``{index_url}/evict`` from a daemon thread; :meth:`report` never blocks."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_queue: int = 100_000,
        max_batch: int = 2048,
        coalesce_s: float = 0.005,
        timeout_s: float = 2.0,
        backoff_s: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._https = parts.scheme == "https"
        self._address = (parts.hostname, parts.port)
        self._path = parts.path.rstrip("/") + "/evict"
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._max_queue, self._max_batch = max_queue, max_batch
        self._coalesce_s, self._timeout_s, self._backoff_s = coalesce_s, timeout_s, backoff_s
        self.stats = {"accepted": 0, "dropped": 0, "sent": 0, "posts": 0, "failed_posts": 0, "rejected": 0}
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        # Also runs in a forked child: the parent's thread, locks and socket are not usable there.
        self._queue: collections.deque[str] = collections.deque()
        self._wakeup = threading.Event()
        self._settled = threading.Condition()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_used = False
        self._busy = False
        self._closing = False
        self._failing = False
        self._warned_at = 0.0
        self._dropped_seen = self.stats["dropped"]

    def report(self, request_ids: Iterable[str]) -> int:
        """Queue ids for sending; returns how many were accepted (the rest were dropped and counted)."""
        queue, room, accepted = self._queue, self._max_queue - len(self._queue), 0
        for rid in request_ids:
            if accepted < room:
                queue.append(rid)
                accepted += 1
            else:
                self.stats["dropped"] += 1
        if accepted:
            self.stats["accepted"] += accepted
            if self._thread is None:
                self._start()
            if not self._wakeup.is_set():
                self._wakeup.set()
        return accepted

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="prefixgate-evict-sender", daemon=True)
                self._thread.start()
                atexit.register(self.close, 0.5)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued id was sent or given up; ``False`` on timeout (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._settled.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Make one last attempt for what is queued (bounded by ``timeout``), then stop the thread."""
        self._closing = True
        self._stop.set()
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._disconnect()

    def _run(self) -> None:
        pending: list[str] = []
        backoff = self._backoff_s[0]
        while True:
            if not pending:
                if not self._queue:
                    if self._closing:
                        break
                    self._wakeup.wait(5.0)
                    self._wakeup.clear()  # a report after this sets it again; one before it left an id
                    continue
                if not self._closing and len(self._queue) < self._max_batch:
                    time.sleep(self._coalesce_s)  # let a burst of evictions join one request
            self._busy = True
            pending = self._take(pending)
            if pending and not self._post(pending):
                if self._closing:
                    break
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._backoff_s[1])
                continue
            pending, backoff = [], self._backoff_s[0]
            if self.stats["dropped"] != self._dropped_seen:
                self._dropped_seen = self.stats["dropped"]
                self._warn("prefixgate hook: eviction queue full (%d ids): reports dropped", self._max_queue)
            with self._settled:
                self._busy = False
                self._settled.notify_all()
        with self._settled:
            self._busy = False
            self._queue.clear()
            self._settled.notify_all()
        self._disconnect()

    def _take(self, pending: list[str]) -> list[str]:
        batch = dict.fromkeys(pending)
        queue = self._queue
        while queue and len(batch) < self._max_batch:
            batch[queue.popleft()] = None
        return list(batch)

    def _post(self, ids: list[str]) -> bool:
        """One POST; ``True`` when the batch is done with (accepted, or refused for good)."""
        import http.client
        import json

        body = json.dumps({"request_ids": ids}).encode()
        for _attempt in range(2):
            reused = self._conn is not None and self._conn_used
            try:
                conn = self._conn or self._connect()
                conn.request("POST", self._path, body, self._headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._disconnect()
                if reused:
                    continue  # the server closed an idle kept-alive connection: retry once on a fresh one
                self.stats["failed_posts"] += 1
                self._failing = True
                self._warn("prefixgate hook: cannot reach %s (%s); retrying with backoff", self.url, exc)
                return False
            self._conn_used = True
            if response.will_close:
                self._disconnect()
            self.stats["posts"] += 1
            if 200 <= response.status < 300:
                self.stats["sent"] += len(ids)
                if self._failing:
                    self._failing = False
                    logger.info("prefixgate hook: %s reachable again [stats %s]", self.url, self.stats)
                return True
            if response.status in (408, 429) or response.status >= 500:
                self.stats["failed_posts"] += 1
                self._failing = True
                self._warn("prefixgate hook: %s/evict answered %d; retrying with backoff", self.url, response.status)
                return False
            self.stats["rejected"] += len(ids)
            self._warn("prefixgate hook: %s/evict refused the report (HTTP %d); dropped", self.url, response.status)
            return True
        return False

    def _connect(self) -> http.client.HTTPConnection:
        import http.client

        host, port = self._address
        factory = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = factory(host, port, timeout=self._timeout_s)
        self._conn_used = False
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 30.0:
            self._warned_at = now
            logger.warning(message + " [stats %s]", *args, self.stats)


def _reset_after_fork(ref: weakref.ref[EvictionReporter]) -> None:
    reporter = ref()
    if reporter is not None:
        reporter._reset()


_sink: Callable[[Iterable[str]], object] = lambda ids: None  # noqa: E731 (replaced by activate/set_sink)


def set_sink(sink: Callable[[Iterable[str]], object]) -> None:
    """Where patched engines send evicted request ids (an :class:`EvictionReporter`'s ``report`` when active)."""
    global _sink
    _sink = sink


_failed: set[str] = set()


def _safely(work: Callable[..., Any], *args: Any) -> Any:
    """Run hook bookkeeping inside an engine method: a failure is logged (once per kind), never raised."""
    try:
        return work(*args)
    except Exception:
        if work.__name__ not in _failed:
            _failed.add(work.__name__)
            logger.exception(
                "prefixgate hook: %s failed; the engine is unaffected, reports may be missing", work.__name__
            )
        return None


def _emit(ids: Iterable[str]) -> None:
    _safely(_sink, ids)


class Residency:
    """Which requests each cache entry (a vLLM hash key, an SGLang node id) is the prompt tail of; bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_entry: dict[Hashable, set[str]] = {}
        self.by_rid: dict[str, tuple[Hashable, ...]] = {}

    def attach(self, rid: str, entries: Sequence[Hashable]) -> list[str]:
        """Make ``entries`` the prompt tail of ``rid``; returns the oldest requests forgotten to stay in bounds."""
        self.detach(rid)
        self.by_rid[rid] = tuple(entries)
        for entry in entries:
            self.by_entry.setdefault(entry, set()).add(rid)
        forgotten = []
        while len(self.by_rid) > self.limit:
            oldest = next(iter(self.by_rid))
            self.detach(oldest)
            forgotten.append(oldest)
        return forgotten

    def detach(self, rid: str) -> None:
        for entry in self.by_rid.pop(rid, ()):
            rids = self.by_entry.get(entry)
            if rids is not None:
                rids.discard(rid)
                if not rids:
                    del self.by_entry[entry]

    def evict(self, entry: Hashable) -> list[str]:
        """The entry left the cache: forget and return the requests whose prompt tail it was."""
        rids = self.by_entry.pop(entry, None)
        if not rids:
            return []
        for rid in rids:
            self.detach(rid)
        return sorted(rids)

    def clear(self) -> list[str]:
        rids = list(self.by_rid)
        self.by_rid.clear()
        self.by_entry.clear()
        return rids


def _int_env(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        logger.warning("prefixgate hook: %s=%r is not an integer; using %d", name, raw, default)
        return default


def _state(cache: Any) -> Any:
    state = cache.__dict__.get(_STATE)
    if state is None:
        limit = _int_env("PREFIXGATE_HOOK_MAX_TRACKED", 100_000)
        state = types.SimpleNamespace(residency=Residency(limit), depth=0, removed=[], host_only=set())
        cache.__dict__[_STATE] = state
    return state


def _attach(cache: Any, rid: str, entries: Sequence[Hashable]) -> None:
    forgotten = _state(cache).residency.attach(rid, entries)
    if forgotten:
        _emit(forgotten)


def _finished(req: Any) -> bool:
    check = getattr(req, "finished", None) or getattr(req, "is_finished", None)
    return bool(check()) if callable(check) else True


def _uncached(cache: Any, rid: str, req: Any) -> None:
    """Nothing of the request's prompt is cached: a finished request is reported at once."""
    if _finished(req):
        _state(cache).residency.detach(rid)
        _emit([rid])


# ---------------------------------------------------------------------------------------------------- vLLM

_VLLM_SUFFIX = re.compile(r"-[0-9a-f]{8}\Z")


def vllm_external_id(request_id: str, randomized: bool = True) -> str:
    """The id the client sent: vLLM >= 0.1x runs requests as ``<external id>-<8 hex>`` unless told not to."""
    return _VLLM_SUFFIX.sub("", request_id, count=1) if randomized else request_id


def _vllm_ids_randomized() -> bool:
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


def _vllm_settle(pool: Any, state: Any) -> None:
    removed, state.removed = state.removed, []
    residency = state.residency
    if not residency.by_entry:
        return
    gone: list[str] = []
    for key in removed:
        if key in residency.by_entry and not _still_cached(pool, key):
            gone.extend(residency.evict(key))
    if gone:
        _emit(gone)


def _vllm_outer(orig: Callable[..., Any]) -> Callable[..., Any]:
    """Settle hash removals once, when the outermost BlockPool call returns (re-inserted hashes are not gone)."""

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _state(self)
        state.depth += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            state.depth -= 1
            if not state.depth and state.removed:
                _safely(_vllm_settle, self, state)

    return wrapper


def _vllm_removed(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, block: Any) -> Any:
        removed = orig(self, block)
        if removed:
            state = _state(self)
            state.removed.extend(removed)
            if not state.depth:
                _safely(_vllm_settle, self, state)
        return removed

    return wrapper


def _vllm_legacy_evict(orig: Callable[..., Any]) -> Callable[..., Any]:
    """For BlockPools without ``_remove_cached_block_hashes``: the block's hash before eviction is what left."""

    @functools.wraps(orig)
    def wrapper(self: Any, block: Any) -> Any:
        key = getattr(block, "block_hash", None)
        evicted = orig(self, block)
        if evicted and key is not None:
            state = _state(self)
            state.removed.append(key)
            if not state.depth:
                _safely(_vllm_settle, self, state)
        return evicted

    return wrapper


def _vllm_reset(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        done = orig(self, *args, **kwargs)
        if done:
            state = _state(self)
            state.removed.clear()
            rids = state.residency.clear()
            if rids:
                _emit(rids)
        return done

    return wrapper


def _vllm_release(randomized: bool) -> _Wrap:
    def decorate(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            _safely(_vllm_track, self, request, randomized)
            return orig(self, request, *args, **kwargs)

        return wrapper

    return decorate


def _vllm_track(manager: Any, request: Any, randomized: bool) -> None:
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
        _uncached(pool, rid, request)
    for owner, keys in tails.items():
        _attach(owner, rid, keys)


def _patch_vllm_block_pool(module: types.ModuleType) -> str | None:
    cls = getattr(module, "BlockPool", None)
    needed = ("get_new_blocks", "evict_blocks", "reset_prefix_cache", "_maybe_evict_cached_block")
    if cls is None or not all(hasattr(cls, name) for name in needed):
        return "BlockPool lacks " + ", ".join(n for n in needed if not hasattr(cls, n)) if cls else "no BlockPool"
    wraps: dict[str, _Wrap] = {"reset_prefix_cache": _vllm_reset}
    for name in ("get_new_blocks", "evict_blocks", "cache_full_blocks", "cache_partial_block", "move_block_hashes"):
        if hasattr(cls, name):
            wraps[name] = _vllm_outer
    if hasattr(cls, "_remove_cached_block_hashes"):
        wraps["_remove_cached_block_hashes"] = _vllm_removed
    else:
        wraps["_maybe_evict_cached_block"] = _vllm_legacy_evict
    return _wrap_class(cls, wraps)


def _patch_vllm_kv_cache_manager(module: types.ModuleType) -> str | None:
    cls = getattr(module, "KVCacheManager", None)
    if cls is None or not hasattr(cls, "free") or not hasattr(cls, "get_blocks"):
        return "KVCacheManager lacks free/get_blocks"
    release = _vllm_release(_vllm_ids_randomized())
    return _wrap_class(cls, {name: release for name in ("free", "pop_blocks_for_free") if hasattr(cls, name)})


# ---------------------------------------------------------------------------------------------------- SGLang


def _prompt_pages_len(cache: Any, req: Any) -> int:
    page = max(int(getattr(cache, "page_size", 1) or 1), 1)
    return len(req.origin_input_ids) // page * page


def _sgl_radix_attach(cache: Any, req: Any) -> None:
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
            _attach(cache, rid, (n.id,))
            return
        end = start
    _uncached(cache, rid, req)


def _sgl_unified_attach(cache: Any, req: Any) -> None:
    node_id, rid = getattr(req, "last_node", None), getattr(req, "rid", None)
    if not isinstance(rid, str):
        return
    prompt_len = _prompt_pages_len(cache, req)
    if node_id is not None and prompt_len > 0 and not cache.tree_core.is_root(node_id):
        for info in reversed(cache.tree_core.collect_path_info([node_id])[0]):
            if info.path_start < prompt_len:
                _attach(cache, rid, (info.node_id,))
                return
    _uncached(cache, rid, req)


def _sgl_after_checkpoint(attach: Callable[[Any, Any], None]) -> _Wrap:
    def decorate(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
            result = orig(self, req, *args, **kwargs)
            _safely(attach, self, req)
            return result

        return wrapper

    return decorate


def _sgl_on_release(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, req, *args, **kwargs)
        rid = getattr(req, "rid", None)
        if not kwargs.get("checkpointed", True) and isinstance(rid, str):
            _safely(_uncached, self, rid, req)
        return result

    return wrapper


def _sgl_delete_leaf(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, node, *args, **kwargs)
        rids = _state(self).residency.evict(getattr(node, "id", None))
        if rids:
            _emit(rids)
        return result

    return wrapper


def _sgl_reset(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        state = _state(self)
        state.host_only.clear()
        rids = state.residency.clear()
        if rids:
            _emit(rids)
        return result

    return wrapper


def _sgl_check(cache: Any, state: Any, node_ids: Iterable[Hashable]) -> None:
    """Report tracked nodes that left the tree; remember the ones that live on only in the host tier."""
    tree, residency, gone = cache.tree_core, state.residency, []
    for node_id in node_ids:
        if node_id not in residency.by_entry:
            state.host_only.discard(node_id)
            continue
        try:
            on_host_only = tree.is_full_device_evicted(node_id)
        except KeyError:
            state.host_only.discard(node_id)
            gone.extend(residency.evict(node_id))
            continue
        if on_host_only:
            state.host_only.add(node_id)
        else:
            state.host_only.discard(node_id)
    if gone:
        _emit(gone)


def _sgl_path(cache: Any, node_id: Any) -> list[Any]:
    """The ids of ``node_id`` and its ancestors (both TreeCore backends answer ``collect_path_info``)."""
    return [info.node_id for info in cache.tree_core.collect_path_info([node_id])[0]]


def _sgl_victim(*, with_host_only: bool) -> _Wrap:
    """``_evict_device_leaf(node_id, ...)``: the victim and its tombstone ancestors may leave the tree.

    ``_drop_subtree_no_host`` also drops the victim's host-only descendants, hence ``with_host_only``.
    """

    def decorate(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(self: Any, node_id: Any, *args: Any, **kwargs: Any) -> Any:
            state = _state(self)
            if not state.residency.by_entry:
                return orig(self, node_id, *args, **kwargs)
            path = _safely(_sgl_path, self, node_id) or []
            result = orig(self, node_id, *args, **kwargs)
            _safely(_sgl_check, self, state, [*path, *state.host_only] if with_host_only else path)
            return result

        return wrapper

    return decorate


def _sgl_demoted(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``_demote(node_id, ...)`` (write-back): the node now lives on only in the host tier."""

    @functools.wraps(orig)
    def wrapper(self: Any, node_id: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, node_id, *args, **kwargs)
        _safely(_sgl_check, self, _state(self), [node_id])
        return result

    return wrapper


def _sgl_host_evicted(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``evict_host``: host-only nodes may leave the tree (the Rust core does not say which)."""

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        state = _state(self)
        if state.host_only:
            _safely(_sgl_check, self, state, list(state.host_only))
        return result

    return wrapper


_RADIX_WRAPS: dict[str, _Wrap] = {"_delete_leaf": _sgl_delete_leaf, "reset": _sgl_reset, "on_release": _sgl_on_release}
_UNIFIED_WRAPS: dict[str, _Wrap] = {
    "reset": _sgl_reset,
    "on_release": _sgl_on_release,
    "_evict_device_leaf": _sgl_victim(with_host_only=False),
    "_drop_subtree_no_host": _sgl_victim(with_host_only=True),
    "_demote": _sgl_demoted,
    "evict_host": _sgl_host_evicted,
}


def _radix_wraps(cls: Any) -> dict[str, _Wrap] | str:
    if not hasattr(cls, "checkpoint") or not hasattr(cls, "_delete_leaf"):
        return "RadixCache has no checkpoint/_delete_leaf (the older cache_finished_req layout is not supported)"
    wraps = {name: wrap for name, wrap in _RADIX_WRAPS.items() if hasattr(cls, name)}
    return {**wraps, "checkpoint": _sgl_after_checkpoint(_sgl_radix_attach)}


def _unified_wraps(cls: Any) -> dict[str, _Wrap] | str:
    missing = [n for n in ("checkpoint", "_evict_device_leaf", "reset") if not hasattr(cls, n)]
    if missing:
        return "UnifiedRadixCache lacks " + ", ".join(missing)
    wraps = {name: wrap for name, wrap in _UNIFIED_WRAPS.items() if hasattr(cls, name)}
    entry = "checkpoint_into_tree" if hasattr(cls, "checkpoint_into_tree") else "checkpoint"
    return {**wraps, entry: _sgl_after_checkpoint(_sgl_unified_attach)}


def instrument_sglang_radix_cache(target: Any) -> str | None:
    """Instrument the classic ``RadixCache`` class or one cache instance; a reason string when it does not fit."""
    wraps = _radix_wraps(target if isinstance(target, type) else type(target))
    return wraps if isinstance(wraps, str) else _wrap(target, wraps)


def instrument_sglang_unified_cache(target: Any) -> str | None:
    """Instrument ``UnifiedRadixCache`` (the class or one instance); a reason string when it does not fit."""
    wraps = _unified_wraps(target if isinstance(target, type) else type(target))
    return wraps if isinstance(wraps, str) else _wrap(target, wraps)


def _sglang_backend_mode() -> bool:
    return os.environ.get("PREFIXGATE_HOOK_SGLANG", "patch").strip().lower() == "backend"


def _patch_sglang_radix(module: types.ModuleType) -> str | None:
    if _sglang_backend_mode():
        return "skipped"
    cls = getattr(module, "RadixCache", None)
    return instrument_sglang_radix_cache(cls) if cls is not None else "no RadixCache"


def _patch_sglang_unified(module: types.ModuleType) -> str | None:
    if _sglang_backend_mode():
        return "skipped"
    cls = getattr(module, "UnifiedRadixCache", None)
    return instrument_sglang_unified_cache(cls) if cls is not None else "no UnifiedRadixCache"


def _sglang_backend_factory(ctx: Any) -> Any:
    registry = importlib.import_module("sglang.srt.mem_cache.registry")
    cache = registry.default_radix_cache_factory(ctx)
    unified = importlib.import_module("sglang.srt.mem_cache.unified_radix_cache").UnifiedRadixCache
    problem = (instrument_sglang_unified_cache if isinstance(cache, unified) else instrument_sglang_radix_cache)(cache)
    if problem == "skipped":
        logger.info("prefixgate hook: %s is already instrumented", type(cache).__name__)
    elif problem:
        logger.warning("prefixgate hook: %s cache not instrumented: %s", type(cache).__name__, problem)
    else:
        logger.info("prefixgate hook: radix-cache backend 'prefixgate' instrumented %s", type(cache).__name__)
    return cache


def _register_sglang_backend(module: types.ModuleType) -> str | None:
    if not _sglang_backend_mode():
        return "skipped"
    register = getattr(module, "register_radix_cache_backend", None)
    if register is None:
        return "no register_radix_cache_backend"
    if "prefixgate" not in module.registered_radix_cache_backends():
        register("prefixgate", _sglang_backend_factory)
    return None


# ---------------------------------------------------------------------------------------------------- patching


def _wrap(target: Any, wraps: Mapping[str, _Wrap]) -> str | None:
    """Wrap methods of a class, or of one instance (bound with ``MethodType``); ``"skipped"`` if done before."""
    if isinstance(target, type):
        return _wrap_class(target, wraps)
    if target.__dict__.get(_MARK) or type(target).__dict__.get(_MARK):
        return "skipped"
    for name, wrap in wraps.items():
        target.__dict__[name] = types.MethodType(wrap(getattr(type(target), name)), target)
    target.__dict__[_MARK] = tuple(wraps)
    return None


def _wrap_class(cls: type, wraps: Mapping[str, _Wrap]) -> str | None:
    if cls.__dict__.get(_MARK):
        # Another copy of the hook (the package and the standalone file both installed) came first.
        logger.debug("prefixgate hook: %s already patched", cls.__qualname__)
        return "skipped"
    if getattr(cls, "_contextpilot_patched", False):
        logger.warning("prefixgate hook: ContextPilot's hook also patches %s; evictions go to both", cls.__qualname__)
    for name, wrap in wraps.items():
        setattr(cls, name, wrap(getattr(cls, name)))
    setattr(cls, _MARK, tuple(wraps))
    return None


_PATCHES: dict[str, tuple[str, Callable[[types.ModuleType], str | None]]] = {
    "vllm.v1.core.block_pool": ("vllm", _patch_vllm_block_pool),
    "vllm.v1.core.kv_cache_manager": ("vllm", _patch_vllm_kv_cache_manager),
    "sglang.srt.mem_cache.radix_cache": ("sglang", _patch_sglang_radix),
    "sglang.srt.mem_cache.unified_radix_cache": ("sglang", _patch_sglang_unified),
    "sglang.srt.mem_cache.registry": ("sglang", _register_sglang_backend),
}


def patch_targets() -> tuple[str, ...]:
    """The engine modules the hook patches when they are imported."""
    return tuple(_PATCHES)


def patch_module(module: types.ModuleType) -> bool:
    """Patch one supported engine module in place; warns (never raises) when its internals do not fit."""
    engine, patch = _PATCHES[module.__name__]
    version = str(getattr(sys.modules.get(engine), "__version__", "unknown"))
    try:
        problem = patch(module)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem == "skipped":
        return False
    if problem:
        logger.warning(
            "prefixgate hook: %s %s does not match the supported internals (%s); evictions from %s are not reported",
            engine,
            version,
            problem,
            module.__name__,
        )
        return False
    tested = version.startswith(_TESTED[engine])
    logger.log(
        logging.INFO if tested else logging.WARNING,
        "prefixgate hook: patched %s (%s %s%s)",
        module.__name__,
        engine,
        version,
        "" if tested else f"; untested, tested with {'/'.join(_TESTED[engine])}*",
    )
    return True


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, spec: importlib.machinery.ModuleSpec) -> None:
        self._loader, self._spec = loader, spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # Put the real loader back first: inspect/linecache and reloads must not see this wrapper.
        self._spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        patch_module(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the engine modules we patch it wraps the real loader to patch after exec."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, spec)
                return spec
        return None


_active: EvictionReporter | None = None


def _configure_logging(environ: Mapping[str, str]) -> None:
    # At .pth time nothing is configured yet: give the hook its own stderr handler so its lines show up
    # once, whatever logging set-up the engine does later.
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    level = environ.get("PREFIXGATE_HOOK_LOG_LEVEL", "INFO").strip().upper()
    logger.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)


def activate(environ: Mapping[str, str] = os.environ) -> EvictionReporter | None:
    """Turn the hook on in this process when an index URL is configured (the ``.pth`` calls this); idempotent.

    Never raises: a broken hook must not keep an engine (or any other Python process) from starting.
    """
    global _active
    url = index_url(environ)
    if _active is not None or url is None:
        return _active
    try:
        _configure_logging(environ)
        reporter = EvictionReporter(
            url, token=environ.get(TOKEN_VAR) or None, max_queue=_int_env("PREFIXGATE_HOOK_QUEUE", 100_000, environ)
        )
    except ValueError as exc:
        logger.warning("prefixgate hook: disabled, bad index URL (%s)", exc)
        return None
    except Exception:
        logger.exception("prefixgate hook: disabled, activation failed")
        return None
    _active = reporter
    set_sink(reporter.report)
    sys.meta_path.insert(0, _PatchingFinder())
    for name in _PATCHES:
        module = sys.modules.get(name)
        if module is not None:
            patch_module(module)
    logger.debug("prefixgate hook: active in pid %d, reporting to %s", os.getpid(), url)
    return reporter


# ---------------------------------------------------------------------------------------------------- install


def _site_dir(site_dir: Path | None) -> Path:
    import sysconfig

    return site_dir if site_dir is not None else Path(sysconfig.get_paths()["purelib"])


def install_standalone(site_dir: Path | None = None) -> list[Path]:
    """Copy this file as ``prefixgate_hook.py`` plus its ``.pth`` into ``site_dir`` (default: this purelib)."""
    import shutil

    target = _site_dir(site_dir)
    target.mkdir(parents=True, exist_ok=True)
    module, pth = target / f"{STANDALONE_MODULE}.py", target / PTH_NAME
    if Path(__file__).resolve() != module.resolve():
        shutil.copyfile(__file__, module)
    pth.write_text(pth_line(STANDALONE_MODULE))
    return [module, pth]


def remove_standalone(site_dir: Path | None = None) -> list[Path]:
    """Remove what :func:`install_standalone` wrote; returns the paths that existed."""
    target = _site_dir(site_dir)
    removed = []
    for path in (target / PTH_NAME, target / f"{STANDALONE_MODULE}.py"):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python prefixgate_hook.py --install|--remove [--site-dir DIR]`` for the interpreter that runs it."""
    import argparse

    parser = argparse.ArgumentParser(description="prefixgate eviction hook for vLLM/SGLang (standalone install)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--install", action="store_true", help="install into this interpreter's site-packages")
    action.add_argument("--remove", action="store_true", help="remove it again")
    parser.add_argument("--site-dir", type=Path, default=None, help="default: sysconfig purelib")
    args = parser.parse_args(argv)
    paths = remove_standalone(args.site_dir) if args.remove else install_standalone(args.site_dir)
    verb = "removed" if args.remove else "installed"
    for path in paths:
        print(f"{verb} {path}")
    if not paths:
        print("nothing to remove")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
