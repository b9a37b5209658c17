"""The engine replicas behind one gateway: per replica its URL, engine kind, client, health, load and index.

Each replica owns a :class:`~gateway.planning.residency.Residency` (its own live index: what *that* engine holds) and a
:class:`~gateway.planning.planner.Planner` bound to it (for llama.cpp, its slot table; with a single replica, the
planner). With several, the router plans each request once with one planner shared by the replicas, whose index lookups
go to the replica chosen for that request (``gateway.upstream.router``), so a request is ordered against that replica's
cache and committed there only.

Health: with several replicas, every ``health_interval`` seconds each one's ``/health`` (else ``/v1/models``)
is asked. ``eject_after`` consecutive failures (checks, or requests that could not be sent) take a replica out of
routing; the next successful check takes it back. A replica whose check failed and then answered again may have
restarted with an empty cache (a ``/health`` flap), so its index is dropped when it comes back. With a single
replica nothing is ever ejected: there is nowhere else to send.

Single writer: everything here runs on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx
from cachetools import LRUCache

from engines.base import EngineAdapter
from gateway.planning.residency import EvictOutcome, Residency
from gateway.upstream.sender import UpstreamSender
from scheduler.ids import normalize_request_ids, request_id_candidates

if TYPE_CHECKING:
    from gateway.planning.planner import Planner

__all__ = ["Replica", "ReplicaSet"]

logger = logging.getLogger("prefixgate.replicas")


@dataclass(eq=False)
class Replica:
    """One engine replica and everything the gateway tracks about it."""

    position: int
    name: str
    url: str
    engine: EngineAdapter
    client: httpx.AsyncClient
    sender: UpstreamSender  # sends through the client's transport (``gateway.upstream.sender``)
    residency: Residency
    planner: Planner | None = None
    healthy: bool = True
    failures: int = 0
    in_flight: int = 0
    queued_tokens: int = 0
    sent: int = 0
    ejections: int = 0
    index_drops: int = 0
    flapped: bool = field(default=False, repr=False)
    last_check: float = 0.0

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "engine": self.engine.name,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "queued_tokens": self.queued_tokens,
            "sent": self.sent,
            "index_requests": len(self.residency.index),
        }


class ReplicaSet:
    """The replicas, their health, and which replica each request was sent to (for eviction reports)."""

    def __init__(self, replicas: list[Replica], *, eject_after: int, max_requests: int) -> None:
        if not replicas:
            raise ValueError("at least one replica")
        self.replicas = replicas
        self.eject_after = eject_after
        self._owners: LRUCache[str, Replica] = LRUCache(maxsize=max_requests)
        self._by_name = {replica.name: replica for replica in replicas}
        self.on_index_drop: list[Callable[[Replica], None]] = []

    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def get(self, name: str) -> Replica | None:
        return self._by_name.get(name)

    def healthy(self) -> list[Replica]:
        """Replicas requests may go to: the healthy ones (with a single replica, always that one)."""
        if len(self.replicas) == 1:
            return self.replicas
        return [replica for replica in self.replicas if replica.healthy]

    # -- request bookkeeping -------------------------------------------------------------------------------
    def sent_to(self, request_id: str, replica: Replica) -> None:
        """``request_id`` was accepted by ``replica``: its eviction reports release that replica's entries."""
        self._owners[request_id] = replica
        replica.sent += 1

    def owner(self, request_id: str) -> Replica | None:
        return self._owners.get(request_id)

    # -- failures ----------------------------------------------------------------------------------------
    def failed(self, replica: Replica, reason: str) -> None:
        """A check failed or a request could not be sent; eject after ``eject_after`` in a row."""
        replica.failures += 1
        replica.flapped = True
        if len(self.replicas) > 1 and replica.healthy and replica.failures >= self.eject_after:
            replica.healthy = False
            replica.ejections += 1
            logger.warning("replica %s (%s) ejected after %d failures: %s", replica.name, replica.url,
                           replica.failures, reason)  # fmt: skip

    def succeeded(self, replica: Replica) -> None:
        """A check answered: readmit; a replica that failed in between may have restarted, so drop its index."""
        if replica.flapped:
            self.drop_index(replica, "health check failed, then answered")
        if not replica.healthy:
            logger.info("replica %s (%s) readmitted", replica.name, replica.url)
        replica.failures = 0
        replica.flapped = False
        replica.healthy = True

    def drop_index(self, replica: Replica, reason: str) -> None:
        """Forget what ``replica`` was believed to hold (it restarted, or its event stream had a gap)."""
        replica.index_drops += 1
        replica.residency.reset()
        for hook in self.on_index_drop:
            hook(replica)
        logger.info("replica %s index dropped: %s", replica.name, reason)

    async def check(self, replica: Replica, limit: float) -> bool:
        """One active health check of ``replica`` (each probe within ``limit`` seconds); records the outcome."""
        replica.last_check = time.monotonic()
        for path in ("/health", "/v1/models"):
            try:
                response = await replica.client.get(path, timeout=limit)
            except httpx.HTTPError:
                break  # unreachable: the other path will not answer either
            if response.status_code < 400:
                self.succeeded(replica)
                return True
        self.failed(replica, "health check")
        return False

    async def run_health_checks(self, interval: float) -> None:
        """Check every replica each ``interval`` seconds, concurrently, until cancelled (several replicas only)."""
        if len(self.replicas) < 2:
            return
        timeout = min(2.0, interval)
        while True:
            async with anyio.create_task_group() as tg:
                for replica in self.replicas:
                    tg.start_soon(self.check, replica, timeout)
            await anyio.sleep(interval)

    # -- eviction reports --------------------------------------------------------------------------------
    def evict(self, raw_ids: Iterable[str], replica_name: str | None = None) -> EvictOutcome:
        """Release reported evictions from the replica that sent them.

        ``replica_name`` (``/evict?replica=r1``) names the replica outright; otherwise the replica each request
        was sent to; ids the gateway never routed (the index API's) are released wherever they are held.
        """
        raw = list(raw_ids)
        if replica_name is not None:
            named = self.get(replica_name)
            return named.residency.evict(raw) if named is not None else EvictOutcome(normalize_request_ids(raw))
        if len(self.replicas) == 1:
            return self.replicas[0].residency.evict(raw)
        groups: dict[Replica | None, list[str]] = {}
        for one in raw:
            owner = None
            for normalized in normalize_request_ids([one]):
                owner = next((o for c in request_id_candidates(normalized) if (o := self.owner(c))), None)
            groups.setdefault(owner, []).append(one)
        total = EvictOutcome(normalize_request_ids(raw))
        for owner, ids in groups.items():
            targets = [owner] if owner is not None else self.replicas
            found: set[str] = set()
            for target in targets:
                outcome = target.residency.evict(ids)
                total.evicted_request_ids += outcome.evicted_request_ids
                total.conversations_cleared += outcome.conversations_cleared
                found.update(outcome.evicted_request_ids)
            total.not_found += [one for one in normalize_request_ids(ids) if one not in found]
        return total

    def reset(self) -> None:
        for replica in self.replicas:
            replica.residency.reset()
