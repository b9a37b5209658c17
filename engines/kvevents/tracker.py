"""Which of the gateway's requests an engine still caches, learned from that engine's KV events.

No engine stores request ids on cache entries and no removal names a request, so the tracker keeps the
attribution itself: ``block hash → request ids`` and ``request id → block hashes``, filled from
``BlockStored.session_id`` (the gateway stamps its request id there; with vLLM's
``kv_cache_report_mode="full"`` a reused prefix is re-announced under the new request's id, so the reused
blocks are attributed to it as well). Blocks stored without a session id belong to no gateway request and
are not tracked, except that a new copy of a tracked block (an offload to another tier) is recorded.

Residency is per *location*, ``(medium, group_idx)``: a block stays cached while any tier and any KV-cache
group still holds it, so a GPU eviction that leaves a host copy (SGLang HiCache, vLLM offloading) does not
release anything; a prefix on a slower tier is still a hit that saves the prefill. ``media`` narrows the tiers
that count (``{"GPU"}`` to count device residency only). A missing medium is ``"GPU"`` on a store and "any
tier" on a removal; a missing ``group_idx`` is group 0 on a store and "any group" on a removal.

When a block is gone from every location, ``release`` decides which of its requests are released:

* ``"all"`` (default): when none of the request's blocks is left. Both engines evict leaf-first (vLLM frees
  a request's blocks tail-first into an LRU queue, SGLang evicts radix leaves), so the first block of a prefix
  is normally the last to go and ``"all"`` and ``"first"`` agree; ``"all"`` is the conservative choice
  when events are incomplete (a lost store, a prefix reused without ``kv_cache_report_mode="full"``).
* ``"first"``: when the request's first block goes; engines match prefixes from the root, so without it
  nothing of the request can hit even if later blocks linger (an out-of-order ``evict_blocks``).
* ``"any"``: as soon as any block goes, for a gateway that only wants fully cached prefixes.

Released ids go to ``on_evicted(ids)``, once per applied batch. ``AllBlocksCleared`` releases every tracked
request through ``on_evicted``, and nothing else: the stream is whole, so a request the gateway already sent but
whose stores are not yet published is cached *after* the clear (vLLM publishes the clear of ``/reset_prefix_cache``
with the next step's batch, together with the stores of the requests that step schedules, which the gateway
has long committed). ``reset()`` (an engine restart, an unrecoverable sequence gap: the state is unknown) first
releases every tracked request the same way, then calls ``on_reset()`` so the owner can also drop what the
tracker never saw (requests whose stores were lost).

Memory is bounded: past ``max_requests`` requests or ``max_blocks`` blocks the least recently stored-to
requests are released through ``on_evicted`` too (counted in ``dropped_requests``): a request the tracker no
longer watches could never be released later, and forgetting it errs towards "not cached".

Pure and synchronous, with a single writer: the subscriber's task on the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from engines.kvevents.wire import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EventBatch, UnknownEvent

__all__ = [
    "DEFAULT_MEDIUM",
    "EvictedCallback",
    "KVEventCounters",
    "KVEventTracker",
    "ReleasePolicy",
    "ResetCallback",
    "ShortenedCallback",
]

ReleasePolicy = Literal["all", "first", "any"]
EvictedCallback = Callable[[list[str]], None]
ShortenedCallback = Callable[[dict[str, int]], None]
ResetCallback = Callable[[], None]

DEFAULT_MEDIUM = "GPU"
"""The tier of a store that names none (vLLM's block pool and SGLang's device cache are GPU)."""

_Location = tuple[str, int]


@dataclass(slots=True)
class KVEventCounters:
    """Monotonic counters for one engine endpoint; the subscriber fills the transport ones."""

    batches: int = 0
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    unknown: int = 0
    """Events of an unknown type, plus ``malformed`` ones."""
    malformed: int = 0
    ignored_media: int = 0
    """Events for a tier outside ``media``."""
    resets: int = 0
    released_requests: int = 0
    """Every id passed to ``on_evicted``, whatever the cause."""
    dropped_requests: int = 0
    """Ids released because of ``max_requests``/``max_blocks``."""
    shortened_requests: int = 0
    """Ids passed to ``on_shortened``: the engine evicted the tail of their prompt and kept its head."""
    gaps: int = 0
    replays: int = 0
    replay_failures: int = 0
    restarts: int = 0
    duplicates: int = 0
    decode_errors: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Block:
    __slots__ = ("owners", "where")

    def __init__(self) -> None:
        self.where: set[_Location] = set()
        self.owners: dict[str, None] = {}  # insertion-ordered: releases come out in attribution order


class _Request:
    __slots__ = ("blocks", "chain", "first", "intact", "last", "tokens")

    def __init__(self, first: BlockHash, rooted: bool) -> None:
        self.first = first
        self.blocks: dict[BlockHash, None] = {}  # insertion-ordered set: prefix order
        # a request whose stores start at its prompt's first block (vLLM's ``kv_cache_report_mode="full"``
        # re-announces a reused prefix, the chain's first block has no parent): each block's position in the chain
        # and the tokens before it, and how many blocks lead the chain unbroken (``on_shortened``); None when the
        # chain's start is unknown
        self.chain: dict[BlockHash, tuple[int, int]] | None = {} if rooted else None
        self.last: BlockHash | None = None  # the chain's last block
        self.tokens = 0  # the chain's tokens
        self.intact = 0


class KVEventTracker:
    """Attribution of one engine's cached blocks to the gateway's request ids."""

    def __init__(
        self,
        *,
        on_evicted: EvictedCallback | None = None,
        on_reset: ResetCallback | None = None,
        on_shortened: ShortenedCallback | None = None,
        release: ReleasePolicy = "all",
        media: Collection[str] | None = None,
        max_requests: int = 100_000,
        max_blocks: int = 1_000_000,
    ) -> None:
        if release not in get_args(ReleasePolicy):
            raise ValueError(f"release must be one of {get_args(ReleasePolicy)}, not {release!r}")
        if max_requests < 1 or max_blocks < 1:
            raise ValueError("max_requests and max_blocks must be positive")
        self.on_evicted = on_evicted
        self.on_reset = on_reset
        self.release: ReleasePolicy = release
        self.media = None if media is None else frozenset(media)
        self.max_requests = max_requests
        self.max_blocks = max_blocks
        self.counters = KVEventCounters()
        self.on_shortened = on_shortened
        self._shortened: dict[str, int] = {}  # this batch's shortened requests: the tokens still held
        self._blocks: dict[BlockHash, _Block] = {}
        self._requests: OrderedDict[str, _Request] = OrderedDict()  # least recently stored-to first

    @property
    def tracked_requests(self) -> int:
        return len(self._requests)

    @property
    def tracked_blocks(self) -> int:
        return len(self._blocks)

    def is_cached(self, request_id: str) -> bool:
        return request_id in self._requests

    def blocks_of(self, request_id: str) -> tuple[BlockHash, ...]:
        """The request's blocks still cached, in the order they were stored."""
        request = self._requests.get(request_id)
        return () if request is None else tuple(request.blocks)

    def requests_holding(self, block_hash: BlockHash) -> frozenset[str]:
        block = self._blocks.get(block_hash)
        return frozenset() if block is None else frozenset(block.owners)

    def apply(self, batch: EventBatch) -> list[str]:
        """Apply one batch in order; returns every id passed to ``on_evicted`` meanwhile."""
        self.counters.batches += 1
        emitted: list[str] = []
        pending: list[str] = []
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(event, pending)
            elif isinstance(event, BlockRemoved):
                self._remove(event, pending)
            elif isinstance(event, AllBlocksCleared):
                self.counters.cleared += 1
                emitted += self._emit(pending)
                pending = []
                emitted += self._release_all()
            elif isinstance(event, UnknownEvent):
                self.counters.unknown += 1
                if event.malformed:
                    self.counters.malformed += 1
        emitted += self._emit(pending)
        shortened, self._shortened = self._shortened, {}
        for request_id in emitted:
            shortened.pop(request_id, None)
        if shortened and self.on_shortened is not None:
            self.counters.shortened_requests += len(shortened)
            self.on_shortened(shortened)
        return emitted

    def reset(self) -> list[str]:
        """Forget everything: release every tracked request, then call ``on_reset``."""
        released = self._release_all()
        self.counters.resets += 1
        if self.on_reset is not None:
            self.on_reset()
        return released

    def _release_all(self) -> list[str]:
        released = list(self._requests)
        self._requests.clear()
        self._blocks.clear()
        return self._emit(released)

    def forget(self, request_id: str) -> bool:
        """Stop tracking a request the gateway released by itself; no callback."""
        if request_id not in self._requests:
            return False
        self._release(request_id, [])
        return True

    def _emit(self, ids: list[str]) -> list[str]:
        if ids:
            self.counters.released_requests += len(ids)
            if self.on_evicted is not None:
                self.on_evicted(ids)
        return ids

    def _counts(self, medium: str) -> bool:
        if self.media is None or medium in self.media:
            return True
        self.counters.ignored_media += 1
        return False

    def _store(self, event: BlockStored, released: list[str]) -> None:
        self.counters.stored += 1
        medium = event.medium or DEFAULT_MEDIUM
        if not self._counts(medium) or not event.block_hashes:
            return
        location = (medium, event.group_idx or 0)
        request_id = event.session_id
        if not request_id:
            for block_hash in event.block_hashes:
                known = self._blocks.get(block_hash)
                if known is not None:
                    known.where.add(location)
            return
        request = self._requests.get(request_id)
        if request is None:
            rooted = event.parent_block_hash is None and self.on_shortened is not None
            request = self._requests[request_id] = _Request(event.block_hashes[0], rooted)
        else:
            self._requests.move_to_end(request_id)
        size = event.block_size or len(event.token_ids) // len(event.block_hashes)
        chain = request.chain
        if chain is not None and (size <= 0 or event.parent_block_hash != request.last):
            request.chain = chain = None  # a store that does not continue the chain: its extent is unknown
        for block_hash in event.block_hashes:
            block = self._blocks.get(block_hash)
            if block is None:
                block = self._blocks[block_hash] = _Block()
            block.where.add(location)
            block.owners[request_id] = None
            if chain is not None and block_hash not in chain:
                chain[block_hash] = (len(chain), request.tokens)
                request.intact += request.intact == len(chain) - 1
                request.tokens += size
                request.last = block_hash
            request.blocks[block_hash] = None
        while len(self._requests) > self.max_requests or len(self._blocks) > self.max_blocks:
            self.counters.dropped_requests += 1
            self._release(next(iter(self._requests)), released)

    def _remove(self, event: BlockRemoved, released: list[str]) -> None:
        self.counters.removed += 1
        medium, group = event.medium, event.group_idx
        if medium is not None and not self._counts(medium):
            return
        for block_hash in event.block_hashes:
            block = self._blocks.get(block_hash)
            if block is None:
                continue
            block.where = {
                (where_medium, where_group)
                for where_medium, where_group in block.where
                if (medium is not None and where_medium != medium) or (group is not None and where_group != group)
            }
            if block.where:
                continue
            del self._blocks[block_hash]
            for request_id in tuple(block.owners):
                self._lose(request_id, block_hash, released)

    def _lose(self, request_id: str, block_hash: BlockHash, released: list[str]) -> None:
        request = self._requests[request_id]
        del request.blocks[block_hash]
        if not request.blocks or self.release == "any" or (self.release == "first" and block_hash == request.first):
            self._release(request_id, released)
            return
        place = request.chain.get(block_hash) if request.chain is not None else None
        if place is not None and place[0] < request.intact:  # the chain now breaks here: the engine holds what's before
            request.intact = place[0]
            self._shortened[request_id] = place[1]

    def _release(self, request_id: str, released: list[str]) -> None:
        request = self._requests.pop(request_id)
        for block_hash in request.blocks:
            block = self._blocks[block_hash]
            del block.owners[request_id]
            if not block.owners:
                del self._blocks[block_hash]
        released.append(request_id)
