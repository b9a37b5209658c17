"""What an engine holds of whole prompts, recognised blocks or not: chunk-hash chains and a bounded prefix index.

The block index (:mod:`scheduler.index`) sees only prompts whose blocks were recognised. This module sees every
prompt: the bytes the engine sees (as the gateway renders them: model, tools, each message's role and text in
order) are cut into ``CHUNK_BYTES`` chunks, and chunk ``i`` is named by a hash of *everything up to its end*
(chained over the chunks, so equal names mean equal prefixes). Two prompts share ``common(a, b)`` leading
chunks; an engine that was sent a prompt holds its leading chunks (until it evicts them).

``PrefixIndex`` remembers the chunk names of every prompt sent to one engine replica, least recently sent first
out, bounded by a chunk count. A prompt's chunks are touched last chunk first, so the head of a prompt is always
fresher than its tail and eviction trims prompts from their ends: ``match`` is a binary search over the chain.

A chunk is coarse for a short document: one of 200 bytes may end no chunk, so whether a prompt went on with it
is not told by the chunks alone. A forwarded prompt's paragraph starts are named too (``Chain(marked=True)``: a
*mark* names the prefix up to just after a blank line, ``marks``), and the index remembers the marks of what was
sent (``holds``): the planner then asks whether a prompt continued exactly with a block and the blank line after it.

Costs: building a chain is one hashing pass over the prompt (``MAX_CHUNKS`` at most); ``add``
touches each chunk once; ``match`` and ``common`` are O(log n) lookups or compares.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import chain

__all__ = ["CHUNK_BYTES", "MAX_CHUNKS", "MAX_MARKS", "Chain", "Hashes", "PrefixIndex", "common"]

CHUNK_BYTES = 256
MAX_CHUNKS = 4096  # a prompt's first 1 MiB: beyond it a chain stops growing (bounded CPU and memory per request)
MAX_MARKS = 1024  # paragraph starts named per prompt at most
_BLANK = re.compile(rb"\n\n")
_UNNAMED = -1  # Python's hash() never returns -1

Hashes = tuple[int, ...]


class Chain:
    """The chunk names of a prompt fed in pieces (``update``); ``hashes`` names each complete chunk.

    A name is Python's hash of (the previous name, the chunk's bytes): SipHash, keyed per process, so names cannot
    be forged from outside and cost one pass over the bytes (a running blake2b with a digest per chunk cost ~3x).
    The index that compares them lives in the same process.
    """

    __slots__ = ("_last", "_marked", "_newline", "_pending", "hashes", "marks")

    def __init__(self, *, marked: bool = False) -> None:
        self._last = 0
        self._pending = bytearray()  # the current chunk, while incomplete
        self._marked = marked  # whether ``marks`` names each paragraph's start (the prompt as forwarded)
        self._newline = False  # the last byte fed is a newline that ends no blank line yet
        self.hashes: list[int] = []
        self.marks: list[int] = []  # the name of the prefix up to just after each blank line (``MAX_MARKS``)

    def update(self, data: bytes | bytearray | memoryview | object) -> None:
        view = memoryview(data)  # type: ignore[arg-type]  # bytes, or msgspec.Raw (a buffer)
        if not view.nbytes:
            return
        start, marks = 0, self.marks
        if self._marked and len(marks) < MAX_MARKS:
            across = int(self._newline and view[0] == 10)  # a blank line across two pieces ends at byte 1
            for end in chain((1,) if across else (), (found.end() for found in _BLANK.finditer(view, across))):
                self._feed(view[start:end])
                start = end
                if len(marks) >= MAX_MARKS or (name := self.mark()) == _UNNAMED:
                    break
                marks.append(name)
        rest = view[start:]
        self._newline = self._marked and bool(rest.nbytes) and rest[-1] == 10
        self._feed(rest)

    def mark(self) -> int:
        """The name of the prompt fed so far, to the byte (a chunk name covers whole chunks only); past the chain's
        bound, a name no prompt holds."""
        if len(self.hashes) >= MAX_CHUNKS:
            return _UNNAMED
        return hash((self._last, bytes(self._pending), len(self.hashes)))

    @property
    def position(self) -> int:
        """Bytes fed so far (up to the chain's bound)."""
        return len(self.hashes) * CHUNK_BYTES + len(self._pending)

    def _feed(self, view: memoryview) -> None:
        size = view.nbytes
        pending, position = self._pending, 0
        if pending or size < CHUNK_BYTES:
            need = CHUNK_BYTES - len(pending)
            if size < need:
                pending += view
                return
            pending += view[:need]
            position = need
            chunk = bytes(pending)
            pending.clear()
            self._extend((chunk,))
        whole = (size - position) // CHUNK_BYTES
        if whole:
            end = position + whole * CHUNK_BYTES
            self._extend(view[i : i + CHUNK_BYTES].tobytes() for i in range(position, end, CHUNK_BYTES))
            position = end
        if position < size:
            pending += view[position:]

    def _extend(self, chunks: Iterable[bytes]) -> None:
        hashes, last = self.hashes, self._last
        room = MAX_CHUNKS - len(hashes)
        for chunk in chunks:
            if room <= 0:
                break
            last = hash((last, chunk))
            hashes.append(last)
            room -= 1
        self._last = last

    def freeze(self) -> Hashes:
        return tuple(self.hashes)

    def copy(self) -> Chain:
        """A chain that goes on from here independently (to try what would follow); it keeps no ``marks``."""
        other = Chain()
        other._last, other._pending, other.hashes = self._last, bytearray(self._pending), list(self.hashes)
        return other


def common(a: Sequence[int], b: Sequence[int]) -> int:
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
        self._held: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def add(self, chain: Sequence[int], marks: Sequence[int] = ()) -> None:
        """The engine was sent a prompt with these chunk names (and paragraph marks): it now holds all of them."""
        held = self._held
        for name in (*reversed(marks), *reversed(chain)):  # the head touched last: evicted last
            try:
                held.move_to_end(name)
            except KeyError:
                held[name] = None
        while len(held) > self.max_chunks:
            held.popitem(last=False)

    def match(self, chain: Sequence[int]) -> int:
        """How many leading chunks of ``chain`` the engine is believed to hold."""
        held, low, high = self._held, 0, len(chain)
        while low < high:
            middle = (low + high + 1) // 2
            if chain[middle - 1] in held:
                low = middle
            else:
                high = middle - 1
        return low

    def holds(self, mark: int) -> bool:
        """Whether a prompt sent went on to exactly this point (a ``Chain.mark``)."""
        return mark in self._held

    def clear(self) -> None:
        self._held.clear()
