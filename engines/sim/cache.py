"""The simulated engine's KV prefix cache: a token-level radix tree with LRU eviction of leaves.

Modelled on SGLang's ``RadixCache`` (page size 1): edges hold token runs, a partial match splits an edge, eviction
pops the least recently used unlocked leaf and cascades to parents that become leaves, and ``pin``/``unpin`` play
the part of ``inc_lock_ref``/``dec_lock_ref`` for requests in flight. Unlike SGLang, each node also remembers which
request ids' *tails* (the last token of what they inserted) end on it, so an eviction can be reported as the request
ids whose cached sequence is no longer whole, which is what an in-engine eviction hook would send.

The capacity (in tokens) bounds the tree; pinned paths can hold it above capacity until they are unpinned. The
number of request ids remembered per node is bounded too: when it overflows, the oldest id is reported as evicted
(its tail is still cached, but it is superseded by newer requests with the same tail). Pure and synchronous.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CacheStats", "Pin", "RadixCache"]


class _Node:
    __slots__ = ("children", "epoch", "key", "last_access", "lock_ref", "owners", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, tick: int, epoch: int) -> None:
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.key = key
        self.last_access = tick
        self.lock_ref = 0
        self.owners: dict[str, None] | None = None
        self.epoch = epoch


class Pin:
    """A locked path, returned by ``RadixCache.pin``; ``RadixCache.unpin`` releases it (once)."""

    __slots__ = ("_epoch", "_node")

    def __init__(self, node: _Node | None, epoch: int) -> None:
        self._node = node
        self._epoch = epoch


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache counters (tokens unless named otherwise)."""

    capacity_tokens: int
    size_tokens: int
    node_count: int
    hit_tokens: int
    miss_tokens: int
    inserted_tokens: int
    evicted_tokens: int
    evicted_nodes: int
    evicted_requests: int
    tracked_requests: int


