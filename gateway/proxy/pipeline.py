"""The ``/v1/*`` reverse proxy, as a raw ASGI app mounted into the Litestar application.

The path it sees is already normalised (``gateway.app`` calls ``gateway.edge.inbound.normalise_path`` first), so
the route is classified on the one spelling of it. Per request: check the client key, resolve the request id
(namespaced by that key, see ``gateway.ids``; a body ``rid``/``request_id`` counts once the body is decoded), refuse
header values a server must not forward, read the body within the size limit. On the completion routes: decode the
body once (``gateway.wire.chat.RequestBody``), take a stream slot (429 beyond ``max_concurrent_streams``), let the
planner plan it (one ``PlannedRequest``; 413 beyond ``max_blocks_per_request``), apply its fields and the engine's
request-id stamp, encode the body once. Then send it upstream (to the next replica when one could not be reached;
once more only when it never reached the upstream whole, ``resendable``) and hand the response to
``gateway.proxy.relay``, which answers the client and calls the plan's ``accept``, ``usage`` and ``finish`` on the
way. A client disconnect cancels the upstream request.

Nothing here blocks the event loop: a completion body of ``PLAN_IN_THREAD_BYTES`` or more is decoded, planned and
encoded in a worker thread (the planner then reads the live index on the loop). Below it the work is cheaper than
the hand-off: measured on a busy 2-core machine, decoding, planning and encoding a 64 KB RAG body inline cost
~0.9 ms CPU, a 128 KB one ~2.6 ms, while the three thread hand-offs add ~0.4 ms (``python -m bench path``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import httpx
import msgspec

from engines.base import EngineAdapter
from gateway.edge.access import Access
from gateway.edge.inbound import ClientGone, Receive, check_headers, check_passthrough_path, raw_path, read_body
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    TooManyRequests,
    malformed_json_is_400,
    upstream_error_from,
)
from gateway.ids import NO_BODY_IDS, BodyIds, KeyNamespaces, body_ids, mint_request_id, resolve_request_id
from gateway.logs import log_access, request_id_var
from gateway.metrics import Metrics
from gateway.planning.outcome import PlanInThread
from gateway.planning.plan import PlannedRequest, RequestPlanner, Upstream
from gateway.proxy.decisions import DecisionLog
from gateway.proxy.relay import Call, Relay, Send, send_error
from gateway.settings import Settings
from gateway.upstream.sender import UpstreamSender, request_headers
from gateway.upstream.transport import Undelivered
from gateway.wire import SHAPES
from gateway.wire.chat import CHAT_ROUTE, COMPLETIONS_ROUTE, RequestBody, decode_request

__all__ = ["PLAN_IN_THREAD_BYTES", "Proxy", "resendable"]

logger = logging.getLogger("prefixgate.proxy")

Scope = dict[str, Any]

COMPLETION_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE, *SHAPES})  # SHAPES: Anthropic Messages, Responses
PLAN_IN_THREAD_BYTES = 64 << 10  # measured: see the module doc
_encoder = msgspec.json.Encoder()
T = TypeVar("T")
# httpx errors raised before any byte of the request reached the engine: safe to send elsewhere
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# RFC 9110 §9.2.2: a repeat has the effect of one request
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_REROUTED = -1


class Proxy:
    """ASGI app answering every ``/v1/*`` request by forwarding it upstream."""

    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamSender,
        engine: EngineAdapter,
        metrics: Metrics,
        planner: RequestPlanner,
        *,
        issued: Callable[[str, str | None], bool] | None = None,
        namespaces: KeyNamespaces | None = None,
        passthrough_upstream: Callable[[], Upstream] | None = None,
        decisions: DecisionLog | None = None,
    ) -> None:
        self.settings = settings
        self.issued = issued  # ids the index API handed out: clients send them back as they are (batch flow)
        self.upstream = upstream
        self.engine = engine
        self.metrics = metrics
        self.planner = planner
        self.passthrough_upstream = passthrough_upstream  # several replicas: where non-planned requests go
        self._access = Access(settings, namespaces)
        self.decisions = decisions  # the operator view (``--decision-log``), None when off
        self.relay = Relay(metrics)
        self.streams = 0  # streaming completion requests in flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal: GatewayError | None = None
        try:
            namespace = self._access.client(headers)
            check_headers(scope["headers"])
        except GatewayError as exc:
            refusal, namespace = exc, None
        # a refused request never has its id honoured: the client proved nothing about who it is
        client_id = headers.get("x-request-id")
        request_id = mint_request_id() if refusal is not None else self._effective_id(client_id, namespace)
        token = request_id_var.set(request_id)
        path = raw_path(scope)
        route = path.decode("latin-1")
        route = route if route in COMPLETION_ROUTES else "passthrough"
        call = Call(send, request_id, route, started, [(b"x-request-id", request_id.encode())], namespace)
        call.tenant = None if self.settings.shared_cache else namespace
        call.header_id = bool(client_id)
        status = 500
        self.metrics.in_flight.inc()
        try:
            if refusal is not None:
                raise refusal
            status = await self._handle(scope, receive, headers, call)
        except ClientGone:
            status = 499
        except GatewayError as exc:
            status = exc.status
            await send_error(send, exc, request_id, route)
        finally:
            if call.stream_slot:
                self.streams -= 1
            if status == 499:
                self.metrics.disconnects.inc()
            self.metrics.in_flight.dec()
            self.metrics.answered(route, status, time.perf_counter() - started)
            if self.decisions is not None:
                self.decisions.add(call, status, time.perf_counter() - started)
            if self.settings.access_log:
                result = call.planned.result if call.planned is not None else {}
                log_access(call.request_id, route, status, result=result, cached_tokens=call.cached_tokens,
                           started=started)  # fmt: skip
            request_id_var.reset(token)

    def _effective_id(self, client_id: str | None, namespace: str | None) -> str:
        """An id the index API issued comes back as is; a client's own id is namespaced (``gateway.ids``)."""
        if client_id and self.issued is not None and self.issued(client_id, namespace):
            return client_id
        return resolve_request_id(client_id, namespace)

    async def _handle(self, scope: Scope, receive: Receive, headers: dict[str, str], call: Call) -> int:
        path = raw_path(scope)
        body = await read_body(receive, headers, self.settings.max_body_bytes)
        try:
            if call.route not in COMPLETION_ROUTES:
                check_passthrough_path(path)
                if self.passthrough_upstream is not None:
                    call.upstream = self.passthrough_upstream()
            elif scope["method"] != "POST":
                raise InvalidRequest(f"{call.route} accepts POST only", code="method_not_allowed")
            else:
                body = await self._prepare(body, headers, call)
            return await self._forward(scope, receive, path, body, call)
        finally:
            call.finish()

    async def _prepare(self, raw: bytes, headers: dict[str, str], call: Call) -> bytes:
        """Decode the body once, plan it, stamp the engine's request id, encode it once.

        A big body does this CPU work in a worker thread, so the event loop never waits on it.
        """
        in_thread = len(raw) >= PLAN_IN_THREAD_BYTES
        with malformed_json_is_400():
            body, ids = await _run(in_thread, _decode, raw, call.route)
            if ids.value is not None and not call.header_id:
                # the client chose its id in the body (SGLang's rid, vLLM's request_id): it becomes the request's id
                call.request_id = self._effective_id(ids.value, call.namespace)
                call.own_headers[0] = (b"x-request-id", call.request_id.encode())
                request_id_var.set(call.request_id)
            if body.stream:
                self._take_stream_slot(call)
            try:
                planned = await _run(in_thread, self._plan, body, headers, call, in_thread)
                moved = "size" if in_thread else None
            except PlanInThread:  # reading its texts took the inline slice of CPU: the rest is not the loop's
                planned, moved = await _run(True, self._plan, body, headers, call, True), "slow_texts"
            if moved is not None:
                self.metrics.planned_in_thread.labels(moved).inc()
            call.planned = planned
        call.body, call.headers, call.ids = body, headers, ids
        self._apply(body, planned, call)
        return await _run(in_thread, body.encode)

    def _apply(self, body: RequestBody, planned: PlannedRequest, call: Call) -> None:
        """Take the plan's result header, fields and upstream; stamp the request id the way its engine reads it."""
        call.upstream = getattr(planned, "upstream", None)
        engine = call.upstream.engine if call.upstream is not None else self.engine
        call.own_headers.append((b"x-prefixgate-result", _encoder.encode(planned.result)))
        body.update(planned.fields)
        body.update(engine.stamp_fields(call.request_id, call.ids.fields, call.ids.kept, call.route))
        if self.settings.kv_events_endpoint:
            body.update(engine.kv_event_fields(call.request_id, body))

    def _reroute(self, call: Call) -> bool:
        """The request never reached its replica: plan it for the next one (False when there is none)."""
        reroute = getattr(call.planned, "reroute", None)
        if reroute is None or call.body is None or call.headers is None:
            return False
        call.finish()  # the replica it was planned for does not serve it
        planned: PlannedRequest | None = reroute(call.body, call.headers)
        if planned is None:
            return False
        call.planned = planned
        call.body.changes.clear()
        call.own_headers[:] = [h for h in call.own_headers if h[0] != b"x-prefixgate-result"]
        self._apply(call.body, planned, call)
        call.payload = call.body.encode()
        return True

    def _plan(self, body: RequestBody, headers: dict[str, str], call: Call, in_thread: bool) -> PlannedRequest:
        planner = self.planner
        return planner.plan(
            body, call.request_id, headers, in_thread=in_thread, tenant=call.tenant, handoff=not in_thread
        )

    async def _forward(self, scope: Scope, receive: Receive, path: bytes, body: bytes, call: Call) -> int:
        target = path.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        call.payload = body
        status = 499
        # the disconnect watcher is a plain asyncio task, not an anyio task group (~10% of the gateway's CPU per
        # request, ``python -m bench proxy``); cancelled in ``finally`` before it can resume, it never outlives
        # the exchange and never cancels a scope that has exited
        with anyio.CancelScope() as watched:
            watcher = asyncio.ensure_future(_watch_disconnect(receive, watched))
            try:
                outcome = _REROUTED
                while outcome == _REROUTED:  # bounded: each reroute goes to a replica not tried yet
                    upstream = call.upstream
                    sender = upstream.sender if upstream is not None else self.upstream
                    engine = upstream.engine if upstream is not None else self.engine
                    outbound = request_headers(
                        scope["headers"],
                        strip_authorization=self._access.keyed,
                        upstream_api_key=self.settings.upstream_api_key,
                        extra=engine.stamp_headers(call.request_id) | _identity_encoding(call.planned),
                    )
                    request = sender.build(scope["method"], target, outbound, call.payload)
                    call.upstream_base = sender.base
                    outcome = await self._exchange(request, call, sender)
                status = outcome  # stays 499 when the client went away (the watcher cancelled the scope)
            finally:
                watcher.cancel()
        return status

    def _take_stream_slot(self, call: Call) -> None:
        limit = self.settings.max_concurrent_streams
        if self.streams >= limit:
            raise TooManyRequests(
                f"too many streaming requests in flight (limit {limit}); retry shortly",
                retry_after=1,
                code="too_many_streams",
            )
        self.streams += 1
        call.stream_slot = True

    async def _exchange(self, request: httpx.Request, call: Call, sender: UpstreamSender) -> int:
        """Send upstream and relay the answer; errors before the response starts become error responses."""
        try:
            try:
                response = await sender.send(request)
            except Undelivered:
                # it never reached the upstream whole (``may_resend``): sent once more unless the route has effects
                # a repeat could double; a second failure is the answer
                if not resendable(call.route, request.method):
                    raise
                self.metrics.upstream_errors.labels("closed_unanswered_resent").inc()
                response = await sender.send(request)
        except _NOT_SENT as exc:
            try:
                rerouted = self._reroute(call)
            except GatewayError as error:
                return await self.relay.fail(call, error)
            if rerouted:
                self.metrics.upstream_errors.labels(upstream_error_from(exc).code or "failed").inc()
                return _REROUTED
            return await self.relay.fail(call, upstream_error_from(exc))
        except httpx.HTTPError as exc:
            return await self.relay.fail(call, upstream_error_from(exc))
        try:
            return await self.relay.answer(response, call)
        except httpx.HTTPError as exc:
            return await self.relay.fail(call, upstream_error_from(exc))
        except GatewayError as exc:
            return await self.relay.fail(call, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


def resendable(route: str, method: str) -> bool:
    """Whether a request the upstream never got whole (``gateway.upstream.connection.may_resend``) may be sent again:
    a completion (the engine keeps nothing of one it did not answer) or an idempotent method; never a passthrough
    ``POST``/``PATCH`` (``/v1/batches``, ``/v1/files``, ``/v1/fine_tuning/jobs``: a job or a file made twice)."""
    return route != "passthrough" or method in _IDEMPOTENT


def _decode(raw: bytes, route: str) -> tuple[RequestBody, BodyIds]:
    """The body, and the ids the client put in it (the top level is decoded only when one may be there)."""
    body = decode_request(raw, route)
    return body, body_ids(body.top) if b'"rid"' in raw or b'"request_id"' in raw else NO_BODY_IDS


def _identity_encoding(planned: PlannedRequest | None) -> dict[str, str]:
    """An answer the gateway rewrites (citation mapping) must come uncompressed."""
    return {"accept-encoding": "identity"} if planned is not None and planned.answer is not None else {}


async def _run(in_thread: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when ``in_thread``."""
    return await anyio.to_thread.run_sync(fn, *args) if in_thread else fn(*args)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
