"""The engine replicas behind one gateway: per replica its URL, engine kind, client, health, load and index.

Each replica owns a :class:`~gateway.planning.residency.Residency` (its own live index: what *that* engine holds) and a
:class:`~gateway.planning.planner.Planner` bound to it (for llama.cpp, its slot table; with a single replica, the
planner). With several, the router plans each request once with one planner shared by the replicas, whose index lookups
go to the replica chosen for that request (``gateway.upstream.router``), so a request is ordered against that replica's
cache and committed there only.

With several replicas, three rules decide which ones take requests (:meth:`ReplicaSet.healthy`; docs/reliability.md):

- **Active checks.** Every ``health_interval`` seconds each one's ``/health`` (else ``/v1/models``) is asked;
  ``eject_after`` failed checks in a row take it out of routing, the next answered check takes it back.
- **Outlier ejection** (Envoy's consecutive-failure detection). A request the replica accepted and then failed (a
  timeout, a broken connection, a 502/503/504, a request stuck far beyond its peers) or could not be sent to counts
  one failure; an answer resets the count. ``eject_after`` in a row eject the replica for ``eject_time`` seconds
  times its ejection level (one more at each ejection, one less per ``eject_time`` spent admitted since, at most
  ten), whatever its checks say: a replica that answers ``/health`` but hangs on completions stays out. At most
  ``max_ejected_percent`` of the replicas are ejected at once (at least one), and never the last one in routing.
- **Stuck requests.** A replica with a request waiting for its answer head longer than ``stuck_factor`` times the
  median head time of its peers (and at least ``STUCK_FLOOR`` seconds) is routed around while another replica is
  not, and each such request counts one failure (once).

Index drops: a replica's index is dropped only on evidence that it restarted: its check found nothing listening (a
refused connection), or ``eject_after`` checks in a row failed, before it answered again (``gateway.app`` adds KV-event
replay gaps). One late or failed probe is not evidence: a busy engine answers ``/health`` slowly.
With a single replica nothing is ever ejected: there is nowhere else to send.

Single writer: everything here runs on the event loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
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

__all__ = ["STUCK_FLOOR", "Pending", "Replica", "ReplicaSet"]

logger = logging.getLogger("prefixgate.replicas")

STUCK_FLOOR = 1.0  # seconds: a request waiting less for its answer head is never stuck, whatever its peers do
_HEAD_SAMPLES = 64  # answer-head times kept per replica for its peers' median
_MAX_LEVEL = 10  # the longest ejection is ten times ``eject_time`` (Envoy: 30 s base, 300 s max)
_GATEWAY_STATUSES = frozenset({502, 503, 504})  # answers that count as failures (Envoy's gateway failures)


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
    healthy: bool = True  # its active checks answer
    failures: int = 0  # failed checks in a row
    in_flight: int = 0
    queued_tokens: int = 0
    sent: int = 0
    ejections: int = 0
    index_drops: int = 0
    flapped: bool = field(default=False, repr=False)  # evidence of a restart since the last answered check
    last_check: float = 0.0
    request_failures: int = field(default=0, repr=False)  # failed requests in a row (outlier detection)
    ejected_until: float = field(default=0.0, repr=False)  # monotonic clock; in the past: not ejected
    ejection_level: int = field(default=0, repr=False)
    stuck: bool = field(default=False, repr=False)
    waiting: dict[Pending, None] = field(default_factory=dict, repr=False)  # awaiting their answer head, oldest first
    heads: deque[float] = field(default_factory=lambda: deque(maxlen=_HEAD_SAMPLES), repr=False)

    def ejected(self, now: float | None = None) -> bool:
        return self.ejected_until > (time.monotonic() if now is None else now)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "engine": self.engine.name,
            "healthy": self.healthy and not self.ejected(),
            "ejected": self.ejected(),
            "stuck": self.stuck,
            "in_flight": self.in_flight,
            "queued_tokens": self.queued_tokens,
            "sent": self.sent,
            "index_requests": len(self.residency.index),
        }


class Pending:
    """One request sent to a replica, from its routing to its answer head (outlier detection's unit)."""

    __slots__ = ("counted", "replica", "since")

    def __init__(self, replica: Replica, since: float) -> None:
        self.replica, self.since, self.counted = replica, since, False


class ReplicaSet:
    """The replicas, their health, and which replica each request was sent to (for eviction reports)."""

    def __init__(
        self,
        replicas: list[Replica],
        *,
        eject_after: int,
        max_requests: int,
        eject_time: float = 30.0,
        max_ejected_percent: int = 50,
        stuck_factor: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not replicas:
            raise ValueError("at least one replica")
        self.replicas = replicas
        self.eject_after = eject_after
        self.eject_time = eject_time
        self.max_ejected = max(1, len(replicas) * max_ejected_percent // 100)
        self.stuck_factor = stuck_factor
        self.clock = clock
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
        """Replicas requests may go to: checks answered and not ejected, the stuck ones only when every one is
        (with a single replica, always that one)."""
        if len(self.replicas) == 1:
            return self.replicas
        now = self.clock()
        admitted = [replica for replica in self.replicas if replica.healthy and replica.ejected_until <= now]
        moving = [replica for replica in admitted if not replica.stuck]
        return moving or admitted

    def admits(self, replica: Replica) -> bool:
        """Whether ``replica`` takes requests now (see :meth:`healthy`)."""
        return replica in self.healthy()

    # -- request bookkeeping -------------------------------------------------------------------------------
    def sent_to(self, request_id: str, replica: Replica) -> None:
        """``request_id`` was accepted by ``replica``: its eviction reports release that replica's entries."""
        self._owners[request_id] = replica
        replica.sent += 1

    def owner(self, request_id: str) -> Replica | None:
        return self._owners.get(request_id)

    # -- outlier detection (requests) --------------------------------------------------------------------
    def started(self, replica: Replica) -> Pending:
        """A request was routed to ``replica``: it waits for its answer head from now."""
        pending = Pending(replica, self.clock())
        replica.waiting[pending] = None
        return pending

    def answered(self, pending: Pending, status: int) -> None:
        """The answer head came: a 502/503/504 is a failure, any other status a success."""
        replica = pending.replica
        if replica.waiting.pop(pending, 0) is None:
            replica.heads.append(self.clock() - pending.since)
        if status in _GATEWAY_STATUSES:
            self.request_failed(pending, f"answered {status}")
        elif not pending.counted:
            replica.request_failures = 0

    def request_failed(self, pending: Pending, reason: str) -> None:
        """The request failed on its replica (timed out, connection lost or refused, stuck): counted once."""
        pending.replica.waiting.pop(pending, None)
        self._count(pending, reason)

    def _count(self, pending: Pending, reason: str) -> None:
        if pending.counted:
            return
        pending.counted = True
        replica = pending.replica
        if replica.ejected_until > self.clock():
            return  # sent before the ejection: already paid for
        replica.request_failures += 1
        if len(self.replicas) > 1 and replica.request_failures >= self.eject_after:
            self._eject(replica, reason)

    def ended(self, pending: Pending) -> None:
        """The request is over (answered, failed, or given up by its client)."""
        pending.replica.waiting.pop(pending, None)

    def _eject(self, replica: Replica, reason: str) -> None:
        now = self.clock()
        if replica.ejected_until > now:
            return
        others = [r for r in self.replicas if r is not replica and r.healthy and r.ejected_until <= now]
        ejected = sum(1 for r in self.replicas if r.ejected_until > now)
        if not others or ejected >= self.max_ejected:
            why = "no other replica takes requests" if not others else "the ejected share is at its cap"
            logger.warning("replica %s (%s) failing (%s) but kept: %s", replica.name, replica.url, reason, why)
            return
        if replica.ejected_until:  # one level less per ``eject_time`` admitted since the last ejection ended
            replica.ejection_level -= int((now - replica.ejected_until) / self.eject_time)
        replica.ejection_level = min(_MAX_LEVEL, max(0, replica.ejection_level) + 1)
        duration = self.eject_time * replica.ejection_level
        replica.ejected_until = now + duration
        replica.request_failures = 0
        replica.ejections += 1
        logger.warning("replica %s (%s) ejected for %.0f s after %d failed requests in a row: %s", replica.name,
                       replica.url, duration, self.eject_after, reason)  # fmt: skip

    def scan(self) -> None:
        """Mark the replicas with a request waiting far beyond their peers' median answer head as stuck (routed
        around), counting each such request as one failure."""
        if self.stuck_factor <= 0 or len(self.replicas) < 2:
            return
        now = self.clock()
        for replica in self.replicas:
            peers = sorted(head for other in self.replicas if other is not replica for head in other.heads)
            stuck = False
            if peers:
                limit = max(STUCK_FLOOR, self.stuck_factor * peers[len(peers) // 2])
                for pending in replica.waiting:  # oldest first: stop at the first one within the limit
                    if now - pending.since <= limit:
                        break
                    stuck = True  # until the request ends
                    self._count(pending, f"request waiting over {limit:.1f} s")
            if stuck != replica.stuck:
                logger.warning("replica %s %s", replica.name, "stuck: routed around" if stuck else "no longer stuck")
            replica.stuck = stuck

    # -- active checks -----------------------------------------------------------------------------------
    def failed(self, replica: Replica, reason: str, *, restarted: bool = False) -> None:
        """A check failed (``restarted``: nothing listened); out of routing after ``eject_after`` in a row."""
        replica.failures += 1
        if restarted or replica.failures >= self.eject_after:
            replica.flapped = True  # evidence of a restart: its index is dropped when it answers again
        if len(self.replicas) > 1 and replica.healthy and replica.failures >= self.eject_after:
            replica.healthy = False
            logger.warning("replica %s (%s) out of routing after %d failed checks: %s", replica.name, replica.url,
                           replica.failures, reason)  # fmt: skip

    def succeeded(self, replica: Replica) -> None:
        """A check answered: readmit; a replica with evidence of a restart in between gets its index dropped."""
        if replica.flapped:
            self.drop_index(replica, "not listening, or failing checks in a row, then answered")
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
        refused = False
        for path in ("/health", "/v1/models"):
            try:
                response = await replica.client.get(path, timeout=limit)
            except httpx.ConnectError:
                refused = True  # nothing listening: the engine is down (and starts with an empty cache)
                break
            except httpx.HTTPError:
                break  # unreachable or late: the other path will not answer either
            if response.status_code < 400:
                self.succeeded(replica)
                return True
        self.failed(replica, "health check", restarted=refused)
        return False

    async def run_health_checks(self, interval: float) -> None:
        """Check every replica each ``interval`` seconds, concurrently, until cancelled (several replicas only);
        look for stuck requests at the same pace."""
        if len(self.replicas) < 2:
            return
        timeout = min(2.0, interval)
        while True:
            async with anyio.create_task_group() as tg:
                for replica in self.replicas:
                    tg.start_soon(self.check, replica, timeout)
            self.scan()
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