def _common_len(edge: tuple[int, ...], key: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of ``edge`` and ``key[start:]``, given that their first tokens are equal."""
    lo, hi = 1, min(len(edge), len(key) - start)
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if key[start : start + mid] == edge[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixCache:
    """Token-level radix prefix cache with a capacity in tokens and LRU leaf eviction."""

    def __init__(self, capacity_tokens: int, max_owners_per_node: int = 256) -> None:
        if capacity_tokens < 1:
            raise ValueError("capacity_tokens must be positive")
        if max_owners_per_node < 1:
            raise ValueError("max_owners_per_node must be positive")
        self.capacity = capacity_tokens
        self._max_owners = max_owners_per_node
        self._epoch = 0
        self._tick = 0
        self._seq = 0
        self.reset()

    def reset(self) -> None:
        """Drop everything, counters included; pins taken before stay valid to release but lock nothing."""
        self._epoch += 1
        self._root = _Node((), None, 0, self._epoch)
        self._heap: list[tuple[int, int, _Node]] = []
        self._tails: dict[str, list[_Node]] = {}
        self._evicted: dict[str, None] = {}
        self._size = 0
        self._nodes = 0
        self._hit = 0
        self._miss = 0
        self._inserted = 0
        self._evicted_tokens = 0
        self._evicted_nodes = 0
        self._evicted_requests = 0

    @property
    def size(self) -> int:
        """Tokens currently cached."""
        return self._size

    @property
    def node_count(self) -> int:
        """Nodes in the tree, the root excluded."""
        return self._nodes

    def stats(self) -> CacheStats:
        return CacheStats(
            capacity_tokens=self.capacity,
            size_tokens=self._size,
            node_count=self._nodes,
            hit_tokens=self._hit,
            miss_tokens=self._miss,
            inserted_tokens=self._inserted,
            evicted_tokens=self._evicted_tokens,
            evicted_nodes=self._evicted_nodes,
            evicted_requests=self._evicted_requests,
            tracked_requests=len(self._tails),
        )

    def _walk(self, key: tuple[int, ...]) -> tuple[list[_Node], int, _Node | None, int]:
        """Follow ``key`` down the tree: the fully matched nodes, the tokens they cover, and the child whose edge
        matches only partly (if any) with how many of its tokens match."""
        path: list[_Node] = []
        node, i, n = self._root, 0, len(key)
        while i < n:
            child = node.children.get(key[i])
            if child is None:
                break
            edge = child.key
            if key[i : i + len(edge)] != edge:
                return path, i, child, _common_len(edge, key, i)
            i += len(edge)
            node = child
            path.append(node)
        return path, i, None, 0

    def peek(self, tokens: Sequence[int]) -> int:
        """Length of the cached prefix of ``tokens``, without touching LRU order or counters."""
        _, full, _, partial = self._walk(tuple(tokens))
        return full + partial

    def match(self, tokens: Sequence[int], max_len: int | None = None) -> int:
        """Length of the cached prefix of ``tokens`` (at most ``max_len``); refreshes the matched nodes' LRU time.

        Counts the reported length as hit tokens and the rest of ``tokens`` as missed tokens.
        """
        key = tuple(tokens)
        self._tick += 1
        path, full, _, partial = self._walk(key)
        for node in path:
            node.last_access = self._tick
        if path and not path[-1].children:
            self._push(path[-1])
        matched = full + partial
        hit = matched if max_len is None else max(0, min(matched, max_len))
        self._hit += hit
        self._miss += len(key) - hit
        return hit

    def insert(self, tokens: Sequence[int], request_id: str | None = None) -> int:
        """Cache ``tokens`` (at most ``capacity`` of them) and make their last node a tail of ``request_id``.

        A previous tail of the same request id that is a prefix of this one is superseded (a request that inserts
        its prompt and later prompt + output has one tail). Evicts LRU leaves down to capacity. Returns the number
        of tokens newly cached.
        """
        key = tuple(tokens)
        if len(key) > self.capacity:
            key = key[: self.capacity]
        if not key:
            return 0
        self._tick += 1
        tick, epoch = self._tick, self._epoch
        node, i, n, added = self._root, 0, len(key), 0
        while i < n:
            child = node.children.get(key[i])
            if child is None:
                leaf = _Node(key[i:], node, tick, epoch)
                node.children[key[i]] = leaf
                added = n - i
                self._size += added
                self._nodes += 1
                node = leaf
                break
            edge = child.key
            if key[i : i + len(edge)] == edge:
                i += len(edge)
                node = child
                node.last_access = tick
                continue
            common = _common_len(edge, key, i)
            node = self._split(child, common, tick)
            i += common
        if not node.children:
            self._push(node)
        if request_id is not None:
            self._own(node, request_id)
        self._inserted += added
        if self._size > self.capacity:
            self._lock(node, 1)
            self._evict()
            self._lock(node, -1)
        return added

    def pin(self, tokens: Sequence[int]) -> Pin:
        """Lock the cached path of ``tokens`` against eviction until ``unpin``."""
        path, _, partly, _ = self._walk(tuple(tokens))
        node = partly or (path[-1] if path else self._root)
        if node is self._root:
            return Pin(None, self._epoch)
        self._lock(node, 1)
        return Pin(node, self._epoch)

    def unpin(self, pin: Pin) -> None:
        node, pin._node = pin._node, None
        if node is not None and pin._epoch == self._epoch:
            self._lock(node, -1)

    def drain_evicted(self) -> list[str]:
        """Request ids reported as evicted since the last call, oldest first, each once."""
        evicted = list(self._evicted)
        self._evicted.clear()
        return evicted

    def _lock(self, node: _Node, delta: int) -> None:
        bottom: _Node | None = node
        while bottom is not None and bottom is not self._root:
            bottom.lock_ref += delta
            bottom = bottom.parent
        if delta < 0 and node.lock_ref == 0 and not node.children and node.parent is not None:
            self._push(node)

    def _split(self, child: _Node, at: int, tick: int) -> _Node:
        """Cut ``child``'s edge after ``at`` tokens: ``child`` keeps the tail and its owners, a new parent the head."""
        parent = child.parent
        assert parent is not None
        edge = child.key
        head = _Node(edge[:at], parent, tick, self._epoch)
        head.lock_ref = child.lock_ref
        head.children[edge[at]] = child
        parent.children[edge[0]] = head
        child.key = edge[at:]
        child.parent = head
        self._nodes += 1
        return head

    def _push(self, node: _Node) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (node.last_access, self._seq, node))
        if len(self._heap) > 2 * self._nodes + 1024:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        heap: list[tuple[int, int, _Node]] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root and node.lock_ref == 0:
                self._seq += 1
                heap.append((node.last_access, self._seq, node))
        heapq.heapify(heap)
        self._heap = heap

    def _evict(self) -> None:
        root, epoch = self._root, self._epoch
        while self._size > self.capacity and self._heap:
            # _push may rebuild the heap into a new list, so always pop from the current one.
            when, _, node = heapq.heappop(self._heap)
            parent = node.parent
            if parent is None or node.epoch != epoch or node.children or node.lock_ref or when != node.last_access:
                continue
            del parent.children[node.key[0]]
            node.parent = None
            self._size -= len(node.key)
            self._evicted_tokens += len(node.key)
            self._evicted_nodes += 1
            self._nodes -= 1
            if node.owners:
                for request_id in list(node.owners):
                    self._forget(request_id)
            if parent is not root and not parent.children and not parent.lock_ref:
                self._push(parent)

    def _own(self, node: _Node, request_id: str) -> None:
        tails = self._tails.get(request_id)
        if tails is None:
            self._tails[request_id] = [node]
        elif not any(tail is node for tail in tails):
            ancestors: set[int] = set()
            up = node.parent
            while up is not None:
                ancestors.add(id(up))
                up = up.parent
            kept = []
            for tail in tails:
                if id(tail) in ancestors and tail.owners is not None:
                    tail.owners.pop(request_id, None)
                else:
                    kept.append(tail)
            kept.append(node)
            self._tails[request_id] = kept
        owners = node.owners
        if owners is None:
            owners = node.owners = {}
        owners.pop(request_id, None)
        owners[request_id] = None
        if len(owners) > self._max_owners:
            self._forget(next(iter(owners)))

    def _forget(self, request_id: str) -> None:
        for tail in self._tails.pop(request_id, ()):
            if tail.owners is not None:
                tail.owners.pop(request_id, None)
        self._evicted[request_id] = None
        self._evicted_requests += 1
