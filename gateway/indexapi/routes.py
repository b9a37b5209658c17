"""ContextPilot-compatible index API: ``/reorder``, ``/evict``, ``/deduplicate``, ``/reset``, ``/stats``, ...

Field names follow ContextPilot 0.5.0 so its ``ContextPilotIndexClient`` and engine hooks work unchanged; its
contract bugs are fixed:

- ``reordered_contexts`` is always in execution (scheduled) order and ``reordered_contexts[i]`` belongs to
  ``contexts[original_indices[i]]``, in every mode;
- ``request_ids`` is always in *input* order, one unique non-null id per input context (duplicates included);
  ``scheduled_request_ids`` is the same ids in execution order, aligned with ``reordered_contexts``;
- ``/evict`` answers 200 in stateless mode too (nothing to remove), and ``/health`` is 200 on a fresh server.

Who may call what (see docs/reliability.md, "Tenancy"): routes that change the index for everyone (``/evict``,
``/reset``, ``/insert``, ``/deduplicate``, stateful ``/reorder``) need the admin token when one is configured
(without one they are open, as engine eviction hooks must reach ``/evict``: set one on any shared listener);
every other route (``/schedule``, ``/stats``, ``/requests``, ``/search``) needs the admin token or a client key
whenever either is configured, and a client key sees only its own part: its own index view, its own ids, and
ids issued to it are honoured only for it. A gateway with neither configured is one open tenant.

Big batches are planned in a worker thread on an immutable snapshot of the live index, so the proxy keeps
serving; only the final commit runs on the event loop. The request bodies, their decoding and their limits are
``gateway.indexapi.bodies``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from gateway.edge.access import API_KEY, Access, index_key
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.ids import KeyNamespaces
from gateway.indexapi.bodies import (
    DedupBody,
    EvictBody,
    InsertBody,
    IntContexts,
    Options,
    SearchBody,
    StrContexts,
    check_hashable,
    check_limits,
    conversations,
    decode_body,
    decode_contexts,
    token_estimates,
)
from gateway.planning.residency import Residency
from gateway.settings import Settings
from gateway.upstream.replicas import ReplicaSet
from scheduler.batch import BatchPlan, plan_batch
from scheduler.blocks import block_id
from scheduler.dedup import DEFAULT_HINT_TEMPLATE
from scheduler.ids import mint_request_id

__all__ = ["index_routes"]

_COMMIT_CHUNK = 256


class IndexApi:
    """The handlers' shared state: settings, residency, and who is calling (``gateway.edge.access``)."""

    def __init__(
        self,
        settings: Settings,
        residency: Residency,
        namespaces: KeyNamespaces | None = None,
        replicas: ReplicaSet | None = None,
    ) -> None:
        self.settings = settings
        self.residency = residency
        self.replicas = replicas
        self.access = Access(settings, namespaces)

    def identify(self, request: Request[Any, Any, Any]) -> str | None:
        return self.access.identify(request.headers)

    def require_admin(self, request: Request[Any, Any, Any]) -> None:
        self.access.require_admin(request.headers)

    async def reorder(self, request: Request[Any, Any, Any], *, stateless: bool) -> dict[str, Any]:
        stateful = not stateless and not self.residency.stateless
        owner = None
        if stateful:
            self.require_admin(request)
        else:
            owner = self.identify(request)
        raw = await request.body()
        key = index_key(owner)
        view = self.residency.index.snapshot(key) if stateful else None
        popularity = self.residency.index.popularity(key) if stateful else None
        cooccurrence = self.residency.index.cooccurrence(key) if stateful else None

        def plan_off_loop() -> tuple[
            IntContexts | StrContexts, str, list[list[int]], BatchPlan, list[list[Any]], float
        ]:
            # decoding, hashing and planning a big batch take long: a worker thread, on an immutable snapshot
            parsed, input_type = decode_contexts(raw)
            check_limits(parsed, parsed.contexts, self.settings, stateless=not stateful)
            ids = [[block_id(block) for block in context] for context in parsed.contexts]
            tokens = token_estimates(parsed.contexts, ids) if input_type == "string" else None
            started = time.perf_counter()
            plan = plan_batch(
                ids,
                view=view,
                popularity=popularity,
                cooccurrence=cooccurrence,
                conversations=conversations(parsed),
                tokens=tokens,
                shake=self.settings.batch_search,
            )
            elapsed = (time.perf_counter() - started) * 1000
            return parsed, input_type, ids, plan, plan.apply(parsed.contexts), elapsed

        parsed, input_type, ids, plan, reordered, plan_ms = await anyio.to_thread.run_sync(plan_off_loop)
        contexts: list[list[Any]] = parsed.contexts
        mode = "stateless"
        request_ids = [mint_request_id() for _ in contexts]
        self.residency.issue(request_ids, owner)
        if stateful:
            mode = "incremental" if view is not None and view.requests else "initial"
            await self._commit(ids, plan, request_ids, key)
        body: dict[str, Any] = {
            "status": "success",
            "message": f"reordered {len(contexts)} contexts ({mode})",
            "mode": mode,
            "input_type": input_type,
            "num_contexts": len(contexts),
            "num_groups": len(plan.groups),
            "reordered_contexts": reordered,
            "scheduled_contexts": reordered,
            "original_indices": plan.order,
            "request_ids": request_ids,
            "scheduled_request_ids": [request_ids[i] for i in plan.order],
            "groups": [[len(group), group] for group in plan.groups],
            "stats": {
                "num_contexts": len(contexts),
                "num_groups": len(plan.groups),
                "predicted_cached_blocks": sum(plan.cached),
                "shared_prefix_blocks": sum(plan.shared),
                "total_blocks": sum(len(c) for c in contexts),
                "plan_ms": round(plan_ms, 3),
            },
        }
        if stateful:
            body["matched_count"] = sum(1 for cached in plan.cached if cached)
            body["inserted_count"] = len(contexts)
        if parsed.deduplicate and stateful:
            body["deduplication"] = self._deduplicate(contexts, request_ids, parsed.parent_request_ids, parsed)
        return body

    async def _commit(self, ids: list[list[int]], plan: BatchPlan, request_ids: list[str], key: Hashable) -> None:
        """Commit a planned batch in execution order, yielding to the event loop between chunks."""
        for start in range(0, len(plan.order), _COMMIT_CHUNK):
            for index in plan.order[start : start + _COMMIT_CHUNK]:
                blocks = [ids[index][position] for position in plan.permutations[index]]
                self.residency.commit(request_ids[index], [(key, blocks)])
            await anyio.lowlevel.checkpoint()

    def _deduplicate(
        self,
        contexts: Sequence[Sequence[Any]],
        request_ids: Sequence[str],
        parents: Sequence[str | None] | None,
        options: Options,
    ) -> dict[str, Any]:
        results = []
        total = 0
        for i, context in enumerate(contexts):
            parent = parents[i] if parents is not None else None
            result = self.residency.conversations.deduplicate(
                request_ids[i], list(context), parent, options.hint_template or DEFAULT_HINT_TEMPLATE
            )
            total += len(result.overlapping_docs)
            results.append(
                {
                    "request_id": result.request_id,
                    "parent_request_id": result.parent_request_id,
                    "turn_number": result.turn_number,
                    "is_new_conversation": result.is_new_conversation,
                    "original_docs": result.original_docs,
                    "deduplicated_docs": result.deduplicated_docs,
                    "overlapping_docs": result.overlapping_docs,
                    "new_docs": result.new_docs,
                    "reference_hints": result.reference_hints,
                }
            )
        return {"enabled": True, "results": results, "total_docs_deduplicated": total}

    async def deduplicate(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        self.require_admin(request)
        parsed = decode_body(await request.body(), DedupBody)
        if len(parsed.parent_request_ids) != len(parsed.contexts):
            raise InvalidRequest(
                f"parent_request_ids has {len(parsed.parent_request_ids)} entries for {len(parsed.contexts)} contexts",
                param="parent_request_ids",
            )
        check_hashable(parsed.contexts)
        request_ids = [mint_request_id() for _ in parsed.contexts]
        self.residency.issue(request_ids)
        dedup = self._deduplicate(
            parsed.contexts, request_ids, parsed.parent_request_ids, Options(hint_template=parsed.hint_template)
        )
        return {
            "status": "success",
            "message": f"deduplicated {len(parsed.contexts)} contexts",
            "request_ids": request_ids,
            "results": dedup["results"],
            "total_docs_deduplicated": dedup["total_docs_deduplicated"],
        }

    async def evict(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        self.require_admin(request)
        parsed = decode_body(await request.body(), EvictBody)
        replica = request.query_params.get("replica")  # an engine hook configured per replica names it
        if self.replicas is not None:
            if replica is not None and self.replicas.get(replica) is None:
                raise InvalidRequest(f"unknown replica {replica!r}", param="replica", code="unknown_replica")
            outcome = self.replicas.evict(parsed.request_ids, replica)
        else:
            outcome = self.residency.evict(parsed.request_ids)
        return {
            "status": "success",
            "removed_count": outcome.removed_count,
            "evicted_request_ids": outcome.evicted_request_ids,
            "evicted_node_ids": [],
            "not_found": outcome.not_found,
            "normalized_request_ids": outcome.normalized_request_ids,
            "conversations_cleared": outcome.conversations_cleared,
            "requests_remaining": len(self.residency.index),
            "nodes_remaining": self.residency.index.stats().nodes,
        }

    def stats(self) -> dict[str, Any]:
        stats = self.residency.index.stats()
        return {
            "status": "success",
            "mode": "stateless" if self.residency.stateless else "live",
            "index_stats": {
                "num_nodes": stats.nodes,
                "active_nodes": stats.radix_nodes,
                "num_requests": stats.requests,
                "num_keys": stats.keys,
                "total_searches": stats.plans,
                "total_hits": stats.hits,
                "total_insertions": stats.inserts,
                "total_removals": stats.evictions + stats.lru_evictions,
                "evictions": stats.evictions,
                "lru_evictions": stats.lru_evictions,
                "planned_blocks": stats.planned_blocks,
                "hit_blocks": stats.hit_blocks,
                "conversations": len(self.residency.conversations),
                "max_requests": self.settings.index_max_requests,
            },
            "timestamp": time.time(),
        }


def index_routes(
    settings: Settings,
    residency: Residency,
    namespaces: KeyNamespaces | None = None,
    replicas: ReplicaSet | None = None,
) -> list[HTTPRouteHandler]:
    """The index API's route handlers, bound to one gateway's state (``namespaces``: the proxy's, shared;
    ``/evict`` and ``/reset`` reach every replica's index when ``replicas`` is given; the batch routes use
    ``residency``)."""
    api = IndexApi(settings, residency, namespaces, replicas)

    @post("/reorder", status_code=200)
    async def reorder(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Reorder a batch of contexts (lists of doc ids or doc strings) for prefix sharing."""
        return await api.reorder(request, stateless=False)

    @post("/build", status_code=200, deprecated=True)
    async def build(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Deprecated alias of ``/reorder``."""
        return await api.reorder(request, stateless=False)

    @post("/schedule", status_code=200, deprecated=True)
    async def schedule(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Deprecated: ``/reorder`` that never touches the live index."""
        return await api.reorder(request, stateless=True)

    @post("/evict", status_code=200)
    async def evict(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Release requests the engine evicted (engine-mangled ids accepted); idempotent."""
        return await api.evict(request)

    @post("/deduplicate", status_code=200)
    async def deduplicate(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Multi-turn: split each context into docs already sent in its parent chain and new ones."""
        return await api.deduplicate(request)

    @post("/reset", status_code=200)
    async def reset(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Forget the live index and conversation history."""
        api.require_admin(request)
        if replicas is not None:
            replicas.reset()
        else:
            residency.reset()
        return {"status": "success", "message": "index and conversations reset", "conversation_tracker": "reset"}

    @get("/stats", sync_to_thread=False)
    def stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Live index counters."""
        api.identify(request)
        return api.stats()

    @get("/requests", sync_to_thread=False)
    def requests(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Live request ids, least recently committed first (a client key: the ids it chose or was issued)."""
        owner = api.identify(request)
        ids = residency.index.request_ids()
        if owner is not None:
            ids = [rid for rid in ids if rid.startswith(f"{owner}-") or residency.issued_to(rid, owner)]
        return {"status": "success", "num_requests": len(ids), "request_ids": ids}

    @post("/search", status_code=200)
    async def search(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """How many leading blocks of ``context`` the caller's view of the live index holds (in the given order)."""
        owner = api.identify(request)
        parsed = decode_body(await request.body(), SearchBody)
        check_hashable([parsed.context])
        if len(parsed.context) > settings.reorder_max_blocks:
            raise PayloadTooLarge(f"at most {settings.reorder_max_blocks} blocks", param="context")
        view = residency.index.snapshot(index_key(owner))
        matched = view.prefix_length([block_id(b) for b in parsed.context])
        return {"status": "success", "prefix_length": matched, "has_prefix": matched > 0, "search_path": []}

    @post("/insert", status_code=200)
    async def insert(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Record ``context`` as sent (in the given order) under a new request id."""
        api.require_admin(request)
        parsed = decode_body(await request.body(), InsertBody)
        check_hashable([parsed.context])
        request_id = mint_request_id()
        residency.issue([request_id])
        residency.commit(request_id, [(API_KEY, [block_id(b) for b in parsed.context])])
        return {"status": "success", "request_id": request_id, "search_path": [], "node_id": None}

    @post("/update", status_code=200, deprecated=True)
    async def update(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Accepted for ContextPilot clients; prefixgate does not track per-node token counts."""
        api.require_admin(request)
        return Response({"status": "success", "message": "token accounting is not tracked; nothing changed"})

    return [reorder, build, schedule, evict, deduplicate, reset, stats, requests, search, insert, update]
