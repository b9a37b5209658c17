"""The live index: online plan, commit, evict, caps, counters, snapshots."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler import LiveIndex, TrieView, block_ids
from scheduler.trie import Node

BIG = 2**64 - 5


def walk(root: Node) -> Iterator[tuple[tuple[int, ...], Node]]:
    """Every node below ``root`` with the full block path to its end."""
    stack = [((), root)]
    while stack:
        prefix, node = stack.pop()
        for block, child in (node.children or {}).items():
            assert child.label and child.label[0] == block
            path = prefix + child.label
            yield path, child
            stack.append((path, child))


def structure(view: TrieView) -> list[tuple[tuple[int, ...], int, int]]:
    return sorted((path, node.live, node.ends) for path, node in walk(view.root))


def check_trie(view: TrieView, paths: list[tuple[int, ...]]) -> tuple[int, int]:
    """Assert the trie holds exactly ``paths``, with no dead or mergeable node; return (blocks, radix nodes)."""
    assert view.root.live == len(paths)
    assert view.root.ends == sum(1 for path in paths if not path)
    blocks = nodes = 0
    for path, node in walk(view.root):
        through = [p for p in paths if p[: len(path)] == path]
        assert node.live == len(through) > 0, "dead or miscounted node"
        assert node.ends == sum(1 for p in through if p == path)
        assert node.ends or len(node.children or {}) != 1, "node should have been merged"
        assert node.reach >= max(len(p) for p in through) - (len(path) - len(node.label))
        blocks += len(node.label)
        nodes += 1
    assert blocks == len({path[:i] for path in paths for i in range(1, len(path) + 1)})
    return blocks, nodes


def longest_cached(paths: list[tuple[int, ...]], context: list[int]) -> int:
    """Brute force: the longest prefix of a live path made only of the context's blocks (as a multiset)."""
    best = 0
    for path in paths:
        have = Counter(context)
        length = 0
        for block in path:
            if not have[block]:
                break
            have[block] -= 1
            length += 1
        best = max(best, length)
    return best


block_values = st.integers(0, 6) | st.sampled_from([-1, BIG, 2**70])
contexts = st.lists(block_values, max_size=7)


