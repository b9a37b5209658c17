"""The Litestar application factory: proxy mount, operations routes, error rendering, lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

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
from gateway.errors import GatewayError, error_body, error_type
from gateway.ids import REQUEST_ID_PATTERN, KeyNamespaces
from gateway.index_api import index_routes
from gateway.metrics import CONTENT_TYPE_LATEST, IndexCollector, Metrics, watch_event_loop
from gateway.planner import Planner
from gateway.proxy import Proxy
from gateway.residency import Residency
from gateway.settings import Settings
from gateway.transport import build_transport
from gateway.upstream import UpstreamSender, build_client

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


def _kv_subscribers(settings: Settings, tracker: KVEventTracker) -> list[KVEventSubscriber]:
    """One subscriber per engine KV-event endpoint (one per data-parallel rank), sharing one tracker."""
    if not settings.kv_events_endpoint:
        return []
    from engines.kvevents.subscriber import KVEventSubscriber

    replays: list[str | None] = [*settings.kv_events_replay]
    replays += [None] * (len(settings.kv_events_endpoint) - len(replays))
    return [
        KVEventSubscriber(endpoint, tracker, topic=settings.kv_events_topic, replay_endpoint=replay)
        for endpoint, replay in zip(settings.kv_events_endpoint, replays, strict=True)
    ]


class _Gateway(Litestar):
    """The Litestar app, with every ``/v1`` request handed straight to the proxy (a raw ASGI app).

    Litestar's routing and middleware add nothing to proxied requests but cost ~7% of the gateway's CPU per
    request (py-spy, ``python -m bench proxy``). The proxy renders its own errors; a bug escaping it is logged
    and answered with the same OpenAI-shaped 500 as on the Litestar routes.
    """

    def __init__(self, proxy: Proxy, **config: Any) -> None:
        super().__init__(**config)
        self._proxy = proxy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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
            body = error_body("internal gateway error", "internal_error", code=500)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> Litestar:
    """Build the gateway for ``settings``; ``transport`` replaces the network (tests use respx routers)."""
    metrics = Metrics()
    if settings.api_key and not settings.admin_token:
        logger.warning("client keys are set but no admin token: /evict, /reset and stateful /reorder are open")
    residency = Residency(max_requests=settings.index_max_requests, stateless=settings.stateless)
    metrics.registry.register(IndexCollector(residency.index.stats))
    transport = transport if transport is not None else build_transport(settings)
    client = build_client(settings, transport)
    planner = Planner(settings, residency, metrics)
    namespaces = KeyNamespaces([key.encode() for key in settings.api_key])
    proxy = Proxy(
        settings,
        UpstreamSender(client, transport),
        get_engine(settings.engine),
        metrics,
        planner,
        issued=residency.issued,
        namespaces=namespaces,
    )
    mode = "stateless" if settings.stateless else "live"

    @get("/health", sync_to_thread=False)
    def health() -> dict[str, Any]:
        """Liveness: the gateway process answers (200 from the start). Does not contact the upstream."""
        stats = residency.index.stats()
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
        }

    @get("/ready")
    async def ready() -> Response[dict[str, Any]]:
        """Readiness: the upstream engine answers its health (or models) endpoint."""
        for path in ("/health", "/v1/models"):
            try:
                response = await client.get(path, timeout=2.0)
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
        await client.aclose()

    async def learn_slots() -> None:
        """llama.cpp: find the slot count (retrying while the server starts), then pin requests to slots."""
        while True:
            count = await discover_slots(client)
            if count is not None:
                planner.use_slots(count)
                logger.info("llama-server has %d slots; requests are pinned with id_slot", count)
                return
            await anyio.sleep(2.0)

    def kv_released(request_ids: list[str]) -> None:
        residency.evict(request_ids)

    kv_tracker = KVEventTracker(on_evicted=kv_released, on_reset=residency.reset)
    supervisor = Supervisor()
    metrics.registry.register(BackgroundCollector(supervisor, kv_tracker.counters.as_dict))

    async def start_background(app: Litestar) -> AsyncIterator[None]:
        subscribers = _kv_subscribers(settings, kv_tracker)
        app.state.kv_subscribers = subscribers
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_event_loop, metrics)
            if settings.engine == "llamacpp":
                supervisor.start(tg, "llamacpp-slots", learn_slots)
            for subscriber in subscribers:
                supervisor.start(tg, f"kv-events {subscriber.endpoint}", subscriber.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    app = _Gateway(
        proxy,
        route_handlers=[health, ready, metrics_route, *index_routes(settings, residency, namespaces)],
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
    return app
