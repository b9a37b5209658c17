"""What an engine holds of whole prompts, recognised blocks or not: chunk-hash chains and a bounded prefix index.

The block index (:mod:`scheduler.index`) sees only prompts whose blocks were recognised. This module sees every
prompt: the bytes the engine sees (as the gateway renders them: model, tools, each message's role and text in
order) are cut into ``CHUNK_BYTES`` chunks, and chunk ``i`` is named by a digest of *everything up to its end*
(a running hash, so equal names mean equal prefixes). Two prompts share ``common(a, b)`` leading chunks; an
engine that was sent a prompt holds its leading chunks (until it evicts them).

``PrefixIndex`` remembers the chunk names of every prompt sent to one engine replica, least recently sent first
out, bounded by a chunk count. A prompt's chunks are touched last chunk first, so the head of a prompt is always
fresher than its tail and eviction trims prompts from their ends: ``match`` is a binary search over the chain.

Costs: building a chain is one blake2b pass over the prompt (``MAX_CHUNKS`` at most); ``add``
touches each chunk once; ``match`` and ``common`` are O(log n) lookups or compares.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b

__all__ = ["CHUNK_BYTES", "MAX_CHUNKS", "Chain", "Hashes", "PrefixIndex", "common"]

CHUNK_BYTES = 256
MAX_CHUNKS = 4096  # a prompt's first 1 MiB: beyond it a chain stops growing (bounded CPU and memory per request)

Hashes = tuple[bytes, ...]


class Chain:
    """The chunk names of a prompt fed in pieces (``update``); ``hashes`` names each complete chunk."""

    __slots__ = ("_hasher", "_room", "hashes")

    def __init__(self) -> None:
        self._hasher = blake2b(digest_size=12)
        self._room = CHUNK_BYTES  # bytes until the current chunk is complete
        self.hashes: list[bytes] = []

    def update(self, data: bytes | bytearray | memoryview | object) -> None:
        view = memoryview(data)  # type: ignore[arg-type]  # bytes, or msgspec.Raw (a buffer)
        size = view.nbytes
        if size < self._room:
            self._hasher.update(view)
            self._room -= size
            return
        hasher, hashes, room, position = self._hasher, self.hashes, self._room, 0
        while size - position >= room:
            if len(hashes) >= MAX_CHUNKS:
                self._room = CHUNK_BYTES
                return
            hasher.update(view[position : position + room])
            position += room
            hashes.append(hasher.digest())
            room = CHUNK_BYTES
        hasher.update(view[position:])
        self._room = room - (size - position)

    def freeze(self) -> Hashes:
        return tuple(self.hashes)


def common(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """Leading chunks two chains share (names are cumulative: equal at ``i`` means equal before it)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[middle - 1] == b[middle - 1]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixIndex:
    """The chunks of every prompt sent to one engine replica, bounded to ``max_chunks`` (least recently sent out)."""

    __slots__ = ("_held", "max_chunks")

    def __init__(self, max_chunks: int = 1 << 16) -> None:
        if max_chunks < 1:
            raise ValueError("a prefix index holds at least one chunk")
        self.max_chunks = max_chunks
        # an OrderedDict rather than cachetools' LRUCache: ``add`` touches every chunk of a prompt, and the C
        # implementation's move_to_end is ~20x cheaper per touch than a pure-Python cache's bookkeeping
        self._held: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def add(self, chain: Sequence[bytes]) -> None:
        """The engine was sent a prompt with these chunk names: it now holds all of them."""
        held = self._held
        for name in reversed(chain):  # the head touched last: evicted last
            try:
                held.move_to_end(name)
            except KeyError:
                held[name] = None
        while len(held) > self.max_chunks:
            held.popitem(last=False)

    def match(self, chain: Sequence[bytes]) -> int:
        """How many leading chunks of ``chain`` the engine is believed to hold."""
        held, low, high = self._held, 0, len(chain)
        while low < high:
            middle = (low + high + 1) // 2
            if chain[middle - 1] in held:
                low = middle
            else:
                high = middle - 1
        return low

    def clear(self) -> None:
        self._held.clear()