class IndexMachine(RuleBasedStateMachine):
    """Random commits, evictions, snapshots against a plain model of the live requests and the LRU caps."""

    def __init__(self) -> None:
        super().__init__()
        self.index = LiveIndex(max_requests=6, max_nodes=25, search_budget=10_000)
        self.model: OrderedDict[str, tuple[Hashable, tuple[int, ...]]] = OrderedDict()
        self.number = 0
        self.views: list[tuple[TrieView, list[tuple[tuple[int, ...], int, int]]]] = []
        self.expected = Counter[str]()

    def paths(self, key: Hashable) -> list[tuple[int, ...]]:
        return [path for k, path in self.model.values() if k == key]

    def model_nodes(self) -> int:
        return sum(len({path[:i] for path in self.paths(key) for i in range(1, len(path) + 1)}) for key in ("a", "b"))

    @rule(key=st.sampled_from(["a", "b"]), context=contexts, planned=st.booleans())
    def commit(self, key: str, context: list[int], planned: bool) -> None:
        plan = self.index.plan(key, context)
        self.expected["plans"] += 1
        self.expected["hits"] += plan.cached > 0
        assert sorted(plan.order) == list(range(len(context)))
        assert [context[i] for i in plan.order] == list(plan.blocks)
        assert plan.cached == longest_cached(self.paths(key), context)
        assert any(path[: plan.cached] == plan.blocks[: plan.cached] for path in self.paths(key)) or not plan.cached
        self.number += 1
        self._commit(key, f"r{self.number}", tuple(plan.blocks if planned else context))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), context=contexts)
    def recommit(self, data: st.DataObject, context: list[int]) -> None:
        request_id = data.draw(st.sampled_from(list(self.model)))
        self.model.pop(request_id)
        self._commit("b", request_id, tuple(context))

    def _commit(self, key: str, request_id: str, path: tuple[int, ...]) -> None:
        self.index.commit(key, request_id, path)
        self.expected["inserts"] += 1
        self.model[request_id] = (key, path)
        while len(self.model) > 6 or self.model_nodes() > 25:
            self.model.popitem(last=False)
            self.expected["lru_evictions"] += 1

    @rule(data=st.data(), unknown=st.lists(st.sampled_from(["nope", "r0", "r-1"]), max_size=2))
    def evict(self, data: st.DataObject, unknown: list[str]) -> None:
        known = data.draw(st.lists(st.sampled_from(list(self.model) or ["none"]), max_size=3, unique=True))
        ids = [rid for rid in known if rid in self.model] + unknown
        result = self.index.evict(ids)
        assert result.evicted == [rid for rid in ids if rid in self.model]
        assert result.not_found == [rid for rid in ids if rid not in self.model]
        for rid in result.evicted:
            del self.model[rid]
        self.expected["evictions"] += len(result.evicted)
        assert self.index.evict(result.evicted).not_found == result.evicted  # idempotent

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def shorten(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(list(self.model)))
        key, path = self.model[request_id]
        keep = data.draw(st.integers(0, len(path) + 1))
        assert self.index.shorten(request_id, keep) == (keep < len(path))
        if keep == 0 and path:
            del self.model[request_id]
            self.expected["evictions"] += 1
        elif keep < len(path):
            self.model[request_id] = (key, path[:keep])
        assert not self.index.shorten("nope", 0)

    @rule(key=st.sampled_from(["a", "b"]))
    def snapshot(self, key: str) -> None:
        view = self.index.snapshot(key)
        self.views.append((view, structure(view)))

    @invariant()
    def consistent(self) -> None:
        assert self.index.request_ids() == list(self.model)
        blocks = nodes = 0
        for key in ("a", "b"):
            found = check_trie(self.index.snapshot(key), self.paths(key))
            blocks += found[0]
            nodes += found[1]
        for rid, (_, path) in self.model.items():
            assert self.index.path(rid) == path
        stats = self.index.stats()
        assert stats.requests == len(self.model) <= 6
        assert stats.nodes == blocks == self.model_nodes() <= 25
        assert stats.radix_nodes == nodes
        for name, value in self.expected.items():
            assert getattr(stats, name) == value, name
        for view, frozen in self.views:
            assert structure(view) == frozen, "a snapshot changed"


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_cached_path_first_then_canonical_order() -> None:
    index = LiveIndex()
    index.commit("k", "r1", [5, 3, 8])
    plan = index.plan("k", [1, 8, 3, 5, 2])
    assert plan.blocks[:3] == (5, 3, 8)
    assert plan.cached == 3
    assert [[1, 8, 3, 5, 2][i] for i in plan.order] == list(plan.blocks)
    # 5, 3, 8 are popular; 1 and 2 unseen: by id
    assert plan.blocks[3:] == (1, 2)


def test_partial_edge_counts() -> None:
    index = LiveIndex()
    index.commit("k", "r1", [1, 2, 3, 4])
    assert index.plan("k", [4, 2, 1, 9]).blocks[:2] == (1, 2)
    assert index.plan("k", [4, 2, 1, 9]).cached == 2


def test_canonical_order_converges_when_nothing_is_cached() -> None:
    index = LiveIndex()
    for number, context in enumerate([[7, 1, 3], [3, 7, 2], [9, 7, 3], [7, 5]]):
        index.commit("k", f"w{number}", context)
    index.evict([f"w{number}" for number in range(4)])  # nothing cached, popularity remembered
    first = index.plan("k", [1, 3, 8, 7]).blocks
    second = index.plan("k", [6, 7, 3, 4]).blocks
    assert first[:2] == second[:2] == (7, 3)  # the shared popular blocks lead, in the same order
    assert first[2:] == (1, 8) and second[2:] == (6, 4)  # then by popularity; new: the client's first, then id
    assert LiveIndex().plan("k", [3, 2, 1]).blocks == (3, 1, 2)  # unknown key: the client's first, then by id


