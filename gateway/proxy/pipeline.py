"""The ``/v1/*`` reverse proxy, as a raw ASGI app mounted into the Litestar application: the request's path, read
top to bottom.

:class:`Proxy` runs one :class:`Exchange` per request, phase by phase. The path it sees is already normalised
(``gateway.app`` calls ``gateway.edge.inbound.normalise_path`` first), so the route is classified on the one spelling of
it. ``admit`` (check the client key, resolve the request id, namespaced by that key, see ``gateway.ids``; refuse header
values a server must not forward; classify the route), ``decode`` (read the body within the size limit; on a completion
route decode it once into a ``gateway.wire.chat.RequestBody``, a body ``rid``/``request_id`` becoming the request id,
and take a stream slot, 429 beyond ``max_concurrent_streams``), ``plan`` (one ``PlannedRequest`` made for the replica it
goes to, 413 beyond ``max_blocks_per_request``; its fields and the engine's request-id stamp applied; the body encoded
once), ``send`` (to the next replica when one could not be reached; once more only when it never reached the upstream
whole, ``resendable``; a 2xx head is the engine accepting the request), ``relay`` (``gateway.proxy.relay`` streams the
answer and reports what it saw) and ``settle`` (the plan's ``usage`` and ``finish``, then the answer's last message). A
client disconnect cancels the upstream request. The exchange owns the request's state; the relay runs nothing of the
plan's lifecycle.

Nothing here blocks the event loop: a completion body of ``PLAN_IN_THREAD_BYTES`` or more is decoded, read (the
planner's first phase, ``Planner.read``) and encoded in a worker thread; planning it against the live index runs on
the loop. Below it the work is cheaper than the hand-off: measured on a busy 2-core machine, decoding, planning
and encoding a 64 KB RAG body inline cost ~0.9 ms CPU, a 128 KB one ~2.6 ms, while the three thread hand-offs add
~0.4 ms (``python -m bench path``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
import msgspec

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
from gateway.planning.plan import PlannedRequest, RequestPlanner, Upstream
from gateway.proxy.decisions import DecisionLog
from gateway.proxy.relay import Relay, Relayed, Send, send_error
from gateway.settings import Settings
from gateway.upstream.sender import UpstreamSender, request_headers
from gateway.upstream.transport import Undelivered
from gateway.wire import SHAPES
from gateway.wire.chat import CHAT_ROUTE, COMPLETIONS_ROUTE, RequestBody, decode_request
from gateway.wire.walk import AnswerRewriter

__all__ = ["PLAN_IN_THREAD_BYTES", "Exchange", "Proxy", "resendable"]

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


class Proxy:
    """ASGI app answering every ``/v1/*`` request by forwarding it upstream, one :class:`Exchange` per request."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        planner: RequestPlanner,
        passthrough: Callable[[], Upstream],
        *,
        issued: Callable[[str, str | None], bool] | None = None,
        namespaces: KeyNamespaces | None = None,
        decisions: DecisionLog | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.planner = planner  # plans a completion request for the replica it goes to
        self.passthrough = passthrough  # where a request the planner does not see goes
        self.issued = issued  # ids the index API handed out: clients send them back as they are (batch flow)
        self.access = Access(settings, namespaces)
        self.decisions = decisions  # the operator view (``--decision-log``), None when off
        self.relay = Relay(metrics)
        self.streams = 0  # streaming completion requests in flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(self, scope, receive, send)
        refusal = exchange.admit()
        token = request_id_var.set(exchange.request_id)
        self.metrics.in_flight.inc()
        try:
            if refusal is not None:
                raise refusal
            await exchange.decode()
            await exchange.plan()
            with exchange.watch_disconnect():  # the client leaving cancels what follows (the status stays 499)
                response = await exchange.send()
                relayed = await exchange.relay(response)
                await exchange.settle(relayed)
        except ClientGone:
            exchange.status = 499
        except GatewayError as exc:
            exchange.status = exc.status
            await send_error(send, exc, exchange.request_id, exchange.route)
        finally:
            exchange.close()
            request_id_var.reset(token)

    def effective_id(self, client_id: str | None, namespace: str | None) -> str:
        """An id the index API issued comes back as is; a client's own id is namespaced (``gateway.ids``)."""
        if client_id and self.issued is not None and self.issued(client_id, namespace):
            return client_id
        return resolve_request_id(client_id, namespace)


class Exchange:
    """One proxied request, from its head to its settled answer: all that is known about it, and its phases, which
    :class:`Proxy` runs in order (admit, decode, plan, send, relay, settle; ``close`` counts it)."""

    __slots__ = ("body", "cached_tokens", "header_id", "headers", "ids", "namespace", "own_headers", "path", "payload",
                 "planned", "proxy", "receive", "request_id", "route", "scope", "started", "status", "stream_slot",
                 "tenant", "to_client", "upstream", "upstream_base")  # fmt: skip

    def __init__(self, proxy: Proxy, scope: Scope, receive: Receive, send: Send) -> None:
        self.proxy = proxy
        self.scope = scope
        self.receive = receive
        self.to_client = send
        self.started = time.perf_counter()
        self.status = 500  # until it is answered
        self.headers: dict[str, str] = {}
        self.path = b""
        self.route = "passthrough"  # or one of ``COMPLETION_ROUTES``
        self.request_id = ""
        self.own_headers: list[tuple[bytes, bytes]] = []  # the gateway's headers on the answer
        self.namespace: str | None = None  # the client key's namespace
        self.tenant: str | None = None  # the key's namespace when planning state is per key (docs/reliability.md)
        self.header_id = False  # the client chose its id in X-Request-Id (it wins over body ids)
        self.stream_slot = False
        self.body: RequestBody | None = None  # a completion request's view (kept to plan it again for another replica)
        self.ids: BodyIds = NO_BODY_IDS  # the id fields the client sent in the body
        self.planned: PlannedRequest | None = None
        self.upstream: Upstream | None = None  # where it goes
        self.upstream_base = ""  # the URL of the upstream it went to (its redirects are rewritten)
        self.payload = b""  # the body as forwarded
        self.cached_tokens: int | None = None  # engine-reported, for the access and decision logs

    @property
    def answer(self) -> AnswerRewriter | None:
        """What rewrites the answer (citation mapping), if anything does."""
        return self.planned.answer if self.planned is not None else None

    def admit(self) -> GatewayError | None:
        """Who asks (the client key's namespace), the request id, the route; return the refusal of a key or a header
        (a refused request never has its id honoured: the client proved nothing about who it is)."""
        proxy, raw_headers = self.proxy, self.scope["headers"]
        self.headers = headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        refusal: GatewayError | None = None
        try:
            self.namespace = proxy.access.client(headers)
            check_headers(raw_headers)
        except GatewayError as exc:
            refusal, self.namespace = exc, None
        client_id = headers.get("x-request-id")
        self.request_id = mint_request_id() if refusal is not None else proxy.effective_id(client_id, self.namespace)
        self.own_headers.append((b"x-request-id", self.request_id.encode()))
        self.path = raw_path(self.scope)
        route = self.path.decode("latin-1")
        self.route = route if route in COMPLETION_ROUTES else "passthrough"
        self.tenant = None if proxy.settings.shared_cache else self.namespace
        self.header_id = bool(client_id)
        return refusal

    async def decode(self) -> None:
        """Read the body within the size limit. A passthrough request is forwarded as it came, to the passthrough
        upstream; a completion request's body is decoded once (a body id becomes the request id) and a streaming
        one takes a stream slot. A big body is decoded in a worker thread."""
        self.payload = raw = await read_body(self.receive, self.headers, self.proxy.settings.max_body_bytes)
        if self.route == "passthrough":
            check_passthrough_path(self.path)
            self.upstream = self.proxy.passthrough()
            return
        if self.scope["method"] != "POST":
            raise InvalidRequest(f"{self.route} accepts POST only", code="method_not_allowed")
        with malformed_json_is_400():
            self.body, self.ids = body, ids = await _run(len(raw) >= PLAN_IN_THREAD_BYTES, _decode, raw, self.route)
        if ids.value is not None and not self.header_id:
            # the client chose its id in the body (SGLang's rid, vLLM's request_id): it becomes the request's id
            self.request_id = self.proxy.effective_id(ids.value, self.namespace)
            self.own_headers[0] = (b"x-request-id", self.request_id.encode())
            request_id_var.set(self.request_id)
        if body.stream:
            self._take_stream_slot()

    async def plan(self) -> None:
        """Plan a completion request for the replica it goes to, apply the plan and encode the body once.

        Reading the request (``Planner.read``: its texts' groups and meaning, no index) is the part that may take
        CPU: a big body is read in a worker thread, and so is the rest of one whose texts took the event loop's
        inline slice (``Reading.complete``). Planning it against the live index and splicing (``Planner.plan``) run
        on the loop; a big body is encoded in a worker thread.
        """
        body = self.body
        if body is None:
            return
        big = len(body.raw) >= PLAN_IN_THREAD_BYTES
        planner = self.proxy.planner
        client = self.namespace if self.tenant is None else None  # keys sharing the planning state
        read = partial(planner.read, body, self.headers, tenant=self.tenant, client=client)
        with malformed_json_is_400():
            reading = await _run(big, partial(read, inline=not big))
            moved = "size" if big else None
            if not reading.complete:  # its texts took the loop's inline slice: the rest is read in a worker thread
                reading, moved = await _run(True, partial(read, resume=reading)), "slow_texts"
            planned = planner.plan(reading, self.request_id)
        if moved is not None:
            self.proxy.metrics.planned_in_thread.labels(moved).inc()
        self._apply(planned)
        self.payload = await _run(big, body.encode)

    async def send(self) -> httpx.Response | None:
        """Send the request upstream and take the answer's head; None when it failed (the client has its error).

        A request that never reached the upstream whole is sent once more (``resendable``); one that could not be
        sent at all is planned for the next replica. A 2xx head is the engine accepting the request: ``accept``
        commits what it was sent to the live index before the answer is relayed.
        """
        proxy = self.proxy
        target = self.path.decode("latin-1")
        if self.scope.get("query_string"):
            target += "?" + self.scope["query_string"].decode("latin-1")
        while True:  # bounded: each reroute goes to a replica not tried yet
            upstream = self.upstream
            assert upstream is not None, "decode (passthrough) or plan chose the upstream"
            outbound = request_headers(
                self.scope["headers"],
                strip_authorization=proxy.access.keyed,
                upstream_api_key=proxy.settings.upstream_api_key,
                extra=upstream.engine.stamp_headers(self.request_id) | _identity_encoding(self.planned),
            )
            request = upstream.sender.build(self.scope["method"], target, outbound, self.payload)
            self.upstream_base = upstream.sender.base
            try:
                response = await self._deliver(upstream.sender, request)
                break
            except _NOT_SENT as exc:
                try:
                    rerouted = self._reroute()
                except GatewayError as error:
                    await self.fail(error)
                    return None
                if not rerouted:
                    await self.fail(upstream_error_from(exc))
                    return None
                proxy.metrics.upstream_errors.labels(upstream_error_from(exc).code or "failed").inc()
            except httpx.HTTPError as exc:
                await self.fail(upstream_error_from(exc))
                return None
        if self.planned is not None:
            self.planned.responded(response.status_code)
            if response.status_code < 300:
                self.planned.accept()  # the engine accepted the request: what it was sent is now in its cache
        return response

    async def relay(self, response: httpx.Response | None) -> Relayed | None:
        """Stream the answer to the client (``gateway.proxy.relay``), which reports what it saw; None when it failed
        before the first byte went out (the client then has its error). The upstream response is closed."""
        if response is None:
            return None
        try:
            return await self.proxy.relay.answer(response, self)
        except httpx.HTTPError as exc:
            await self.fail(upstream_error_from(exc))
        except GatewayError as exc:
            await self.fail(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        return None

    async def settle(self, relayed: Relayed | None) -> None:
        """Give the plan what the relay saw (a failure, the cached tokens the engine reported), free what the
        request held upstream (``finish``), then send the answer's last message: in that order, so that a client
        that sends its next request the moment this one ends finds the gateway's view of the upstream up to date."""
        if relayed is None:
            return
        self.cached_tokens = relayed.cached_tokens
        planned = self.planned
        if planned is not None:
            if relayed.failure is not None:
                planned.failed(relayed.failure)
            planned.usage(relayed.cached_tokens, relayed.prompt_tokens)
            planned.finish()
        await self.to_client({"type": "http.response.body", "body": relayed.tail, "more_body": False})
        self.status = relayed.status

    async def fail(self, error: GatewayError) -> None:
        """Answer with the upstream side's ``error`` (nothing was sent to the client yet)."""
        self.proxy.metrics.upstream_errors.labels(error.code or "failed").inc()
        logger.warning("upstream request failed: %s", error.code)
        if self.planned is not None and error.status >= 500:
            self.planned.failed(error.code or "failed")
        await send_error(self.to_client, error, self.request_id, self.route)
        self.status = error.status

    def close(self) -> None:
        """Once answered: the upstream done with it (idempotent), its stream slot back, counted in ``/metrics``, the
        decision log and the access log."""
        proxy, metrics, status = self.proxy, self.proxy.metrics, self.status
        if self.planned is not None:
            self.planned.finish()
        if self.stream_slot:
            proxy.streams -= 1
        if status == 499:
            metrics.disconnects.inc()
        metrics.in_flight.dec()
        latency = time.perf_counter() - self.started
        metrics.answered(self.route, status, latency)
        if proxy.decisions is not None:
            proxy.decisions.add(self, status, latency)
        if proxy.settings.access_log:
            result = self.planned.result if self.planned is not None else {}
            log_access(self.request_id, self.route, status, result=result, cached_tokens=self.cached_tokens,
                       started=self.started)  # fmt: skip

    def watch_disconnect(self) -> _Watch:
        """A scope the client's disconnect cancels; the status is 499 until the answer is complete."""
        self.status = 499
        return _Watch(self.receive)

    def _apply(self, planned: PlannedRequest) -> None:
        """Take the plan, its result header, fields and upstream; stamp the request id the way its engine reads it."""
        body = self.body
        assert body is not None and planned.upstream is not None, "a completion request, planned by the router"
        self.planned, self.upstream = planned, planned.upstream
        engine = planned.upstream.engine
        self.own_headers.append((b"x-prefixgate-result", _encoder.encode(planned.result)))
        body.update(planned.fields)
        body.update(engine.stamp_fields(self.request_id, self.ids.fields, self.ids.kept, self.route))
        if self.proxy.settings.kv_events_endpoint:
            body.update(engine.kv_event_fields(self.request_id, body))

    def _reroute(self) -> bool:
        """The request never reached its replica: plan it for the next one (False when there is none)."""
        if self.planned is None or self.body is None:
            return False
        self.planned.finish()  # the replica it was planned for does not serve it
        planned = self.planned.reroute(self.body, self.headers)
        if planned is None:
            return False
        self.body.changes.clear()
        self.own_headers[:] = [h for h in self.own_headers if h[0] != b"x-prefixgate-result"]
        self._apply(planned)
        self.payload = self.body.encode()
        return True

    async def _deliver(self, sender: UpstreamSender, request: httpx.Request) -> httpx.Response:
        try:
            return await sender.send(request)
        except Undelivered:
            # it never reached the upstream whole (``may_resend``): sent once more unless the route has effects a
            # repeat could double; a second failure is the answer
            if not resendable(self.route, request.method):
                raise
            self.proxy.metrics.upstream_errors.labels("closed_unanswered_resent").inc()
            return await sender.send(request)

    def _take_stream_slot(self) -> None:
        proxy, limit = self.proxy, self.proxy.settings.max_concurrent_streams
        if proxy.streams >= limit:
            raise TooManyRequests(
                f"too many streaming requests in flight (limit {limit}); retry shortly",
                retry_after=1,
                code="too_many_streams",
            )
        proxy.streams += 1
        self.stream_slot = True


class _Watch:
    """Cancels what runs inside it when the client disconnects.

    The watcher is a plain asyncio task, not an anyio task group (~10% of the gateway's CPU per request, ``python -m
    bench proxy``); cancelled on exit before it can resume, it never outlives the exchange and never cancels a scope
    that has exited.
    """

    __slots__ = ("_receive", "_scope", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._scope = anyio.CancelScope()
        self._watcher: asyncio.Future[None] | None = None

    def __enter__(self) -> None:
        self._scope.__enter__()
        self._watcher = asyncio.ensure_future(_watch_disconnect(self._receive, self._scope))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if self._watcher is not None:
            self._watcher.cancel()
        return self._scope.__exit__(kind, error, traceback)


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
