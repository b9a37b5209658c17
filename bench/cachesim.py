"""A paged radix prefix-cache simulator with LRU leaf eviction (SGLang RadixCache semantics).

Prompts are given as *segments* ``(segment id, token count)`` (documents, the question) instead of tokens, which
makes a 12,000-query run take a fraction of a second. This is exact under one assumption that the workload
generator guarantees in practice: two different segments differ at their first token, so two prompts share
exactly the tokens of their common leading segments.

Page size 16: only full pages are stored (a prompt of T tokens stores ``T // 16 * 16`` of them) and a hit is the
shared token prefix rounded down to a page. When the stored tokens exceed the capacity, least recently used
leaves are evicted whole (never the request being served), and the ids of the requests whose tail lived in an
evicted leaf are reported, like the SGLang eviction hook does, so the caller can forward them to ``/evict``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import count

__all__ = ["PrefixCacheSim", "Served"]


@dataclass(frozen=True)
class Served:
    prompt_tokens: int
    cached_tokens: int
    evicted: list[str]  # request ids whose cached tail was evicted while serving this request


class _Node:
    __slots__ = ("alive", "children", "key", "last", "parent", "request_ids", "tokens")

    def __init__(self, key: Hashable, tokens: int, parent: _Node | None, last: int) -> None:
        self.key = key
        self.tokens = tokens
        self.parent = parent
        self.last = last
        self.children: dict[Hashable, _Node] = {}
        self.request_ids: list[str] = []
        self.alive = True


class PrefixCacheSim:
    """Serve prompts one at a time and account cached vs computed prompt tokens."""

    def __init__(self, capacity_tokens: float = math.inf, page_size: int = 16) -> None:
        self.capacity = capacity_tokens
        self.page_size = page_size
        self.root = _Node(None, 0, None, 0)
        self.size = 0  # stored tokens
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.evicted_requests = 0
        self._clock = 0
        self._heap: list[tuple[int, int, _Node]] = []
        self._seq = count()

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def serve(self, request_id: str, segments: Sequence[tuple[Hashable, int]]) -> Served:
        self._clock += 1
        total = sum(length for _, length in segments)
        stored_end = total // self.page_size * self.page_size
        node, position, matched, contiguous = self.root, 0, 0, True
        for key, length in segments:
            stored = min(length, stored_end - position)
            if stored <= 0:
                break
            child = node.children.get(key)
            if child is None:
                contiguous = False
                child = node.children[key] = _Node(key, stored, node, self._clock)
                self.size += stored
            else:
                if contiguous:
                    matched += min(child.tokens, stored)
                    contiguous = child.tokens >= length
                if child.tokens < stored:
                    self.size += stored - child.tokens
                    child.tokens = stored
                child.last = self._clock
            node = child
            position += length
        cached = matched // self.page_size * self.page_size
        if node is not self.root:
            node.request_ids.append(request_id)
            heapq.heappush(self._heap, (self._clock, next(self._seq), node))
        evicted = self._evict() if self.size > self.capacity else []
        self.prompt_tokens += total
        self.cached_tokens += cached
        return Served(total, cached, evicted)

    def _evict(self) -> list[str]:
        evicted: list[str] = []
        heap = self._heap
        while self.size > self.capacity and heap:
            last, _, node = heapq.heappop(heap)
            if not node.alive or node.children or node.last != last:
                continue  # stale entry
            if last == self._clock:  # only the request being served is left
                heapq.heappush(heap, (last, next(self._seq), node))
                break
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            node.alive = False
            self.size -= node.tokens
            evicted.extend(node.request_ids)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last, next(self._seq), parent))
        self.evicted_requests += len(evicted)
        return evicted