def test_ties_prefer_more_live_requests_then_recency() -> None:
    index = LiveIndex()
    index.commit("k", "a1", [1, 9])
    index.commit("k", "b1", [2, 9])
    index.commit("k", "b2", [2, 8])
    assert index.plan("k", [1, 2, 5]).blocks[0] == 2  # two live requests under 2
    index.evict(["b2"])
    assert index.plan("k", [1, 2, 5]).blocks[0] == 2  # one each: 2 is more recent
    index.commit("k", "a2", [1, 7])
    assert index.plan("k", [1, 2, 5]).blocks[0] == 1


def test_longest_path_beats_the_more_popular_short_one() -> None:
    index = LiveIndex()
    for number in range(5):
        index.commit("k", f"p{number}", [1, 100 + number])
    index.commit("k", "long", [2, 3, 4, 5])
    plan = index.plan("k", [5, 4, 3, 2, 1])
    assert plan.blocks[:4] == (2, 3, 4, 5)
    assert plan.cached == 4


def test_duplicates_inside_a_context_are_kept() -> None:
    index = LiveIndex()
    index.commit("k", "r", [4, 4, 2])
    plan = index.plan("k", [2, 4, 3, 4, 4])
    assert sorted(plan.blocks) == [2, 3, 4, 4, 4]
    assert plan.blocks[:3] == (4, 4, 2) and plan.cached == 3


def test_keys_are_separate_and_request_ids_global() -> None:
    index = LiveIndex()
    index.commit(("replica-0", "m", 1), "r1", [1, 2])
    assert index.plan(("replica-1", "m", 1), [2, 1]).cached == 0
    assert index.plan(("replica-0", "m", 1), [2, 1]).cached == 2
    assert index.evict(["r1"]).evicted == ["r1"]
    assert index.stats().nodes == 0


def test_string_blocks_and_64_bit_ids() -> None:
    index = LiveIndex()
    docs = block_ids(["alpha", "beta", "gamma"])
    index.commit("k", "r1", [*docs, 2**64 - 1, -(2**63)])
    context = [-(2**63), *block_ids(["gamma", "alpha", "beta"]), 2**64 - 1]
    plan = index.plan("k", context)
    assert plan.cached == 5
    assert list(plan.blocks) == [*docs, 2**64 - 1, -(2**63)]


def test_request_cap_evicts_least_recently_committed() -> None:
    index = LiveIndex(max_requests=2)
    index.commit("k", "a", [1])
    index.commit("k", "b", [2])
    index.commit("k", "a", [3])  # recommit: "a" is now the most recent
    index.commit("k", "c", [4])
    assert index.request_ids() == ["a", "c"]
    assert index.stats().lru_evictions == 1
    assert index.plan("k", [2]).cached == 0


def test_node_cap_may_drop_the_new_request_itself() -> None:
    index = LiveIndex(max_nodes=3)
    index.commit("k", "small", [1, 2])
    index.commit("k", "huge", [5, 6, 7, 8])
    assert len(index) == 0
    assert index.stats().nodes == 0


def test_idle_keys_are_bounded() -> None:
    index = LiveIndex(max_keys=3)
    for number in range(10):
        index.commit(number, f"r{number}", [number])
        index.evict([f"r{number}"])
    assert len(index.cache_keys()) <= 3
    index.commit("busy", "live", [1])
    for number in range(10, 20):
        index.commit(number, f"r{number}", [number])
        index.evict([f"r{number}"])
    assert "busy" in index.cache_keys() and "live" in index


def test_fan_out_over_a_thousand() -> None:
    index = LiveIndex()
    for number in range(1500):
        index.commit("k", f"r{number}", [number, 10_000 + number, 20_000])
    assert len(index.snapshot("k").root.children or {}) == 1500
    plan = index.plan("k", [20_000, 10_777, 777, 5])
    assert plan.blocks[:3] == (777, 10_777, 20_000)
    result = index.evict([f"r{number}" for number in range(1500)])
    assert len(result.evicted) == 1500
    assert index.stats().nodes == 0 and index.stats().radix_nodes == 0
    assert not index.snapshot("k").root.children


