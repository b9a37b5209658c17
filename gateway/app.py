"""The Litestar application factory: proxy mount, operations routes, error rendering, lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
import httpx
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from engines.kvevents import KVEventTracker
from engines.llamacpp.slots import discover_slots
from engines.registry import get_engine
from gateway import __version__
from gateway.background import BackgroundCollector, Supervisor
from gateway.edge.access import Access
from gateway.edge.inbound import normalise_path, raw_path
from gateway.errors import GatewayError, error_body, error_type
from gateway.ids import REQUEST_ID_PATTERN, KeyNamespaces, mint_request_id
from gateway.indexapi.routes import index_routes
from gateway.metrics import CONTENT_TYPE_LATEST, IndexCollector, Metrics, watch_event_loop
from gateway.planning.intercept.boundaries import Boundaries
from gateway.planning.planner import Planner
from gateway.planning.residency import BlockTokens, CacheGranularity, Residency, TokenRate
from gateway.planning.texts import TextScans
from gateway.proxy.decisions import DecisionLog, decision_routes
from gateway.proxy.pipeline import Proxy
from gateway.proxy.relay import send_error
from gateway.settings import TOKENIZER_AUTO, Settings, local_tokenizer
from gateway.upstream.ranking import BalanceGuard
from gateway.upstream.replicas import Replica, ReplicaSet
from gateway.upstream.router import Router
from gateway.upstream.sender import UpstreamSender, build_client
from gateway.upstream.transport import build_transport
from scheduler.index import IndexStats

if TYPE_CHECKING:
    from engines.kvevents.subscriber import KVEventSubscriber

__all__ = ["create_app"]

logger = logging.getLogger("prefixgate.app")


def _error_response(request: Request[Any, Any, Any], status: int, body: bytes) -> Response[bytes]:
    client_id = request.headers.get("x-request-id", "")
    headers = {"x-request-id": client_id} if REQUEST_ID_PATTERN.fullmatch(client_id) else {}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return _error_response(request, exc.status, exc.body())


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    param = None
    message = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            param = first.get("key") or None
            message = f"{exc.detail}: {first.get('message', '')}".rstrip(": ")
    if isinstance(exc, NotAuthorizedException):
        status = 401
    type_ = error_type(status, "invalid_request_error" if status < 500 else "internal_error")
    return _error_response(request, status, error_body(message, type_, param=param, code=status))


def _unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error on %s", request.url.path)
    body = error_body("internal gateway error", "internal_error", code=500)
    return _error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, body)


def _kv_subscribers(settings: Settings, trackers: list[KVEventTracker]) -> list[KVEventSubscriber]:
    """One subscriber per engine KV-event endpoint. With one replica, every endpoint (one per data-parallel rank)
    feeds its tracker; with several, endpoint ``i`` belongs to replica ``i``."""
    if not settings.kv_events_endpoint:
        return []
    from engines.kvevents.subscriber import KVEventSubscriber

    replays: list[str | None] = [*settings.kv_events_replay]
    replays += [None] * (len(settings.kv_events_endpoint) - len(replays))
    owners = trackers if len(trackers) > 1 else trackers * len(settings.kv_events_endpoint)
    return [
        KVEventSubscriber(endpoint, tracker, topic=settings.kv_events_topic, replay_endpoint=replay)
        for endpoint, replay, tracker in zip(settings.kv_events_endpoint, replays, owners, strict=True)
    ]


class _Gateway(Litestar):
    """The Litestar app, with every ``/v1`` request handed straight to the proxy (a raw ASGI app).

    Every path is normalised first (``gateway.edge.inbound.normalise_path``): ``/v1/%63hat/completions``,
    ``/v1//chat/completions/`` and ``/v1/x/../chat/completions`` are the chat route for routing, the proxy and
    the upstream alike, and a path that cannot be normalised safely is answered 400 here.
    Litestar's routing and middleware add nothing to proxied requests but cost ~7% of the gateway's CPU per
    request (py-spy, ``python -m bench proxy``). The proxy renders its own errors; a bug escaping it is logged
    and answered with the same OpenAI-shaped 500 as on the Litestar routes.
    """

    def __init__(self, proxy: Proxy, **config: Any) -> None:
        super().__init__(**config)
        self._proxy = proxy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = raw_path(scope)
            try:
                path = normalise_path(raw)
            except GatewayError as exc:  # refused before any route: no key checked, so a minted id
                await send_error(send, exc, mint_request_id(), "passthrough")
                return
            if path is not raw:  # every layer below (routing, the proxy, the upstream) sees the one spelling
                scope = {**scope, "path": unquote(path.decode("latin-1")), "raw_path": path}
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await super().__call__(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._proxy(scope, receive, tracked)
        except Exception:
            logger.exception("unhandled error on %s", path)
            if started:
                raise  # the server drops the connection: the client sees a truncated response
            await send_error(send, GatewayError("internal gateway error", code="500"), mint_request_id(), path)


def _replicas(settings: Settings, transport: httpx.AsyncBaseTransport | None, metrics: Metrics) -> ReplicaSet:
    """One replica per ``--upstream``: its own connection pool, client, live index and planner (the planners
    share what does not depend on an index: the scans of texts, the learned paragraph boundaries and the token
    counts of ``--tokenizer``). Replicas of one engine kind learn its cache granularity and token rate together
    (the same engine and model behind each, as a router's replicas are), so a replica that has served few requests
    predicts in whole blocks from the start."""
    replicas = []
    scans, boundaries = TextScans(), Boundaries()
    tokens: BlockTokens | None = None  # the first planner's, shared by the others
    learned: dict[str, tuple[CacheGranularity, TokenRate]] = {}
    for position, (kind, url) in enumerate(settings.upstreams):
        residency = Residency(max_requests=settings.index_max_requests, stateless=settings.stateless)
        residency.granularity, residency.rate = learned.setdefault(kind, (residency.granularity, residency.rate))
        # llama-server closes a connection after every streamed (chunked) answer, announcing keep-alive
        engine = get_engine(kind)
        residency.reuse_overwrites = engine.reuse_overwrites
        pool = (
            transport
            if transport is not None
            else build_transport(settings, keep_after_chunked=engine.name != "llamacpp")
        )
        client = build_client(settings, pool, url)
        replica = Replica(position, f"r{position}", url, engine, client, UpstreamSender(client, pool), residency)
        replica.planner = Planner(settings, residency, metrics, scans=scans, boundaries=boundaries, tokens=tokens)
        tokens = replica.planner.tokens
        replicas.append(replica)
    return ReplicaSet(
        replicas,
        eject_after=settings.eject_after,
        max_requests=settings.index_max_requests,
        eject_time=settings.eject_time,
        max_ejected_percent=settings.max_ejected_percent,
        stuck_factor=settings.stuck_factor,
    )


def _kv_counters(trackers: list[KVEventTracker]) -> dict[str, int]:
    """The KV-event stream counters of every replica's tracker, added up."""
    total: dict[str, int] = {}
    for tracker in trackers:
        for name, value in tracker.counters.as_dict().items():
            total[name] = total.get(name, 0) + value
    return total


def _total_stats(replicas: ReplicaSet) -> IndexStats:
    every = [replica.residency.index.stats() for replica in replicas.replicas]
    return IndexStats(*(sum(getattr(s, name) for s in every) for name in IndexStats.__dataclass_fields__))


def create_app(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> Litestar:
    """Build the gateway for ``settings``; ``transport`` replaces the network (tests use respx routers)."""
    metrics = Metrics()
    if settings.api_key and not settings.admin_token:
        logger.warning("client keys are set but no admin token: /evict, /reset and stateful /reorder are open")
    replicas = _replicas(settings, transport, metrics)
    first = replicas.replicas[0]
    residency = first.residency  # the index API's state lives with the first replica
    planner = first.planner
    assert planner is not None
    metrics.registry.register(IndexCollector(lambda: _total_stats(replicas)))
    router = Router(replicas, BalanceGuard(settings.balance_abs, settings.balance_rel), metrics)
    namespaces = KeyNamespaces([key.encode() for key in settings.api_key], settings.namespace_secret.encode() or None)
    decisions = DecisionLog(settings.decision_log, settings.decision_log_text) if settings.decision_log else None
    proxy = Proxy(
        settings,
        metrics,
        router,
        router.passthrough if len(replicas) > 1 else lambda: first,
        issued=residency.issued,
        namespaces=namespaces,
        decisions=decisions,
    )
    mode = "stateless" if settings.stateless else "live"

    @get("/health", sync_to_thread=False)
    def health() -> dict[str, Any]:
        """Liveness: the gateway process answers (200 from the start). Does not contact the upstream."""
        stats = _total_stats(replicas)
        several: dict[str, Any] = {"replicas": [r.describe() for r in replicas.replicas]} if len(replicas) > 1 else {}
        if planner.tokens is not None:  # --tokenizer: what it counts with (None: 'auto' found none yet)
            several["tokenizer"] = planner.tokens.source
        return {
            "status": "ready",
            "mode": mode,
            "version": __version__,
            "engine": settings.engine,
            "upstream": settings.upstream_url,
            "eviction_enabled": not settings.stateless,
            "index_stats": {"num_requests": stats.requests, "num_nodes": stats.nodes},
            "slots": planner.slot_count,
            "timestamp": time.time(),
            **several,
        }

    @get("/ready")
    async def ready() -> Response[dict[str, Any]]:
        """Readiness: an upstream engine (any replica) answers its health (or models) endpoint."""
        for replica in replicas.healthy():
            for path in ("/health", "/v1/models"):
                try:
                    response = await replica.client.get(path, timeout=2.0)
                except httpx.HTTPError:
                    continue
                if response.status_code < 400:
                    return Response({"status": "ready", "upstream": "ok"})
        body = {"status": "not_ready", "upstream": "unreachable or unhealthy"}
        return Response(body, status_code=503)

    @get("/metrics", sync_to_thread=False, include_in_schema=False)
    def metrics_route() -> Response[bytes]:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def close_client() -> None:
        for replica in replicas.replicas:
            await replica.client.aclose()
        if replication is not None:
            await replication.aclose()

    async def learn_slots(replica: Replica) -> None:
        """llama.cpp: find the slot count (retrying while the server starts), then pin requests to slots."""
        planner = replica.planner
        assert planner is not None
        while True:
            count = await discover_slots(replica.client)
            if count is not None:
                # pinned only where the slots are llama-server's whole cache (--no-llamacpp-prompt-cache): with its
                # prompt cache, its own choice saves and restores prompts, which a pinned request skips
                pin = not settings.llamacpp_prompt_cache
                planner.use_slots(count, pin=pin)
                how = "pinned with id_slot" if pin else "left to its own slot choice and prompt cache"
                logger.info("llama-server %s has %d slots; requests are %s", replica.name, count, how)
                return
            await anyio.sleep(2.0)

    async def learn_tokenizer(tokens: BlockTokens) -> None:
        """``--tokenizer auto``: count with the tokenizer of the model the engines name (``/v1/models``: vLLM's and
        SGLang's ``root`` is the path they were started on), once one is found on this host; retried while no
        engine answers. Texts planned before it loads stay estimated until the memo forgets them."""
        while True:
            names: list[str] = []
            for replica in replicas.replicas:
                try:
                    listing = (await replica.client.get("/v1/models", timeout=5.0)).json()
                    models = listing.get("data") or []
                    names += [str(m[k]) for m in models if isinstance(m, dict) for k in ("root", "id") if m.get(k)]
                except (httpx.HTTPError, ValueError, AttributeError):
                    continue
            for name in dict.fromkeys(names):
                path = await anyio.to_thread.run_sync(local_tokenizer, name)
                if path is not None:
                    await anyio.to_thread.run_sync(tokens.load, path)
                    logger.info("--tokenizer auto: counting tokens with %s (model %s)", path, name)
                    return
            if names:
                logger.warning("--tokenizer auto: no tokenizer on this host for %s; tokens are estimated", names[:4])
                return
            await anyio.sleep(2.0)

    def kv_tracker_for(replica: Replica) -> KVEventTracker:
        def released(request_ids: list[str]) -> None:
            replica.residency.evict(request_ids)

        residency, shortened = replica.residency, None
        if settings.kv_events_endpoint:  # the events shorten what a replica holds when it evicts a prompt's tail
            residency.track_extents()
            shortened = residency.shorten
        return KVEventTracker(on_evicted=released, on_reset=residency.reset, on_shortened=shortened)

    kv_trackers = [kv_tracker_for(replica) for replica in replicas.replicas]
    replication = None
    if settings.state:
        from gateway.state.replication import Replication

        max_blocks = max(settings.max_blocks_per_request, settings.reorder_max_blocks)  # what one request may carry
        replication = Replication(
            settings.state, replicas, metrics, max_len=settings.state_max_len, max_blocks=max_blocks
        )
    kv_tracker = kv_trackers[0]
    supervisor = Supervisor()
    metrics.registry.register(BackgroundCollector(supervisor, lambda: _kv_counters(kv_trackers)))

    async def start_background(app: Litestar) -> AsyncIterator[None]:
        subscribers = _kv_subscribers(settings, kv_trackers)
        app.state.kv_subscribers = subscribers
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_event_loop, metrics)
            for replica in replicas.replicas:
                if replica.engine.name == "llamacpp":
                    name = "llamacpp-slots" if len(replicas.replicas) == 1 else f"llamacpp-slots {replica.name}"
                    supervisor.start(tg, name, partial(learn_slots, replica))
            if settings.tokenizer == TOKENIZER_AUTO and planner.tokens is not None:  # shared by every replica
                supervisor.start(tg, "tokenizer", partial(learn_tokenizer, planner.tokens))
            if len(replicas.replicas) > 1:
                supervisor.start(tg, "health-checks", partial(replicas.run_health_checks, settings.health_interval))
            if replication is not None:
                supervisor.start(tg, "replication", replication.run)
            for subscriber in subscribers:
                supervisor.start(tg, f"kv-events {subscriber.endpoint}", subscriber.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    app = _Gateway(
        proxy,
        route_handlers=[
            health,
            ready,
            metrics_route,
            *index_routes(settings, residency, namespaces, replicas),
            *(decision_routes(decisions, Access(settings, namespaces)) if decisions is not None else ()),
        ],
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
        on_shutdown=[close_client],
        lifespan=[asynccontextmanager(start_background)],
        openapi_config=OpenAPIConfig(title="prefixgate", version=__version__, path="/schema"),
        debug=False,
        logging_config=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.proxy = proxy
    app.state.residency = residency
    app.state.kv_tracker = kv_tracker
    app.state.background = supervisor
    app.state.replicas = replicas
    app.state.replication = replication
    return app
