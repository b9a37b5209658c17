"""Joint routing and reordering: rank the healthy replicas by their live indexes, plan the request once, for the best.

The router is the proxy's planner (``Router.plan`` has ``Planner.plan``'s contract and returns a
``PlannedRequest`` whose ``upstream`` is its replica and whose ``routing`` is a :class:`Route`). With one replica
it is that replica's planner plus load accounting. With several, one planner shared by the replicas (its rewrite
memo, the text scans and learned boundaries) plans the request against a :class:`ReplicaChoice` (an ``IndexView``,
see ``gateway.planning.residency``), whose ``choose`` the planner calls explicitly at the plan's *first index lookup*:
the first block group's prefix key does not depend on any replica's order, so

1. every healthy replica's live index is asked how many of that group's blocks it holds
   (``LiveIndex.cached``: a trie walk, no ordering), which is turned into predicted cached tokens, and the
   replicas are ranked with :func:`gateway.upstream.ranking.rank` (cache against load, balance guard, affinity);
2. ``choose`` returns the winner's residency: that lookup and every later one read the winner's index, so the
   prompt is ordered for the cache of the replica it goes to, and committed only to that replica's index. A
   request without block groups is ranked on load alone once planned;
3. the plan gets a ``reroute``: if the request cannot be *sent* (connection refused), the proxy asks for the
   same request planned for the next replica in the ranking. A request that was sent is never retried.

One plan per request, whatever the number of replicas: routing adds the ranking (a trie walk per replica) and the
conversation's digest. Only ``read`` (the planner's first phase, which reads no index and no replica state) may run
in a worker thread; ``plan``, the ranking and every read and write of replica state run on the event loop.

Load is tracked per replica while a request is in flight: one request, and its predicted uncached prompt tokens
(the prefill it queues) until the engine answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING

import msgspec
from cachetools import LRUCache
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.planning.plan import PlannedRequest, estimate_tokens
from gateway.planning.residency import Residency
from gateway.upstream.ranking import BalanceGuard, Candidate, rank
from gateway.upstream.replicas import Pending, Replica, ReplicaSet
from gateway.wire.chat import RequestBody
from scheduler.prefixes import Hashes

if TYPE_CHECKING:
    from gateway.planning.planner import Planner
    from gateway.planning.texts import Reading

__all__ = ["ReplicaChoice", "Route", "Router"]

logger = logging.getLogger("prefixgate.router")

_RANK_BUDGET = 8  # trie nodes a ranking walk may visit per replica (the winner's plan searches the index's budget)
_SESSION_HEADERS = ("x-prefixgate-session", "x-session-id", "x-contextpilot-session")
_encoder = msgspec.json.Encoder()


class Route:
    """A plan's routing (``PlannedRequest.routing``, a ``gateway.planning.plan.Routing``): the replica it goes to,
    that replica's load while the request is in flight, where it may go next (``reroute``, when this replica is
    unreachable) and the conversation it belongs to (affinity)."""

    __slots__ = ("_done", "_pending", "_queued", "client", "conversation", "ranking", "replica", "router", "tenant",
                 "tried")  # fmt: skip

    def __init__(self, router: Router, replica: Replica, queued: int) -> None:
        self.router, self.replica, self._queued, self._done = router, replica, queued, False
        self.conversation: bytes | None = None
        self.ranking: tuple[Replica, ...] = ()
        self.tried: tuple[Replica, ...] = (replica,)
        self.tenant: str | None = None
        self.client: str | None = None  # the key, when keys share the planning state (``Planner.read``)
        self._pending: Pending = router.replicas.started(replica)
        replica.in_flight += 1
        replica.queued_tokens += queued

    def accepted(self, planned: PlannedRequest) -> None:
        self._dequeue()
        self.router.accepted(self, planned.request_id)

    def finished(self) -> None:
        if not self._done:
            self._done = True
            self._dequeue()
            self.replica.in_flight -= 1
            self.router.replicas.ended(self._pending)

    def responded(self, status: int) -> None:
        self.router.replicas.answered(self._pending, status)

    def failed(self, reason: str) -> None:
        self.router.replicas.request_failed(self._pending, reason)

    def reroute(self, planned: PlannedRequest, body: RequestBody, headers: Mapping[str, str]) -> PlannedRequest | None:
        """The request could not be sent to this replica: the same request planned for the next one, or None."""
        return self.router.reroute(self, planned.request_id, body, headers)

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
    def read(
        self,
        body: RequestBody,
        headers: Mapping[str, str],
        *,
        tenant: str | None = None,
        client: str | None = None,
        inline: bool = False,
        resume: Reading | None = None,
    ) -> Reading:
        """``Planner.read`` (any thread), by the planner whose memo will plan the request: the replica's own with
        one replica, the shared one with several."""
        planner = _planner(self.replicas.replicas[0]) if len(self.replicas) == 1 else self._shared
        return planner.read(body, headers, tenant=tenant, client=client, inline=inline, resume=resume)

    def plan(self, reading: Reading, request_id: str) -> PlannedRequest:
        """Plan what ``read`` found for the best replica (``Planner.plan``'s contract, on the event loop)."""
        body, headers, tenant = reading.body, reading.headers, reading.tenant
        healthy = self.replicas.healthy()
        if not healthy:
            raise Unavailable("no healthy engine replica", code="no_healthy_replica")
        prompt_tokens = estimate_tokens(len(body.raw))
        if len(healthy) == 1:
            planned = _planner(healthy[0]).plan(reading, request_id)
            route = self._assign(planned, healthy[0], prompt_tokens, 0, "only")
            route.tenant, route.client = tenant, reading.client
            return planned
        conversation = _conversation(body, headers)
        if conversation is not None and tenant:  # one key's conversations never steer another key's routing
            conversation = tenant.encode() + b"\0" + conversation
        affine = self._affine(healthy, conversation)
        sent = self._shared.sent_chain(body, headers, tenant, reading.control)  # routing by the prompt as sent
        choice = ReplicaChoice(self, healthy, prompt_tokens, affine, sent)
        planned = self._shared.plan(reading, request_id, sent=sent, view=choice)
        assert choice.ranking is not None and choice.best is not None, "planning chose the replica"
        winner = choice.ranking[0]
        reason = self._reason(choice.best, affine, [r.in_flight for r in healthy])
        route = self._assign(planned, winner, prompt_tokens, choice.best.cached_tokens, reason)
        route.conversation, route.ranking, route.tenant = conversation, tuple(choice.ranking), tenant
        route.client = reading.client
        return planned

    def passthrough(self) -> Replica:
        """Where a request the planner does not see (``/v1/models``, other ``/v1/*``) goes: round robin."""
        healthy = self.replicas.healthy()
        if not healthy:
            raise Unavailable("no healthy engine replica", code="no_healthy_replica")
        self._next_passthrough += 1
        return healthy[self._next_passthrough % len(healthy)]

    def accepted(self, route: Route, request_id: str) -> None:
        """The request was accepted by its replica: remember where it went (evictions, affinity)."""
        replica = route.replica
        if replica.flapped:
            self.replicas.succeeded(replica)
        replica.failures = 0
        self.replicas.sent_to(request_id, replica)
        if route.conversation is not None:
            self._affinity[route.conversation] = replica

    def reroute(
        self, failed: Route, request_id: str, body: RequestBody, headers: Mapping[str, str]
    ) -> PlannedRequest | None:
        """``failed`` could not be sent: plan the request for the next healthy replica in its ranking (on the loop)."""
        self.replicas.request_failed(failed._pending, "connection failed")
        remaining = [r for r in failed.ranking if self.replicas.admits(r) and r not in failed.tried]
        if not remaining:
            return None
        self.reroutes.inc()
        logger.warning("replica %s unreachable; request sent to %s", failed.replica.name, remaining[0].name)
        # on the loop: its texts are in the memos
        reading = self._shared.read(body, headers, tenant=failed.tenant, client=failed.client)
        planned = self._shared.plan(reading, request_id, view=remaining[0].residency)
        route = self._assign(planned, remaining[0], estimate_tokens(len(body.raw)), 0, "reroute")
        route.conversation, route.ranking, route.tenant = failed.conversation, failed.ranking, failed.tenant
        route.client = failed.client
        route.tried = (*failed.tried, remaining[0])
        return planned

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
            as_sent = estimate_tokens(residency.held_chars(sent)) if sent else 0
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

    def _assign(self, planned: PlannedRequest, replica: Replica, prompt_tokens: int, cached: int, reason: str) -> Route:
        """Send ``planned`` to ``replica`` (its plan, made against that replica's residency): its route."""
        self.decisions.labels(reason).inc()
        if len(self.replicas) > 1:
            planned.result["replica"] = replica.name
        planned.upstream = replica
        planned.routing = route = Route(self, replica, max(0, prompt_tokens - cached))
        return route


class ReplicaChoice:
    """One request's choice of replica (an ``IndexView``): the planner calls ``choose`` at its first index lookup,
    with the first block group (none: ranked on load alone), and plans against the winner's residency."""

    __slots__ = ("affine", "best", "healthy", "prompt_tokens", "ranking", "router", "sent")

    def __init__(
        self, router: Router, healthy: list[Replica], prompt_tokens: int, affine: Replica | None, sent: Hashes
    ) -> None:
        self.router, self.healthy, self.prompt_tokens, self.affine = router, healthy, prompt_tokens, affine
        self.sent = sent
        self.ranking: list[Replica] | None = None
        self.best: Candidate | None = None

    def choose(self, groups: Sequence[tuple[Hashable, Sequence[int]]]) -> Residency:
        """Rank the healthy replicas for a request whose first block groups are ``groups`` (on the loop)."""
        self.ranking, self.best = self.router.rank(self.healthy, groups, self.prompt_tokens, self.affine, self.sent)
        return self.ranking[0].residency


class _Replicas:
    """The shared planner's residency outside a request: only what its constructor registers (``on_reset``)."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def on_reset(self, hook: Callable[[], None]) -> None:
        # the shared memo is cleared when any replica's index is dropped, as each replica's own planner's is
        for replica in self._replicas.replicas:
            replica.residency.on_reset(hook)


def _planner(replica: Replica) -> Planner:
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