def test_snapshot_is_stable_while_the_writer_continues() -> None:
    index = LiveIndex()
    for number in range(300):
        index.commit("k", f"r{number}", [number % 17, number % 5, number % 11, number])
    view = index.snapshot("k")
    probes = [[n % 17, n % 5, n % 11, n, 999] for n in range(0, 300, 7)]
    expected = [view.match(probe) for probe in probes]
    frozen = structure(view)
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if [view.match(probe) for probe in probes] != expected:
                errors.append("view changed")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for number in range(300, 3000):
            index.commit("k", f"r{number}", [number % 13, number % 7, number])
            index.evict([f"r{number - 300}"])
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert structure(view) == frozen
    assert view.requests == 300


def test_reset_keeps_counters() -> None:
    index = LiveIndex()
    index.commit("k", "r", [1, 2])
    index.reset()
    assert len(index) == 0 and index.stats().nodes == 0 and index.stats().inserts == 1
    assert index.evict(["r"]).not_found == ["r"]


@pytest.mark.parametrize("kwargs", [{"max_requests": 0}, {"max_nodes": 0}, {"popularity": "zipf"}])
def test_rejects_bad_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LiveIndex(**kwargs)  # type: ignore[arg-type]


def test_plan_unchanged_flag() -> None:
    index = LiveIndex()
    assert not index.plan("k", [1, 2, 3]).changed
    assert index.plan("k", [3, 2, 1]).changed


def test_requests_sharing_a_prefix() -> None:
    index = LiveIndex()
    index.commit("k", "a", [1, 2, 3])
    index.commit("k", "b", [1, 2, 4])
    index.commit("k", "c", [5, 2])
    index.commit("other", "d", [1, 2, 3])
    assert index.requests_sharing("k", [1, 2]) == ["a", "b"]
    assert index.requests_sharing("k", [1, 2, 3]) == ["a"]
    assert index.requests_sharing("k", []) == []
    assert index.requests_sharing("missing", [1]) == []
    index.evict(["a"])
    assert index.requests_sharing("k", [1]) == ["b"]


def test_a_new_key_past_the_cap_drops_the_least_recently_used_key_even_when_all_are_busy() -> None:
    index = LiveIndex(max_keys=2)
    index.commit("k1", "r1", [1, 2])
    index.commit("k2", "r2", [1, 2])
    index.commit("k1", "r1b", [3])  # k1 is now the most recently used
    index.commit("k3", "r3", [1, 2])
    assert index.cache_keys() == ["k1", "k3"]
    assert "r2" not in index and {"r1", "r1b", "r3"} <= set(index.request_ids())
    assert index.stats().lru_evictions == 1
    assert index.plan("k2", [1, 2]).cached == 0


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 30), st.lists(st.integers(0, 40), max_size=6), st.booleans()),
        max_size=80,
    )
)
def test_bounds_are_never_exceeded(ops: list[tuple[int, int, list[int], bool]]) -> None:
    index = LiveIndex(max_keys=3, max_requests=5, max_nodes=12, max_tracked_blocks=8)
    for key, number, blocks, evict in ops:
        if evict:
            index.evict([f"r{number}"])
        else:
            index.commit(key, f"r{number}", index.plan(key, blocks).blocks)
        stats = index.stats()
        assert stats.keys <= 3 and stats.requests <= 5 and stats.nodes <= 12
        assert all(len(index.popularity(k) or ()) <= 8 for k in index.cache_keys())
        assert set(index.request_ids()) <= {f"r{n}" for n in range(31)}
    live = [index.path(rid) for rid in index.request_ids()]
    assert all(path is not None for path in live)


