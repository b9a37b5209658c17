"""``gateway.client.api``: the exact requests each method sends, error mapping, context managers, the alias."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import respx

import gateway.client.api as client_module
from gateway.client.api import (
    DEFAULT_TIMEOUT,
    AsyncIndexClient,
    ContextPilotIndexClient,
    IndexAPIError,
    IndexClient,
    IndexClientError,
    IndexUnavailable,
)

BASE = "http://index.test:8765"
CP_DEFAULTS = {"alpha": 0.001, "use_gpu": False, "linkage_method": "average", "initial_tokens_per_context": 0}
REORDERED = {"reordered_contexts": [["b", "a"], ["c"]], "original_indices": [1, 0], "request_ids": ["r0", "r1"]}

# every public method of ContextPilot 0.5.0's ContextPilotIndexClient (contextpilot/server/http_client.py)
CONTEXTPILOT_METHODS = [
    "evict",
    "search",
    "update_node",
    "insert",
    "reorder",
    "reorder_raw",
    "build",
    "schedule",
    "deduplicate",
    "reset",
    "get_requests",
    "get_stats",
    "health",
    "is_ready",
    "close",
    "__enter__",
    "__exit__",
]


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sync_client(router: respx.Router, **kwargs: Any) -> IndexClient:
    return IndexClient(BASE, transport=httpx.MockTransport(router.handler), **kwargs)


def async_client(router: respx.Router, **kwargs: Any) -> AsyncIndexClient:
    return AsyncIndexClient(BASE, transport=httpx.MockTransport(router.async_handler), **kwargs)


def sent_json(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


# (call, method, path, body sent or None for a GET)
CALLS: list[tuple[Callable[[Any], Any], str, str, Any]] = [
    (lambda c: c.evict(["req-1", "req-2"]), "POST", "/evict", {"request_ids": ["req-1", "req-2"]}),
    (
        lambda c: c.deduplicate([[1, 2]], ["req-1"]),
        "POST",
        "/deduplicate",
        {"contexts": [[1, 2]], "parent_request_ids": ["req-1"]},
    ),
    (
        lambda c: c.deduplicate([["a"]], [None], hint_template="see {doc_id}"),
        "POST",
        "/deduplicate",
        {"contexts": [["a"]], "parent_request_ids": [None], "hint_template": "see {doc_id}"},
    ),
    (lambda c: c.reset(), "POST", "/reset", {}),
    (lambda c: c.stats(), "GET", "/stats", None),
    (lambda c: c.get_stats(), "GET", "/stats", None),
    (lambda c: c.get_requests(), "GET", "/requests", None),
    (lambda c: c.health(), "GET", "/health", None),
    (lambda c: c.search([1, 2]), "POST", "/search", {"context": [1, 2], "update_access": True}),
    (
        lambda c: c.insert((1, 2), [0], total_tokens=5),
        "POST",
        "/insert",
        {"context": [1, 2], "search_path": [0], "total_tokens": 5},
    ),
    (lambda c: c.update_node([0, 1], 3), "POST", "/update", {"search_path": [0, 1], "token_delta": 3}),
    (
        lambda c: c.schedule([[1, 2]], alpha=0.5),
        "POST",
        "/schedule",
        {"contexts": [[1, 2]], **CP_DEFAULTS, "alpha": 0.5, "deduplicate": False},
    ),
    (
        lambda c: c.build([[1, 2]], deduplicate=True),
        "POST",
        "/reorder",
        {"contexts": [[1, 2]], **CP_DEFAULTS, "deduplicate": True},
    ),
    (
        lambda c: c.reorder_raw([(3, 1)], parent_request_ids=("req-0",), hint_template=None),
        "POST",
        "/reorder",
        {"contexts": [[3, 1]], **CP_DEFAULTS, "deduplicate": False, "parent_request_ids": ["req-0"]},
    ),
]


@pytest.mark.parametrize(("call", "method", "path", "body"), CALLS)
def test_sync_requests_sent(
    router: respx.Router, call: Callable[[Any], Any], method: str, path: str, body: Any
) -> None:
    route = router.route(method=method, path=path).respond(200, json={"status": "success"})
    with sync_client(router) as client:
        assert call(client) == {"status": "success"}
    request = route.calls.last.request
    assert route.call_count == 1
    if body is None:
        assert request.content == b""
    else:
        assert request.headers["content-type"] == "application/json"
        assert sent_json(route) == body
    assert "authorization" not in request.headers


@pytest.mark.anyio
@pytest.mark.parametrize(("call", "method", "path", "body"), CALLS)
async def test_async_requests_sent(
    router: respx.Router, call: Callable[[Any], Any], method: str, path: str, body: Any
) -> None:
    route = router.route(method=method, path=path).respond(200, json={"status": "success"})
    async with async_client(router) as client:
        assert await call(client) == {"status": "success"}
    assert route.call_count == 1
    if body is not None:
        assert sent_json(route) == body


def test_reorder_returns_the_pair_and_sends_contextpilot_defaults(router: respx.Router) -> None:
    route = router.post("/reorder").respond(200, json=REORDERED)
    with sync_client(router) as client:
        reordered, order = client.reorder([["a", "b"], ["c"]])
    assert (reordered, order) == (REORDERED["reordered_contexts"], REORDERED["original_indices"])
    assert sent_json(route) == {"contexts": [["a", "b"], ["c"]], **CP_DEFAULTS, "deduplicate": False}


@pytest.mark.anyio
async def test_async_reorder_and_raw(router: respx.Router) -> None:
    route = router.post("/reorder").respond(200, json=REORDERED)
    async with async_client(router) as client:
        pair = await client.reorder([[1, 2]], deduplicate=True, parent_request_ids=[None])
        raw = await client.reorder_raw([[1, 2]])
    assert pair == (REORDERED["reordered_contexts"], REORDERED["original_indices"])
    assert raw == REORDERED
    assert json.loads(route.calls[0].request.content)["parent_request_ids"] == [None]
    assert "parent_request_ids" not in json.loads(route.calls[1].request.content)


def test_reorder_rejects_unknown_options_before_sending(router: respx.Router) -> None:
    route = router.post("/reorder").respond(200, json=REORDERED)
    with sync_client(router) as client, pytest.raises(TypeError, match="bogus"):
        client.reorder([[1]], bogus=1)  # type: ignore[call-arg]
    assert route.call_count == 0


def test_reorder_answer_without_the_pair_is_an_api_error(router: respx.Router) -> None:
    router.post("/reorder").respond(200, json={"status": "success"})
    with sync_client(router) as client, pytest.raises(IndexAPIError, match="reordered_contexts") as caught:
        client.reorder([[1]])
    assert caught.value.type == "invalid_response"


def test_admin_token_is_a_bearer_header(router: respx.Router) -> None:
    route = router.post("/evict").respond(200, json={"status": "success"})
    with sync_client(router, admin_token="s3cret") as client:
        client.evict([])
    assert route.calls.last.request.headers["authorization"] == "Bearer s3cret"


def test_openai_error_envelope_becomes_index_api_error(router: respx.Router) -> None:
    error = {"message": "contexts must be ...", "type": "invalid_request_error", "param": "contexts[0][1]", "code": "x"}
    router.post("/reorder").respond(400, json={"error": error}, headers={"x-request-id": "req-abc"})
    with sync_client(router) as client, pytest.raises(IndexAPIError) as caught:
        client.reorder_raw([[1, "a"]])  # type: ignore[arg-type]
    exc = caught.value
    assert (exc.status, exc.type, exc.param, exc.code) == (400, "invalid_request_error", "contexts[0][1]", "x")
    assert exc.message == "contexts must be ..."
    assert exc.request_id == "req-abc"
    assert str(exc) == "400: contexts must be ..."
    assert isinstance(exc, IndexClientError)


@pytest.mark.parametrize(
    ("response", "status", "message"),
    [
        (
            httpx.Response(401, json={"error": {"message": "needs the admin token", "type": "authentication_error"}}),
            401,
            "needs the admin token",
        ),
        (httpx.Response(404, json={"detail": "Not Found"}), 404, "Not Found"),  # ContextPilot's FastAPI shape
        (
            httpx.Response(503, json={"status": "not_ready", "message": "Index not initialized"}),
            503,
            "Index not initialized",
        ),
        (httpx.Response(500, text="Internal Server Error"), 500, "Internal Server Error"),
        (httpx.Response(502), 502, "Bad Gateway"),
    ],
)
def test_other_error_bodies(router: respx.Router, response: httpx.Response, status: int, message: str) -> None:
    router.post("/reset").mock(return_value=response)
    with sync_client(router) as client, pytest.raises(IndexAPIError) as caught:
        client.reset()
    assert caught.value.status == status
    assert caught.value.message == message
    assert caught.value.param is None


@pytest.mark.parametrize("response", [httpx.Response(200, text="ok"), httpx.Response(200, json=[1, 2])])
def test_success_without_a_json_object_is_an_api_error(router: respx.Router, response: httpx.Response) -> None:
    router.get("/stats").mock(return_value=response)
    with sync_client(router) as client, pytest.raises(IndexAPIError) as caught:
        client.stats()
    assert (caught.value.status, caught.value.type) == (200, "invalid_response")


@pytest.mark.parametrize(
    ("error", "timed_out"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.RemoteProtocolError("reset"), False),
        (httpx.ReadTimeout("slow"), True),
        (httpx.ConnectTimeout("slow"), True),
    ],
)
def test_transport_errors_become_index_unavailable(
    router: respx.Router, error: httpx.HTTPError, timed_out: bool
) -> None:
    router.post("/evict").mock(side_effect=error)
    with sync_client(router) as client, pytest.raises(IndexUnavailable) as caught:
        client.evict(["req-1"])
    assert caught.value.timed_out is timed_out
    assert caught.value.__cause__ is not None
    assert f"{BASE}/evict" in str(caught.value)


@pytest.mark.anyio
async def test_async_errors(router: respx.Router) -> None:
    router.post("/evict").mock(side_effect=httpx.ConnectError("refused"))
    router.post("/reset").respond(401, json={"error": {"message": "no", "type": "authentication_error"}})
    async with async_client(router) as client:
        with pytest.raises(IndexUnavailable):
            await client.evict(["req-1"])
        with pytest.raises(IndexAPIError) as caught:
            await client.reset()
    assert (caught.value.status, caught.value.type) == (401, "authentication_error")


def test_is_ready(router: respx.Router) -> None:
    health = router.get("/health")
    with sync_client(router) as client:
        health.respond(200, json={"status": "ready"})
        assert client.is_ready() is True
        health.respond(503, json={"status": "not_ready"})
        assert client.is_ready() is False
        health.mock(side_effect=httpx.ConnectError("refused"))
        assert client.is_ready() is False


@pytest.mark.anyio
async def test_async_is_ready(router: respx.Router) -> None:
    health = router.get("/health")
    async with async_client(router) as client:
        health.respond(200, json={"status": "ready"})
        assert await client.is_ready() is True
        health.mock(side_effect=httpx.ReadTimeout("slow"))
        assert await client.is_ready() is False


def test_context_manager_and_close(router: respx.Router) -> None:
    with sync_client(router) as client:
        assert isinstance(client, IndexClient)
        assert not client._http.is_closed
    assert client._http.is_closed
    other = sync_client(router)
    other.close()
    assert other._http.is_closed


@pytest.mark.anyio
async def test_async_context_manager_and_close(router: respx.Router) -> None:
    async with async_client(router) as client:
        assert isinstance(client, AsyncIndexClient)
    assert client._http.is_closed
    other = async_client(router)
    await other.close()
    assert other._http.is_closed


def test_default_transport_is_httpx() -> None:
    # patching mode: the client's own httpx transport, intercepted
    with respx.mock(base_url="http://127.0.0.1:8765") as mock, IndexClient() as client:
        route = mock.get("/health").respond(200, json={"status": "ready", "mode": "live"})
        assert client.health()["mode"] == "live"
    assert route.called


def test_construction() -> None:
    with IndexClient("http://h:1/", timeout=2.5) as client:
        assert client.base_url == "http://h:1"
        assert client.timeout == httpx.Timeout(2.5)
        assert repr(client) == "IndexClient('http://h:1')"
    with IndexClient() as client:
        assert client.base_url == "http://127.0.0.1:8765"
        assert client.timeout == DEFAULT_TIMEOUT


def test_contextpilot_alias_and_method_names() -> None:
    assert ContextPilotIndexClient is IndexClient
    for name in CONTEXTPILOT_METHODS:
        assert callable(getattr(IndexClient, name)), name
        if not name.startswith("__") and name != "close":
            assert callable(getattr(AsyncIndexClient, name)), name
    assert IndexClient.get_stats is IndexClient.stats
    assert AsyncIndexClient.get_stats is AsyncIndexClient.stats
    assert callable(AsyncIndexClient.__aenter__) and callable(AsyncIndexClient.close)


def test_error_tree_and_exports() -> None:
    assert issubclass(IndexAPIError, IndexClientError)
    assert issubclass(IndexUnavailable, IndexClientError)
    assert not issubclass(IndexUnavailable, IndexAPIError)
    for name in client_module.__all__:
        assert hasattr(client_module, name), name
