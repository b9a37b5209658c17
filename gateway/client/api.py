"""Python clients for prefixgate's index API (``/reorder``, ``/evict``, ``/deduplicate``, ...), sync and async.

:class:`IndexClient` and :class:`AsyncIndexClient` have the method names, arguments and return shapes of
ContextPilot 0.5.0's ``ContextPilotIndexClient``, so moving over is a one-line import change
(``ContextPilotIndexClient`` is exported as an alias of :class:`IndexClient`). One difference is deliberate:
failures raise instead of returning ``None``::

    IndexClientError              anything this module raises
    ├── IndexAPIError             the server answered 4xx/5xx (or an unreadable body): status, type, param, code
    └── IndexUnavailable          no answer: connection refused or reset, DNS, timeout

The errors, the payloads and the reading of answers live in :mod:`gateway.client.wire` (one place for each); the
errors and ``ReorderOptions`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar, Unpack, cast

import httpx

from gateway.client.wire import (
    IndexAPIError,
    IndexClientError,
    IndexUnavailable,
    ReorderOptions,
    decode_response,
    dedup_payload,
    is_ready_health,
    reorder_pair,
    reorder_payload,
    transport_error,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "AsyncIndexClient",
    "ContextPilotIndexClient",
    "IndexAPIError",
    "IndexClient",
    "IndexClientError",
    "IndexUnavailable",
    "ReorderOptions",
]

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8765"
# a big /reorder batch is planned server-side in seconds, not milliseconds; connecting should be quick
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=5.0)

Doc = TypeVar("Doc", int, str)


class _ClientBase:
    """What the sync and async clients share: where the server is, credentials, timeouts."""

    def __init__(self, base_url: str, admin_token: str | None, timeout: float | httpx.Timeout | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = DEFAULT_TIMEOUT if timeout is None else httpx.Timeout(timeout)
        self._headers = {"accept": "application/json"}
        if admin_token:
            # the gateway only checks it on state-changing routes; sending it everywhere keeps this simple
            self._headers["authorization"] = f"Bearer {admin_token}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class IndexClient(_ClientBase):
    """Blocking client for the index API; a drop-in for ContextPilot's ``ContextPilotIndexClient`` that raises.

    ``timeout`` is seconds (or an ``httpx.Timeout``); ``transport`` replaces the network (tests, custom TLS).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        admin_token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, admin_token, timeout)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport
        )

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise transport_error(exc, method, self.base_url + path) from exc
        return decode_response(response)

    def reorder(
        self, contexts: Sequence[Sequence[Doc]], **options: Unpack[ReorderOptions]
    ) -> tuple[list[list[Doc]], list[int]]:
        """Reorder contexts for prefix sharing: ``(reordered_contexts, original_indices)``, in execution order.

        ``reordered_contexts[i]`` is ``contexts[original_indices[i]]`` with its documents reordered.
        """
        return cast("tuple[list[list[Doc]], list[int]]", reorder_pair(self.reorder_raw(contexts, **options)))

    def reorder_raw(
        self, contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]], **options: Unpack[ReorderOptions]
    ) -> dict[str, Any]:
        """``POST /reorder``; the whole answer (``request_ids`` in input order, ``scheduled_request_ids``, ...)."""
        return self._request("POST", "/reorder", reorder_payload(contexts, options))

    build = reorder_raw  # deprecated in ContextPilot too

    def schedule(
        self,
        contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]],
        *,
        alpha: float = 0.001,
        use_gpu: bool = False,
        linkage_method: str = "average",
        conversation_ids: Sequence[str | None] | None = None,
    ) -> dict[str, Any]:
        """Deprecated: ``POST /schedule``, a reorder that never touches the live index."""
        options: ReorderOptions = {"alpha": alpha, "use_gpu": use_gpu, "linkage_method": linkage_method}
        payload = reorder_payload(contexts, {**options, "conversation_ids": conversation_ids})
        return self._request("POST", "/schedule", payload)

    def evict(self, request_ids: Sequence[str]) -> dict[str, Any]:
        """``POST /evict``: release requests the engine evicted (``removed_count``, ``not_found``, ...)."""
        return self._request("POST", "/evict", {"request_ids": list(request_ids)})

    def deduplicate(
        self,
        contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]],
        parent_request_ids: Sequence[str | None],
        hint_template: str | None = None,
    ) -> dict[str, Any]:
        """``POST /deduplicate``: per context, the docs its parent chain already sent and the new ones."""
        return self._request("POST", "/deduplicate", dedup_payload(contexts, parent_request_ids, hint_template))

    def search(self, context: Sequence[int] | Sequence[str], update_access: bool = True) -> dict[str, Any]:
        """``POST /search``: how many leading blocks of ``context`` the live index holds."""
        return self._request("POST", "/search", {"context": list(context), "update_access": update_access})

    def insert(
        self, context: Sequence[int] | Sequence[str], search_path: Sequence[int], total_tokens: int = 0
    ) -> dict[str, Any]:
        """``POST /insert``: record ``context`` as sent, under a new request id."""
        payload = {"context": list(context), "search_path": list(search_path), "total_tokens": total_tokens}
        return self._request("POST", "/insert", payload)

    def update_node(self, search_path: Sequence[int], token_delta: int) -> dict[str, Any]:
        """``POST /update``: accepted for compatibility; prefixgate does not track per-node token counts."""
        return self._request("POST", "/update", {"search_path": list(search_path), "token_delta": token_delta})

    def reset(self) -> dict[str, Any]:
        """``POST /reset``: forget the live index and conversation history."""
        return self._request("POST", "/reset", {})

    def stats(self) -> dict[str, Any]:
        """``GET /stats``: live index counters."""
        return self._request("GET", "/stats")

    get_stats = stats

    def get_requests(self) -> dict[str, Any]:
        """``GET /requests``: live request ids, least recently committed first."""
        return self._request("GET", "/requests")

    def health(self) -> dict[str, Any]:
        """``GET /health``: liveness (200 from the start) with the mode and index size."""
        return self._request("GET", "/health")

    def is_ready(self) -> bool:
        """Whether ``/health`` answers ``ready``; ``False`` (never an exception) when it cannot tell."""
        try:
            return is_ready_health(self.health())
        except IndexClientError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncIndexClient(_ClientBase):
    """The asyncio/trio counterpart of :class:`IndexClient`: the same methods, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        admin_token: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, admin_token, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport
        )

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise transport_error(exc, method, self.base_url + path) from exc
        return decode_response(response)

    async def reorder(
        self, contexts: Sequence[Sequence[Doc]], **options: Unpack[ReorderOptions]
    ) -> tuple[list[list[Doc]], list[int]]:
        """Reorder contexts for prefix sharing: ``(reordered_contexts, original_indices)``, in execution order."""
        pair = reorder_pair(await self.reorder_raw(contexts, **options))
        return cast("tuple[list[list[Doc]], list[int]]", pair)

    async def reorder_raw(
        self, contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]], **options: Unpack[ReorderOptions]
    ) -> dict[str, Any]:
        """``POST /reorder``; the whole answer."""
        return await self._request("POST", "/reorder", reorder_payload(contexts, options))

    build = reorder_raw  # deprecated in ContextPilot too

    async def schedule(
        self,
        contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]],
        *,
        alpha: float = 0.001,
        use_gpu: bool = False,
        linkage_method: str = "average",
        conversation_ids: Sequence[str | None] | None = None,
    ) -> dict[str, Any]:
        """Deprecated: ``POST /schedule``, a reorder that never touches the live index."""
        options: ReorderOptions = {"alpha": alpha, "use_gpu": use_gpu, "linkage_method": linkage_method}
        payload = reorder_payload(contexts, {**options, "conversation_ids": conversation_ids})
        return await self._request("POST", "/schedule", payload)

    async def evict(self, request_ids: Sequence[str]) -> dict[str, Any]:
        """``POST /evict``: release requests the engine evicted."""
        return await self._request("POST", "/evict", {"request_ids": list(request_ids)})

    async def deduplicate(
        self,
        contexts: Sequence[Sequence[int]] | Sequence[Sequence[str]],
        parent_request_ids: Sequence[str | None],
        hint_template: str | None = None,
    ) -> dict[str, Any]:
        """``POST /deduplicate``."""
        return await self._request("POST", "/deduplicate", dedup_payload(contexts, parent_request_ids, hint_template))

    async def search(self, context: Sequence[int] | Sequence[str], update_access: bool = True) -> dict[str, Any]:
        """``POST /search``."""
        return await self._request("POST", "/search", {"context": list(context), "update_access": update_access})

    async def insert(
        self, context: Sequence[int] | Sequence[str], search_path: Sequence[int], total_tokens: int = 0
    ) -> dict[str, Any]:
        """``POST /insert``."""
        payload = {"context": list(context), "search_path": list(search_path), "total_tokens": total_tokens}
        return await self._request("POST", "/insert", payload)

    async def update_node(self, search_path: Sequence[int], token_delta: int) -> dict[str, Any]:
        """``POST /update`` (accepted for compatibility; changes nothing)."""
        payload = {"search_path": list(search_path), "token_delta": token_delta}
        return await self._request("POST", "/update", payload)

    async def reset(self) -> dict[str, Any]:
        """``POST /reset``."""
        return await self._request("POST", "/reset", {})

    async def stats(self) -> dict[str, Any]:
        """``GET /stats``."""
        return await self._request("GET", "/stats")

    get_stats = stats

    async def get_requests(self) -> dict[str, Any]:
        """``GET /requests``."""
        return await self._request("GET", "/requests")

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return await self._request("GET", "/health")

    async def is_ready(self) -> bool:
        """Whether ``/health`` answers ``ready``; ``False`` (never an exception) when it cannot tell."""
        try:
            return is_ready_health(await self.health())
        except IndexClientError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


ContextPilotIndexClient = IndexClient
"""ContextPilot's class name, for a one-line import change."""
