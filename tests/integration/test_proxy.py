"""Proxy behaviour with the app in-process: exact bytes forwarded, headers, ids, errors."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import respx

from gateway.planning.planner import Planner
from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio

CHAT = (
    b'{"model": "m",  "messages": [{"role": "user", "content": "hi", "name": null}],'
    b' "vendor_x": {"a": [1, 2.50]}, "temperature": null, "tools": [{"type": "function",'
    b' "function": {"name": "f", "parameters": {}}}], "n": 2}'
)
COMPLETION_JSON = {
    "id": "cmpl-1",
    "object": "text_completion",
    "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
    "usage": {
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 3},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ok_json(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=COMPLETION_JSON, headers={"x-engine": "1"})


async def test_chat_body_forwarded_byte_for_byte(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.json() == COMPLETION_JSON
    assert response.headers["x-engine"] == "1"
    sent = route.calls.last.request
    assert sent.content == CHAT
    assert re.fullmatch(r"req-[0-9a-f]{32}", sent.headers["x-request-id"])
    assert response.headers["x-request-id"] == sent.headers["x-request-id"]


async def test_sglang_gets_rid_and_other_fields_keep_their_bytes(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(engine="sglang") as client:
        response = await client.post("/v1/chat/completions", content=CHAT, headers={"x-request-id": "client-abc.1:2"})
    assert response.headers["x-request-id"] == "client-abc.1:2"
    forwarded = msgspec.json.decode(route.calls.last.request.content, type=dict[str, msgspec.Raw])
    original = msgspec.json.decode(CHAT, type=dict[str, msgspec.Raw])
    assert bytes(forwarded.pop("rid")) == b'"client-abc.1:2"'
    assert {k: bytes(v) for k, v in forwarded.items()} == {k: bytes(v) for k, v in original.items()}


async def test_invalid_client_request_id_is_replaced(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway(engine="vllm") as client:
        response = await client.post(
            "/v1/completions", json={"model": "m", "prompt": "x"}, headers={"x-request-id": "bad id\twith spaces"}
        )
    sent_id = route.calls.last.request.headers["x-request-id"]
    assert re.fullmatch(r"req-[0-9a-f]{32}", sent_id)
    assert response.headers["x-request-id"] == sent_id


async def test_headers_filtered_both_ways(gateway: AppFactory, upstream: respx.Router) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json=COMPLETION_JSON, headers={"connection": "close", "keep-alive": "timeout=5", "x-ratelimit": "9"}
        )

    route = upstream.post("/v1/completions").mock(side_effect=reply)
    async with gateway() as client:
        response = await client.post(
            "/v1/completions",
            json={"prompt": "x"},
            headers={
                "authorization": "Bearer engine-key",
                "x-prefixgate-reorder": "off",
                "x-contextpilot-enabled": "false",
                "proxy-authorization": "secret",
                "x-custom": "kept",
            },
        )
    sent = route.calls.last.request.headers
    assert sent["authorization"] == "Bearer engine-key"
    assert sent["x-custom"] == "kept"
    for dropped in ("x-prefixgate-reorder", "x-contextpilot-enabled", "proxy-authorization"):
        assert dropped not in sent
    assert response.headers["x-ratelimit"] == "9"
    assert "keep-alive" not in response.headers


async def test_upstream_api_key_replaces_client_authorization(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway(upstream_api_key="up-secret") as client:
        await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer client"})
    assert route.calls.last.request.headers["authorization"] == "Bearer up-secret"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_body"),
        (b'"text"', None, "invalid_body"),
        (b'{"messages": "hello"}', "messages", "invalid_type"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", "invalid_type"),
        (b'{"messages": [], "stream": "yes"}', "stream", "invalid_type"),
        (b'{"model": "m"}', "messages", "missing"),
        (b"\xff\xfe{}", None, "invalid_json"),
    ],
)
async def test_bad_chat_bodies_get_400(
    gateway: AppFactory, upstream: respx.Router, body: bytes, param: str | None, code: str
) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    assert "x-request-id" in response.headers
    assert not route.called


async def test_bad_prompt_type_gets_400(gateway: AppFactory, upstream: respx.Router) -> None:
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": [1, "a"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


async def test_body_over_limit_gets_413(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway(max_body_bytes=100) as client:
        response = await client.post("/v1/completions", json={"prompt": "x" * 200})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert not route.called


async def test_api_keys(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway(api_key=("k1", "k2")) as client:
        missing = await client.post("/v1/completions", json={"prompt": "x"})
        wrong = await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer k3"})
        good = await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer k2"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert good.status_code == 200
    assert route.call_count == 1
    # the gateway's key is not the engine's: it is not forwarded
    assert "authorization" not in route.calls.last.request.headers


async def test_upstream_unreachable_is_502(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/completions").mock(side_effect=httpx.ConnectError("refused"))
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    assert "engine.test" not in response.text


async def test_upstream_timeout_is_504(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"


async def test_openai_shaped_upstream_error_relayed_verbatim(gateway: AppFactory, upstream: respx.Router) -> None:
    body = b'{"error": {"message": "too long", "type": "BadRequestError", "param": null, "code": 400}}'
    upstream.post("/v1/completions").mock(
        return_value=httpx.Response(400, content=body, headers={"content-type": "application/json"})
    )
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 400
    assert response.content == body


async def test_sglang_flat_error_is_normalised(gateway: AppFactory, upstream: respx.Router) -> None:
    flat = {"object": "error", "message": "rid already in use", "type": "BadRequestError", "param": None, "code": 400}
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(400, json=flat))
    async with gateway(engine="sglang") as client:
        response = await client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert response.json() == {
        "error": {"message": "rid already in use", "type": "BadRequestError", "param": None, "code": 400}
    }


async def test_html_502_is_normalised(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/completions").mock(
        return_value=httpx.Response(502, content=b"<html>Bad Gateway</html>", headers={"content-type": "text/html"})
    )
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["message"] == "upstream engine answered HTTP 502"
    assert error["code"] == 502


async def test_passthrough_keeps_method_query_and_body(gateway: AppFactory, upstream: respx.Router) -> None:
    models = upstream.get("/v1/models").mock(return_value=httpx.Response(200, json={"object": "list", "data": []}))
    embed = upstream.post("/v1/embeddings").mock(return_value=httpx.Response(200, json={"data": []}))
    files = upstream.delete("/v1/files/f-1").mock(return_value=httpx.Response(204))
    async with gateway() as client:
        r1 = await client.get("/v1/models?limit=2&after=x%20y")
        r2 = await client.post("/v1/embeddings", content=b'{"input": "a",  "model": null}')
        r3 = await client.delete("/v1/files/f-1")
    assert r1.status_code == 200 and r1.json() == {"object": "list", "data": []}
    assert models.calls.last.request.url.query == b"limit=2&after=x%20y"
    assert r2.status_code == 200
    assert embed.calls.last.request.content == b'{"input": "a",  "model": null}'
    assert r3.status_code == 204
    assert files.called


@pytest.mark.parametrize(
    "path", ["/v1/../admin", "/v1/x/%2e%2e/y", "/v1/a%2Fb", "/v1/../../evil", "/v1/x%5cy", "/v1/a%00b"]
)
async def test_passthrough_paths_cannot_escape(gateway: AppFactory, upstream: respx.Router, path: str) -> None:
    catch_all = upstream.route().mock(return_value=httpx.Response(200))
    async with gateway() as client:
        response = await client.get(path)
    assert response.status_code in (400, 404)
    assert "error" in response.json()
    assert not catch_all.called


async def test_completion_routes_reject_get(gateway: AppFactory, upstream: respx.Router) -> None:
    async with gateway() as client:
        response = await client.get("/v1/chat/completions")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "method_not_allowed"


class _FailingStream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        raise httpx.ReadError("connection reset by peer")


SSE = [
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n',
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10,'
    b'"prompt_tokens_details":{"cached_tokens":4}}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_stream_relayed_byte_for_byte(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(
        return_value=httpx.Response(200, content=b"".join(SSE), headers={"content-type": "text/event-stream"})
    )
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
        metrics = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b"".join(SSE)
    assert 'prefixgate_engine_cached_tokens_total{route="/v1/chat/completions"} 4.0' in metrics.text


async def test_failure_after_first_byte_becomes_one_error_event(gateway: AppFactory, upstream: respx.Router) -> None:
    partial = [SSE[0], b'data: {"id":"c","choices":[{"ind']
    upstream.post("/v1/chat/completions").mock(
        return_value=httpx.Response(200, stream=_FailingStream(partial), headers={"content-type": "text/event-stream"})
    )
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    assert response.status_code == 200
    text = response.content
    assert text.startswith(b"".join(partial))
    events = text[len(b"".join(partial)) :].split(b"\n\n")
    assert events[0] == b""  # the partial event is terminated before the error event starts
    error = json.loads(events[1].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_connection_lost"
    assert events[2:] == [b""]


async def test_truncated_json_answer_becomes_502(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/completions").mock(
        return_value=httpx.Response(
            200, stream=_FailingStream([b'{"id": "x", "choi']), headers={"content-type": "application/json"}
        )
    )
    async with gateway() as client:
        response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_connection_lost"


async def test_health_metrics_ready(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.get("/health").mock(return_value=httpx.Response(200, json={"status": "ok"}))
    upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        health = await client.get("/health")
        ready = await client.get("/ready")
        await client.post("/v1/completions", json={"prompt": "x"})
        metrics = await client.get("/metrics")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
    assert health.json()["mode"] == "live"
    assert ready.status_code == 200
    assert 'prefixgate_requests_total{route="/v1/completions",status="200"} 1.0' in metrics.text
    assert "prefixgate_request_duration_seconds_bucket" in metrics.text
    assert 'prefixgate_engine_cached_tokens_total{route="/v1/completions"} 3.0' in metrics.text


async def test_ready_is_503_when_upstream_down(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.route().mock(side_effect=httpx.ConnectError("refused"))
    async with gateway() as client:
        ready = await client.get("/ready")
    assert ready.status_code == 503


async def test_unknown_route_is_openai_404(gateway: AppFactory) -> None:
    async with gateway() as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_upstream_cookies_never_reach_other_requests(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(
        return_value=httpx.Response(200, json=COMPLETION_JSON, headers={"set-cookie": "session=alice; Path=/"})
    )
    async with gateway() as client:
        first = await client.post("/v1/completions", json={"prompt": "x"})
        client.cookies.clear()
        await client.post("/v1/completions", json={"prompt": "y"})
    assert first.headers["set-cookie"] == "session=alice; Path=/"
    assert "cookie" not in route.calls.last.request.headers


async def test_no_client_library_defaults_added(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        await client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"user-agent": "my-app/1"})
    sent = route.calls.last.request.headers
    assert sent["user-agent"] == "my-app/1"
    assert "python-httpx" not in sent.get("user-agent", "")
    assert set(sent.keys()) <= {"host", "content-length", "user-agent", "accept", "accept-encoding", "x-request-id"}


async def test_a_bug_in_the_proxy_is_an_openai_shaped_500(
    gateway: AppFactory, upstream: respx.Router, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``/v1`` bypasses Litestar's exception handling: the app's own edge catch renders and logs the 500."""
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Planner, "plan", broken)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=CHAT, headers={"content-type": "application/json"})
        health = await client.get("/health")
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error"
    assert "a bug" not in response.text
    assert health.status_code == 200
    assert "unhandled error on /v1/chat/completions" in caplog.text
