"""Which requests each cache entry is the prompt tail of, per cache instance, and where evicted ids go.

A request is reported (once) when the cache entry holding the last full block or page of its *prompt*, its
"prompt tail", leaves the cache in every tier: tokens it generated do not count. Requests that share a prefix
share entries only up to the fork, so evicting one request's tail does not report the others. A finished request
whose prompt tail was never cached (caching off, aborted during prefill, prompt shorter than one block) is
reported when it is released; a full reset reports every tracked request. ``PREFIXGATE_HOOK_MAX_TRACKED``
(default 100,000) bounds the bookkeeping per cache: past it the oldest request is reported early, so the gateway
forgets it rather than keep a ghost.

Everything here runs on the engine's own thread, inside the patched methods: it only touches dicts and hands ids
to the sink (the sender's non-blocking ``report``). A failure is logged once per kind and never raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CacheState",
    "PromptTails",
    "attach",
    "emit",
    "int_env",
    "safely",
    "set_sink",
    "state_of",
    "uncached",
]

logger = logging.getLogger("prefixgate.hook")

_STATE = "_prefixgate_state"


def _discard(_ids: Iterable[str]) -> None:
    return None


_sink: Callable[[Iterable[str]], object] = _discard
_failed: set[str] = set()


def set_sink(sink: Callable[[Iterable[str]], object] | None) -> None:
    """Where patched engines send evicted request ids (an ``EvictionReporter.report`` once active)."""
    global _sink
    _sink = sink if sink is not None else _discard


def safely(work: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run hook bookkeeping inside an engine method: a failure is logged (once per kind), never raised."""
    try:
        return work(*args, **kwargs)
    except Exception:
        name = getattr(work, "__name__", repr(work))
        if name not in _failed:
            _failed.add(name)
            logger.exception("prefixgate hook: %s failed; the engine is unaffected, reports may be missing", name)
        return None


def emit(ids: Iterable[str]) -> None:
    safely(_sink, ids)


def int_env(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        logger.warning("prefixgate hook: %s=%r is not an integer; using %d", name, raw, default)
        return default


class PromptTails:
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


@dataclass(slots=True)
class CacheState:
    """The hook's bookkeeping for one engine cache (a vLLM ``BlockPool``, an SGLang radix cache)."""

    tails: PromptTails
    depth: int = 0
    """vLLM: how many ``BlockPool`` calls are on the stack; removals are settled when it returns to 0."""
    removed: list[Hashable] = field(default_factory=list)
    """vLLM: hash keys removed during the current outermost call, not yet settled."""
    host_only: set[Hashable] = field(default_factory=set)
    """SGLang (unified tree): tracked nodes that live on only in the host tier."""


def state_of(cache: Any) -> CacheState:
    """The cache's :class:`CacheState`, created on first use (kept in the instance's ``__dict__``)."""
    state: CacheState | None = cache.__dict__.get(_STATE)
    if state is None:
        state = CacheState(PromptTails(int_env("PREFIXGATE_HOOK_MAX_TRACKED", 100_000)))
        cache.__dict__[_STATE] = state
    return state


def attach(cache: Any, rid: str, entries: Sequence[Hashable]) -> None:
    forgotten = state_of(cache).tails.attach(rid, entries)
    if forgotten:
        emit(forgotten)


def _finished(req: Any) -> bool:
    check = getattr(req, "finished", None) or getattr(req, "is_finished", None)
    return bool(check()) if callable(check) else True


def uncached(cache: Any, rid: str, req: Any) -> None:
    """Nothing of the request's prompt is cached: a finished request is reported at once."""
    if _finished(req):
        state_of(cache).tails.detach(rid)
        emit([rid])