def test_held_is_the_prefix_of_the_order_given_counted_as_a_plan() -> None:
    """The prediction for a text sent in an order the planner's memo chose before: only what the index holds in
    *that* order counts, not a better order of the same blocks."""
    index = LiveIndex()
    index.commit("k", "r1", [1, 2, 3, 4])
    before = index.stats()
    assert index.held("k", [1, 2, 3, 4, 9]) == 4
    assert index.held("k", [1, 2, 4, 3]) == 2  # 3 and 4 are held after 2 in the other order
    assert index.cached("k", [1, 2, 4, 3]) == 4  # what a new plan of the same blocks would predict
    assert index.held("k", [2, 1]) == 0
    assert index.held("other", [1, 2]) == 0
    after = index.stats()
    assert (after.plans, after.hits, after.planned_blocks, after.hit_blocks) == (
        before.plans + 4,
        before.hits + 2,
        before.planned_blocks + 5 + 4 + 2 + 2,
        before.hit_blocks + 4 + 2,
    )


def test_unseen_blocks_keep_the_order_sent_when_asked_and_seen_ones_lead_by_popularity() -> None:
    index = LiveIndex()
    for number, context in enumerate([[7, 1, 3], [3, 7, 2], [9, 7, 3]]):
        index.commit("k", f"w{number}", context)
    index.evict([f"w{number}" for number in range(3)])  # nothing cached, popularity remembered
    # 7 and 3 seen three times, 1 once; 8, 6 and 4 never: they follow in the order sent, not by id
    assert index.plan("k", [8, 1, 6, 3, 4, 7], unseen_as_sent=True).blocks == (3, 7, 1, 8, 6, 4)
    # by default: the client's first block (a retriever's top hit) leads the new ones, then by id
    assert index.plan("k", [8, 1, 6, 3, 4, 7]).blocks == (3, 7, 1, 8, 4, 6)
    assert index.plan("k", [1, 8, 6, 3, 4, 7]).blocks == (3, 7, 1, 4, 6, 8)  # the first is seen: all by id
    assert LiveIndex().plan("k", [3, 1, 2], unseen_as_sent=True).blocks == (3, 1, 2)  # unknown key: as sent
    assert LiveIndex().plan("k", [3, 1, 2], unseen_as_sent=True).order == (0, 1, 2)


def test_unseen_blocks_as_sent_still_follow_the_cached_path() -> None:
    index = LiveIndex()
    index.commit("k", "r1", [5, 2, 9])
    plan = index.plan("k", [4, 9, 2, 5], unseen_as_sent=True)
    assert plan.blocks == (5, 2, 9, 4) and plan.cached == 3


def test_with_sizes_blocks_nothing_else_orders_go_longest_first() -> None:
    index = LiveIndex()
    for number, context in enumerate([[7, 2], [3, 5], [9, 1]]):
        index.commit("k", f"w{number}", context)
    index.evict([f"w{number}" for number in range(3)])  # nothing cached, popularity remembered
    blocks, sizes = [8, 6, 4, 3, 7], [10, 40, 40, 20, 30]
    # 3 and 7 seen once each (no co-occurrence): 7 is the longer; then the new ones, 6 and 4 of one length as sent
    assert index.plan("k", blocks, unseen_as_sent=True, sizes=sizes).blocks == (7, 3, 6, 4, 8)
    # as sent, or the client's first then by id, only among blocks of one length
    assert index.plan("k", blocks, sizes=sizes).blocks == (7, 3, 4, 6, 8)
    assert index.plan("k", blocks).blocks == (3, 7, 8, 4, 6)  # without sizes: by id, the client's first new one first
    assert LiveIndex().plan("k", [3, 1, 2], sizes=[1, 1, 9]).blocks == (2, 3, 1)  # unknown key


def test_first_seen_popularity_takes_no_sizes() -> None:
    index = LiveIndex(popularity="first_seen")
    index.commit("k", "w", [5, 6])
    index.evict(["w"])  # nothing cached, the ranks of first sight remembered
    assert index.plan("k", [6, 5, 1, 2], sizes=[9, 1, 1, 9]).blocks == (5, 6, 1, 2)  # by rank, then unseen by id
