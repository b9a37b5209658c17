"""Joint routing and reordering: plan a request against every healthy replica, send the plan made for the best.

The router is the proxy's planner (``Router.plan`` has ``Planner.plan``'s contract and returns a
:class:`RoutedRequest`, a ``PlannedRequest`` that also names its replica). With one replica it is that replica's
planner plus load accounting. With several, for one request it

1. plans the request once with a *probe* replica's planner (the conversation's replica, else the least loaded),
   which finds the block groups and their prefix keys;
2. asks every healthy replica's live index how many of those blocks it holds (``LiveIndex.plan(key, blocks)``,
   microseconds each), turns that into predicted cached tokens, and ranks the replicas with
   :func:`gateway.routing.rank` (cache against load, balance guard, affinity);
3. keeps the probe's plan when the probe won, else plans the request again with the winner's planner, so the
   prompt is ordered for the cache of the replica it goes to, and committed only to that replica's index;
4. gives the plan a ``reroute``: if the request cannot be *sent* (connection refused), the proxy asks for the
   same request planned for the next replica in the ranking. A request that was sent is never retried.

Big bodies are planned in a worker thread (``in_thread``); the router's reads and writes of replica state then
run on the event loop, like the planner's index reads.

Load is tracked per replica while a request is in flight: one request, and its predicted uncached prompt tokens
(the prefill it queues) until the engine answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from hashlib import blake2b
from typing import Any, TypeVar

import anyio.from_thread
import msgspec
from cachetools import LRUCache
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import Unavailable
from gateway.metrics import Metrics
from gateway.planned import PlannedRequest
from gateway.replicas import Replica, ReplicaSet
from gateway.routing import BalanceGuard, Candidate, rank
from gateway.wire import RequestBody

__all__ = ["RoutedRequest", "Router"]

logger = logging.getLogger("prefixgate.router")

T = TypeVar("T")
_CHARS_PER_TOKEN = 4
_SESSION_HEADERS = ("x-prefixgate-session", "x-session-id", "x-contextpilot-session")
_encoder = msgspec.json.Encoder()


def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class RoutedRequest(PlannedRequest):
    """A plan made for one replica: the replica it goes to (``upstream``), that replica's load while the request
    is in flight, and ``reroute`` (the same request planned for the next replica, when this one is unreachable)."""

    __slots__ = ("_done", "_queued", "conversation", "ranking", "replica", "router", "tenant", "tried")

    replica: Replica
    router: Router
    conversation: bytes | None
    ranking: tuple[Replica, ...]
    tried: tuple[Replica, ...]
    tenant: str | None
    _queued: int
    _done: bool

    @classmethod
    def of(cls, planned: PlannedRequest, replica: Replica, router: Router, queued: int) -> RoutedRequest:
        routed = cls.__new__(cls)
        for name in PlannedRequest.__slots__:
            setattr(routed, name, getattr(planned, name))
        routed.replica, routed.router, routed._queued, routed._done = replica, router, queued, False
        routed.conversation, routed.ranking, routed.tried, routed.tenant = None, (), (replica,), None
        replica.in_flight += 1
        replica.queued_tokens += queued
        return routed

    @property
    def upstream(self) -> Replica:
        return self.replica

    def accept(self) -> None:
        self._dequeue()
        self.router.accepted(self)
        super().accept()

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._dequeue()
            self.replica.in_flight -= 1
        super().finish()

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
    ) -> PlannedRequest:
        """Plan ``body`` for the best replica (``Planner.plan``'s contract; ``in_thread`` likewise)."""
        on_loop: Callable[..., Any] = anyio.from_thread.run_sync if in_thread else _call
        healthy: list[Replica] = on_loop(self.replicas.healthy)
        if not healthy:
            raise Unavailable("no healthy engine replica", code="no_healthy_replica")
        prompt_tokens = len(body.raw) // _CHARS_PER_TOKEN
        if len(healthy) == 1:
            planned = _planner(healthy[0]).plan(body, request_id, headers, in_thread=in_thread, tenant=tenant)
            routed: RoutedRequest = on_loop(self._assign, planned, healthy[0], prompt_tokens, 0, "only")
            routed.tenant = tenant
            return routed
        conversation = _conversation(body, headers)
        if conversation is not None and tenant:  # one key's conversations never steer another key's routing
            conversation = tenant.encode() + b"\0" + conversation
        affine, probe = on_loop(self._probe, healthy, conversation)
        trial = _planner(probe).plan(body, request_id, headers, in_thread=in_thread, tenant=tenant, record=False)
        ranking, best = on_loop(self._rank, healthy, trial, prompt_tokens, affine)
        winner = ranking[0]
        if winner is probe:
            _planner(probe).record(trial)
            planned = trial
        else:
            if trial.slots is not None:
                on_loop(trial.finish)  # the probe's llama.cpp slot reservation
            planned = _planner(winner).plan(body, request_id, headers, in_thread=in_thread, tenant=tenant)
        reason = self._reason(best, affine, [r.in_flight for r in healthy])
        routed = on_loop(self._assign, planned, winner, prompt_tokens, best.cached_tokens, reason)
        routed.conversation, routed.ranking, routed.tenant = conversation, tuple(ranking), tenant
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
        self.replicas.failed(failed.replica, "connection failed")
        remaining = [r for r in failed.ranking if r.healthy and r not in failed.tried]
        if not remaining:
            return None
        self.reroutes.inc()
        logger.warning("replica %s unreachable; request sent to %s", failed.replica.name, remaining[0].name)
        planned = _planner(remaining[0]).plan(body, failed.request_id, headers, tenant=failed.tenant)
        routed = self._assign(planned, remaining[0], len(body.raw) // _CHARS_PER_TOKEN, 0, "reroute")
        routed.conversation, routed.ranking, routed.tenant = failed.conversation, failed.ranking, failed.tenant
        routed.tried = (*failed.tried, remaining[0])
        return routed

    # -- internals (on the event loop) ---------------------------------------------------------------------
    def _probe(self, healthy: list[Replica], conversation: bytes | None) -> tuple[Replica | None, Replica]:
        """The conversation's replica (if healthy), and the replica to plan the request with first."""
        affine = self._affinity.get(conversation) if conversation is not None else None
        if affine is not None and affine not in healthy:
            affine = None
        probe = affine or min(healthy, key=lambda r: (r.in_flight, r.queued_tokens, r.sent, r.position))
        return affine, probe

    def _rank(
        self, healthy: list[Replica], trial: PlannedRequest, prompt_tokens: int, affine: Replica | None
    ) -> tuple[list[Replica], Candidate]:
        groups = trial.commits
        total_blocks = sum(len(blocks) for _, blocks in groups)
        per_block = prompt_tokens / total_blocks if total_blocks else 0.0
        candidates = []
        for replica in healthy:
            index = replica.residency.index
            cached = sum(index.plan(key, blocks).cached for key, blocks in groups) if groups else 0
            candidates.append(
                Candidate(replica.position, int(cached * per_block), replica.in_flight, replica.queued_tokens,
                          replica.sent)
            )  # fmt: skip
        ranked = rank(candidates, prompt_tokens, self.guard, affine.position if affine is not None else None)
        return [self.replicas.replicas[c.replica] for c in ranked], ranked[0]

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
    digest = blake2b(digest_size=16)
    for message in messages[:2]:
        digest.update(message.role.encode())
        content = message.content
        if isinstance(content, str):
            digest.update(content.encode("utf-8", "surrogatepass"))
        elif content is not None:
            digest.update(_encoder.encode(content))
    return b"m" + digest.digest()


class _ReplicaCollector(Collector):
    """Per-replica health, load and index size, read when ``/metrics`` is scraped."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "prefixgate_replica_healthy", "1 while a replica takes requests", labels=["replica"]
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
            "prefixgate_replica_ejections", "Times a replica was ejected", labels=["replica"]
        )
        drops = CounterMetricFamily(
            "prefixgate_replica_index_drops",
            "Times a replica's index was dropped (restart or event gap)",
            labels=["replica"],
        )
        for r in self._replicas.replicas:
            healthy.add_metric([r.name], 1.0 if r.healthy else 0.0)
            in_flight.add_metric([r.name], r.in_flight)
            queued.add_metric([r.name], r.queued_tokens)
            index.add_metric([r.name], len(r.residency.index))
            sent.add_metric([r.name], r.sent)
            ejections.add_metric([r.name], r.ejections)
            drops.add_metric([r.name], r.index_drops)
        yield from (healthy, in_flight, queued, index, sent, ejections, drops)
