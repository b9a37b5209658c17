"""Joint routing and reordering: rank the healthy replicas by their live indexes, plan the request once, for the best.

The router is the proxy's planner (``Router.plan`` has ``Planner.plan``'s contract and returns a
:class:`RoutedRequest`, a ``PlannedRequest`` that also names its replica). With one replica it is that replica's
planner plus load accounting. With several, one planner shared by the replicas (its rewrite memo, the text scans
and learned boundaries) plans the request, and the replica is chosen at the plan's *first index lookup*: the
first block group's prefix key does not depend on any replica's order, so

1. every healthy replica's live index is asked how many of that group's blocks it holds
   (``LiveIndex.cached``: a trie walk, no ordering), which is turned into predicted cached tokens, and the
   replicas are ranked with :func:`gateway.upstream.ranking.rank` (cache against load, balance guard, affinity);
2. that lookup and every later one are answered by the winner's index, so the prompt is ordered for the cache
   of the replica it goes to, and committed only to that replica's index. A request without block groups is
   ranked on load alone once planned;
3. the plan gets a ``reroute``: if the request cannot be *sent* (connection refused), the proxy asks for the
   same request planned for the next replica in the ranking. A request that was sent is never retried.

One plan per request, whatever the number of replicas: routing adds the ranking (a trie walk per replica) and the
conversation's digest. Big bodies are planned in a worker thread (``in_thread``); the ranking, and the router's
reads and writes of replica state, then run on the event loop, like the planner's index reads.

Load is tracked per replica while a request is in flight: one request, and its predicted uncached prompt tokens
(the prefill it queues) until the engine answers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.from_thread
import msgspec
from cachetools import LRUCache
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.planning.plan import PlannedRequest
from gateway.upstream.ranking import BalanceGuard, Candidate, rank
from gateway.upstream.replicas import Pending, Replica, ReplicaSet
from gateway.wire.chat import RequestBody
from scheduler.index import Plan
from scheduler.prefixes import Hashes

if TYPE_CHECKING:
    from gateway.planning.planner import Planner

__all__ = ["RoutedRequest", "Router"]

logger = logging.getLogger("prefixgate.router")

T = TypeVar("T")
_CHARS_PER_TOKEN = 4
_RANK_BUDGET = 8  # trie nodes a ranking walk may visit per replica (the winner's plan searches the index's budget)
_SESSION_HEADERS = ("x-prefixgate-session", "x-session-id", "x-contextpilot-session")
_encoder = msgspec.json.Encoder()


def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class RoutedRequest(PlannedRequest):
    """A plan made for one replica: the replica it goes to (``upstream``), that replica's load while the request
    is in flight, and ``reroute`` (the same request planned for the next replica, when this one is unreachable)."""

    __slots__ = ("_done", "_pending", "_queued", "conversation", "ranking", "replica", "router", "tenant", "tried")

    replica: Replica
    router: Router
    conversation: bytes | None
    ranking: tuple[Replica, ...]
    tried: tuple[Replica, ...]
    tenant: str | None
    _queued: int
    _done: bool
    _pending: Pending

    @classmethod
    def of(cls, planned: PlannedRequest, replica: Replica, router: Router, queued: int) -> RoutedRequest:
        routed = cls.__new__(cls)
        for name in PlannedRequest.__slots__:
            setattr(routed, name, getattr(planned, name))
        routed.residency = replica.residency  # a plan made by the shared planner is committed to its replica only
        routed.upstream = replica
        routed.replica, routed.router, routed._queued, routed._done = replica, router, queued, False
        routed.conversation, routed.ranking, routed.tried, routed.tenant = None, (), (replica,), None
        routed._pending = router.replicas.started(replica)
        replica.in_flight += 1
        replica.queued_tokens += queued
        return routed

    def accept(self) -> None:
        self._dequeue()
        self.router.accepted(self)
        super().accept()

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._dequeue()
            self.replica.in_flight -= 1
            self.router.replicas.ended(self._pending)
        super().finish()

    def responded(self, status: int) -> None:
        self.router.replicas.answered(self._pending, status)

    def failed(self, reason: str) -> None:
        self.router.replicas.request_failed(self._pending, reason)

    def reroute(self, body: RequestBody, headers: Mapping[str, str]) -> PlannedRequest | None:
        """The request could not be sent to this replica: the same request planned for the next one, or None."""
        return self.router.reroute(self, body, headers)

    def _dequeue(self) -> None:
        self.replica.queued_tokens -= self._queued
        self._queued = 0


class Router:
    """The proxy's planner when there are replicas to choose from (see the module docstring)."""

    def __init__(self, replicas: ReplicaSet, guard: BalanceGuard, metrics: Metrics, *, affinity_size: int = 100_000):
        self.replicas = replicas
        self.guard = guard
        # plans for every replica: the lookups of each request go to the index of the replica chosen for it
        self._shared: Planner = _planner(replicas.replicas[0]).sharing(_Replicas(replicas))
        self._affinity: LRUCache[bytes, Replica] = LRUCache(maxsize=affinity_size)
        self._next_passthrough = 0
        self.decisions = Counter(
            "prefixgate_routing_decisions",
            "Replica choices by what decided them (cache, load, affinity, balance, only, reroute)",
            ["reason"],
            registry=metrics.registry,
        )
        self.reroutes = Counter(
            "prefixgate_reroutes", "Requests sent to another replica because theirs could not be reached",
            registry=metrics.registry,
        )  # fmt: skip
        metrics.registry.register(_ReplicaCollector(replicas))

    @property
    def slot_count(self) -> int | None:
        """The first replica's llama.cpp slot count (``/health``)."""
        planner = self.replicas.replicas[0].planner
        return planner.slot_count if planner is not None else None

    # -- the planner interface ---------------------------------------------------------------------------
    def plan(
        self,
        body: RequestBody,
        request_id: str,
        headers: Mapping[str, str],
        *,
        in_thread: bool = False,
        tenant: str | None = None,
        handoff: bool = False,
    ) -> PlannedRequest:
        """Plan ``body`` for the best replica (``Planner.plan``'s contract; ``in_thread`` and ``handoff`` likewise)."""
        on_loop: Callable[..., Any] = anyio.from_thread.run_sync if in_thread else _call
        healthy: list[Replica] = on_loop(self.replicas.healthy)
        if not healthy:
            raise Unavailable("no healthy engine replica", code="no_healthy_replica")
        prompt_tokens = len(body.raw) // _CHARS_PER_TOKEN
        if len(healthy) == 1:
            planner = _planner(healthy[0])
            planned = planner.plan(body, request_id, headers, in_thread=in_thread, tenant=tenant, handoff=handoff)
            routed: RoutedRequest = on_loop(self._assign, planned, healthy[0], prompt_tokens, 0, "only")
            routed.tenant = tenant
            return routed
        conversation = _conversation(body, headers)
        if conversation is not None and tenant:  # one key's conversations never steer another key's routing
            conversation = tenant.encode() + b"\0" + conversation
        affine = on_loop(self._affine, healthy, conversation)
        sent = self._shared.sent_chain(body, headers, tenant)  # routing by the prompt as sent, rewritten or not
        choice = _Choice(self, healthy, prompt_tokens, affine, sent)
        planned = self._plan_with(
            choice, body, request_id, headers, in_thread=in_thread, tenant=tenant, handoff=handoff, sent=sent
        )
        if choice.ranking is None:  # no block group: ranked on load alone
            on_loop(choice.choose, ())
        assert choice.ranking is not None and choice.best is not None
        winner = choice.ranking[0]
        reason = self._reason(choice.best, affine, [r.in_flight for r in healthy])
        on_loop(_planner(winner).pin, planned, body)
        routed = on_loop(self._assign, planned, winner, prompt_tokens, choice.best.cached_tokens, reason)
        routed.conversation, routed.ranking, routed.tenant = conversation, tuple(choice.ranking), tenant
        return routed

    def passthrough(self) -> Replica:
        """Where a request the planner does not see (``/v1/models``, other ``/v1/*``) goes: round robin."""
        healthy = self.replicas.healthy()
        if not healthy:
            raise Unavailable("no healthy engine replica", code="no_healthy_replica")
        self._next_passthrough += 1
        return healthy[self._next_passthrough % len(healthy)]

    def accepted(self, routed: RoutedRequest) -> None:
        """``routed`` was accepted by its replica: remember where it went (evictions, affinity)."""
        replica = routed.replica
        if replica.flapped:
            self.replicas.succeeded(replica)
        replica.failures = 0
        self.replicas.sent_to(routed.request_id, replica)
        if routed.conversation is not None:
            self._affinity[routed.conversation] = replica

    def reroute(self, failed: RoutedRequest, body: RequestBody, headers: Mapping[str, str]) -> PlannedRequest | None:
        """``failed`` could not be sent: plan the request for the next healthy replica in its ranking (on the loop)."""
        self.replicas.request_failed(failed._pending, "connection failed")
        remaining = [r for r in failed.ranking if self.replicas.admits(r) and r not in failed.tried]
        if not remaining:
            return None
        self.reroutes.inc()
        logger.warning("replica %s unreachable; request sent to %s", failed.replica.name, remaining[0].name)
        choice = _Choice(self, remaining, 0, None, ())
        choice.ranking = remaining
        planned = self._plan_with(choice, body, failed.request_id, headers, in_thread=False, tenant=failed.tenant)
        _planner(remaining[0]).pin(planned, body)
        routed = self._assign(planned, remaining[0], len(body.raw) // _CHARS_PER_TOKEN, 0, "reroute")
        routed.conversation, routed.ranking, routed.tenant = failed.conversation, failed.ranking, failed.tenant
        routed.tried = (*failed.tried, remaining[0])
        return routed

    def _plan_with(
        self,
        choice: _Choice,
        body: RequestBody,
        request_id: str,
        headers: Mapping[str, str],
        *,
        in_thread: bool,
        tenant: str | None,
        handoff: bool = False,
        sent: Hashes | None = None,
    ) -> PlannedRequest:
        """Plan with the shared planner, its index lookups answered by ``choice`` (a shallow copy per request:
        the memo, scans and boundaries stay shared, only the residency is this request's)."""
        planner = copy.copy(self._shared)
        planner.residency = choice  # type: ignore[assignment]  # read: ``residency.index``, ``held_chars``
        return planner.plan(body, request_id, headers, in_thread=in_thread, tenant=tenant, handoff=handoff, sent=sent)

    # -- internals (on the event loop) ---------------------------------------------------------------------
    def _affine(self, healthy: list[Replica], conversation: bytes | None) -> Replica | None:
        """The conversation's replica, if it is healthy."""
        affine = self._affinity.get(conversation) if conversation is not None else None
        return affine if affine is not None and affine in healthy else None

    def rank(
        self,
        healthy: list[Replica],
        groups: Sequence[tuple[Hashable, Sequence[int]]],
        prompt_tokens: int,
        affine: Replica | None,
        sent: Hashes = (),
    ) -> tuple[list[Replica], Candidate]:
        """The replicas best first for a request whose block groups (prefix key, block ids) are ``groups`` and
        whose prompt as sent has the chunk names ``sent``: a replica's predicted cached tokens are the more of
        its blocks held and its prefix of the prompt as sent (a request left as sent is routed by its cache)."""
        total_blocks = sum(len(blocks) for _, blocks in groups)
        per_block = prompt_tokens / total_blocks if total_blocks else 0.0
        candidates = []
        for replica in healthy:
            residency = replica.residency
            cached = (
                sum(residency.index.cached(key, blocks, _RANK_BUDGET) for key, blocks in groups) if total_blocks else 0
            )
            as_sent = residency.held_chars(sent) // _CHARS_PER_TOKEN if sent else 0
            candidates.append(
                Candidate(replica.position, max(int(cached * per_block), as_sent), replica.in_flight,
                          replica.queued_tokens, replica.sent)
            )  # fmt: skip
        ranked = rank(candidates, prompt_tokens, self.guard, affine.position if affine is not None else None)
        by_position = self.replicas.replicas
        return [by_position[c.replica] for c in ranked], ranked[0]

    def _reason(self, best: Candidate, affine: Replica | None, loads: list[int]) -> str:
        if self.guard.imbalanced(loads):
            return "balance"
        if affine is not None and best.replica == affine.position:
            return "affinity"
        return "cache" if best.cached_tokens else "load"

    def _assign(
        self, planned: PlannedRequest, replica: Replica, prompt_tokens: int, cached: int, reason: str
    ) -> RoutedRequest:
        self.decisions.labels(reason).inc()
        if len(self.replicas) > 1:
            planned.result["replica"] = replica.name
        return RoutedRequest.of(planned, replica, self, max(0, prompt_tokens - cached))


class _Choice:
    """One request's replica, chosen at its first index lookup: the residency of the shared planner's copy for
    that request (the planner reads ``residency.index``: ``plan`` and ``held``; a plan then goes to the winner's
    index)."""

    __slots__ = ("affine", "best", "healthy", "prompt_tokens", "ranking", "router", "sent")

    def __init__(
        self, router: Router, healthy: list[Replica], prompt_tokens: int, affine: Replica | None, sent: Hashes
    ) -> None:
        self.router, self.healthy, self.prompt_tokens, self.affine = router, healthy, prompt_tokens, affine
        self.sent = sent
        self.ranking: list[Replica] | None = None
        self.best: Candidate | None = None

    @property
    def index(self) -> _Choice:
        return self

    def plan(self, key: Hashable, blocks: Sequence[int], unseen_as_sent: bool = False) -> Plan:
        """The winner's plan for one group; the first call ranks the replicas by this group (on the loop)."""
        if self.ranking is None:
            self.choose(((key, blocks),))
        assert self.ranking is not None
        return self.ranking[0].residency.index.plan(key, blocks, unseen_as_sent)

    def held(self, key: Hashable, sequence: Sequence[int]) -> int:
        """The winner's held leading blocks of one group sent in a known order; ranks as ``plan`` does."""
        if self.ranking is None:
            self.choose(((key, sequence),))
        assert self.ranking is not None
        return self.ranking[0].residency.index.held(key, sequence)

    def held_chars(self, chain: Hashes) -> int:
        """The winner's held characters of a whole prompt (``Residency.held_chars``); ranks as ``plan`` does."""
        if self.ranking is None:
            self.choose(())
        assert self.ranking is not None
        return self.ranking[0].residency.held_chars(chain)

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> None:
        self.ranking, self.best = self.router.rank(self.healthy, groups, self.prompt_tokens, self.affine, self.sent)


class _Replicas:
    """The shared planner's residency outside a request: only what its constructor registers (``on_reset``)."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def on_reset(self, hook: Callable[[], None]) -> None:
        # the shared memo is cleared when any replica's index is dropped, as each replica's own planner's is
        for replica in self._replicas.replicas:
            replica.residency.on_reset(hook)


def _planner(replica: Replica) -> Any:
    assert replica.planner is not None
    return replica.planner


def _conversation(body: RequestBody, headers: Mapping[str, str]) -> bytes | None:
    """The conversation a request belongs to: a session header, the body's ``user``, else its first two messages."""
    for header in _SESSION_HEADERS:
        value = headers.get(header)
        if value:
            return b"h" + blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    messages = body.messages
    if not messages:
        return None
    user = body.top.get("user")
    if user is not None:
        return b"u" + blake2b(bytes(user), digest_size=16).digest()
    # the affinity table lives in this process: Python's keyed string hash (SipHash, a per-process key) is enough
    # and several times cheaper than a digest of RAG-sized messages
    parts: list[object] = []
    for message in messages[:2]:
        content = message.content
        parts += (message.role, content if isinstance(content, str) or content is None else _encoder.encode(content))
    return b"m" + hash(tuple(parts)).to_bytes(8, "big", signed=True)


class _ReplicaCollector(Collector):
    """Per-replica health, load and index size, read when ``/metrics`` is scraped."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "prefixgate_replica_healthy", "1 while a replica takes requests", labels=["replica"]
        )
        ejected = GaugeMetricFamily(
            "prefixgate_replica_ejected", "1 while a replica is ejected for failed requests", labels=["replica"]
        )
        in_flight = GaugeMetricFamily(
            "prefixgate_replica_in_flight", "Requests in flight per replica", labels=["replica"]
        )
        queued = GaugeMetricFamily(
            "prefixgate_replica_queued_tokens",
            "Predicted uncached prompt tokens queued per replica",
            labels=["replica"],
        )
        index = GaugeMetricFamily(
            "prefixgate_replica_index_requests", "Live index requests per replica", labels=["replica"]
        )
        sent = CounterMetricFamily("prefixgate_replica_requests", "Requests accepted per replica", labels=["replica"])
        ejections = CounterMetricFamily(
            "prefixgate_replica_ejections", "Times a replica was ejected for failed requests", labels=["replica"]
        )
        drops = CounterMetricFamily(
            "prefixgate_replica_index_drops",
            "Times a replica's index was dropped (restart or event gap)",
            labels=["replica"],
        )
        now = self._replicas.clock()
        for r in self._replicas.replicas:
            healthy.add_metric([r.name], 1.0 if r.healthy and not r.ejected(now) else 0.0)
            ejected.add_metric([r.name], 1.0 if r.ejected(now) else 0.0)
            in_flight.add_metric([r.name], r.in_flight)
            queued.add_metric([r.name], r.queued_tokens)
            index.add_metric([r.name], len(r.residency.index))
            sent.add_metric([r.name], r.sent)
            ejections.add_metric([r.name], r.ejections)
            drops.add_metric([r.name], r.index_drops)
        yield from (healthy, ejected, in_flight, queued, index, sent, ejections, drops)
