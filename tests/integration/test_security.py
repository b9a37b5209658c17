"""Security defaults, in-process: keys and admin token, request-id namespaces, paths, headers, secrets, limits.

Where an HTTP client library would refuse or normalise the hostile input (dot segments, CR/LF in header values,
absolute URLs in the request line), the app is called with a hand-made ASGI scope, as a server could deliver it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import anyio
import httpx
import pytest
import respx

from gateway.app import create_app
from gateway.ids import KeyNamespaces, resolve_request_id
from gateway.settings import SettingsError, load_settings
from tests.integration.conftest import AppFactory, _as_network, make_settings

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

OK = {
    "id": "x",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
SSE = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ok_json(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=OK)


def rag_chat(names: list[str], question: str = "Which one?") -> bytes:
    docs = "\n".join(
        f'<document id="{n}">Text of {n}: ' + " ".join(f"{n}w{i}" for i in range(20)) + "</document>" for n in names
    )
    system = f"Answer from the documents.\n<documents>\n{docs}\n</documents>"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return json.dumps({"model": "m", "messages": messages}).encode()


async def raw_call(
    app: Any,
    method: str,
    raw_path: bytes,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes] | None = None,
    path: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Call the ASGI app with a hand-made scope (what a server could deliver) and collect the response."""
    raw, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw.decode("latin-1")) if path is None else path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
        "state": {},
    }
    pending = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks or [b""]) - 1}
        for i, chunk in enumerate(chunks or [b""])
    ]
    status = 0
    response_headers: dict[str, str] = {}
    body = bytearray()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers.update({k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return status, response_headers, bytes(body)


# ------------------------------------------------------------------------------------------- defaults and keys


def test_default_bind_is_loopback() -> None:
    assert load_settings(environ={}).host == "127.0.0.1"


async def test_proxy_keys_are_compared_in_constant_time_against_every_key(
    gateway: AppFactory, upstream: respx.Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr("gateway.edge.access.hmac.compare_digest", spy)
    async with gateway(api_key=("first-key", "second-key", "third-key")) as client:
        good = await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer first-key"})
        assert len(compared) == 3  # no early exit on the first match
        basic = await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Basic first-key"})
        empty = await client.post("/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer "})
        unicode_key = await client.post(
            "/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer fïrst-key".encode()}
        )
    assert good.status_code == 200
    for refused in (basic, empty, unicode_key):
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert re.fullmatch(r"req-[0-9a-f]{32}", refused.headers["x-request-id"])
    assert route.call_count == 1
    assert "authorization" not in route.calls.last.request.headers


async def test_admin_token_guards_every_state_change(gateway: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return original(a, b)

    monkeypatch.setattr("gateway.edge.access.hmac.compare_digest", spy)
    changes: list[tuple[str, dict[str, Any]]] = [
        ("/reorder", {"contexts": [[1, 2]]}),
        ("/build", {"contexts": [[1, 2]]}),
        ("/evict", {"request_ids": ["a"]}),
        ("/reset", {}),
        ("/deduplicate", {"contexts": [[1]], "parent_request_ids": [None]}),
        ("/insert", {"context": [1, 2]}),
        ("/update", {}),
    ]
    async with gateway(admin_token="adm1n-token") as client:
        for path, body in changes:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "adm1n-token"}):
                response = await client.post(path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "admin_token_required"
            allowed = await client.post(path, json=body, headers={"authorization": "Bearer adm1n-token"})
            assert allowed.status_code == 200, path
        # the other index routes need the token too once one is configured (or a client key, see test_hostile)
        auth = {"authorization": "Bearer adm1n-token"}
        for method, path, body in (("POST", "/schedule", {"contexts": [[1]]}), ("POST", "/search", {"context": [1]}),
                                   ("GET", "/stats", None), ("GET", "/requests", None)):  # fmt: skip
            assert (await client.request(method, path, json=body)).status_code == 401, path
            assert (await client.request(method, path, json=body, headers=auth)).status_code == 200, path
    assert b"adm1n-token" in compared


async def test_one_auth_check_takes_the_key_the_same_way_on_every_route(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    """Anthropic clients send ``x-api-key``: the proxy and the index API both take it (and the admin token too)."""
    upstream.post("/v1/completions").mock(side_effect=ok_json)
    async with gateway(api_key=("client-key",), admin_token="adm1n-token") as client:
        proxied = await client.post("/v1/completions", json={"prompt": "x"}, headers={"x-api-key": "client-key"})
        stats = await client.get("/stats", headers={"x-api-key": "client-key"})
        admin = await client.post("/evict", json={"request_ids": []}, headers={"x-api-key": "adm1n-token"})
        wrong = await client.get("/stats", headers={"x-api-key": "other"})
        # an Authorization header wins over x-api-key, on every route
        both = await client.get("/stats", headers={"authorization": "Bearer other", "x-api-key": "client-key"})
    assert (proxied.status_code, stats.status_code, admin.status_code) == (200, 200, 200)
    assert (wrong.status_code, both.status_code) == (401, 401)


async def test_proxy_key_is_not_the_admin_token(gateway: AppFactory) -> None:
    async with gateway(api_key=("client-key",), admin_token="adm1n-token") as client:
        response = await client.post("/evict", json={"request_ids": []}, headers={"authorization": "Bearer client-key"})
    assert response.status_code == 401


# ------------------------------------------------------------------------------------------ request-id namespaces


def test_namespaces_are_per_key_and_salted() -> None:
    one = KeyNamespaces([b"alice", b"bob"], secret=b"s" * 16)
    again = KeyNamespaces([b"alice"], secret=b"s" * 16)
    other_salt = KeyNamespaces([b"alice"], secret=b"t" * 16)
    assert re.fullmatch(r"k[0-9a-f]{8}", one[b"alice"])
    assert one[b"alice"] != one[b"bob"]
    assert one[b"alice"] == again[b"alice"]
    assert one[b"alice"] != other_salt[b"alice"]
    assert resolve_request_id("abc", one[b"alice"]) == f"{one[b'alice']}-abc"
    assert resolve_request_id("bad id", one[b"alice"]).startswith("req-")


@pytest.mark.parametrize(
    ("sent", "effective"),
    [
        ("client-1.a:b", "client-1.a:b"),
        ("req-0123456789abcdef0123456789abcdef", "c-req-0123456789abcdef0123456789abcdef"),
        ("REQ-abc", "c-REQ-abc"),
        ("chatcmpl-req-abc", "c-chatcmpl-req-abc"),
        ("cmpl-req-ab-0-1a2b3c4d", "c-cmpl-req-ab-0-1a2b3c4d"),
        ("HEALTH_CHECK_1", "c-HEALTH_CHECK_1"),
        ("cmpl-", "c-cmpl-"),
        ("c-req-x", "c-req-x"),
    ],
)
def test_client_ids_never_pass_for_minted_ones_without_keys(sent: str, effective: str) -> None:
    assert resolve_request_id(sent) == effective


async def test_client_ids_are_namespaced_by_key(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(api_key=("alice-key", "bob-key"), engine="sglang", admin_token="adm") as client:
        alice = {"authorization": "Bearer alice-key", "x-request-id": "shared-id"}
        bob = {"authorization": "Bearer bob-key", "x-request-id": "shared-id"}
        first = await client.post("/v1/chat/completions", content=rag_chat(["a", "b"]), headers=alice)
        second = await client.post("/v1/chat/completions", content=rag_chat(["a", "b"]), headers=bob)
        alice_id = first.headers["x-request-id"]
        # bob replays alice's effective id: it lands in bob's namespace, not on alice's entry
        replay = {**bob, "x-request-id": alice_id}
        third = await client.post("/v1/chat/completions", content=rag_chat(["a", "b"]), headers=replay)
        again = await client.post("/v1/chat/completions", content=rag_chat(["a", "b"]), headers=alice)
        listed = set((await client.get("/requests", headers={"authorization": "Bearer adm"})).json()["request_ids"])
    ids = [r.headers["x-request-id"] for r in (first, second, third, again)]
    assert re.fullmatch(r"k[0-9a-f]{8}-shared-id", ids[0])
    assert re.fullmatch(r"k[0-9a-f]{8}-shared-id", ids[1])
    assert ids[0] != ids[1]
    assert ids[2] == f"{ids[1].split('-', 1)[0]}-{ids[0]}"
    assert ids[3] == ids[0]  # the same key always gets the same namespace
    # the engine files each request under the id the client is told
    for call, rid in zip(route.calls, ids, strict=True):
        assert json.loads(call.request.content)["rid"] == rid
        assert call.request.headers["x-request-id"] == rid
    assert {ids[0], ids[1], ids[2]} <= listed


async def test_one_tenant_cannot_evict_another(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(api_key=("alice-key", "bob-key")) as client:
        alice = await client.post(
            "/v1/chat/completions",
            content=rag_chat(["a", "b"]),
            headers={"authorization": "Bearer alice-key", "x-request-id": "mine"},
        )
        bob = await client.post(
            "/v1/chat/completions",
            content=rag_chat(["c", "d"]),
            headers={"authorization": "Bearer bob-key", "x-request-id": "mine"},
        )
        # the engine reports bob's request evicted (as it would name it): alice's entry stays
        evicted = await client.post("/evict", json={"request_ids": [f"chatcmpl-{bob.headers['x-request-id']}"]})
        listed = (await client.get("/requests", headers={"authorization": "Bearer alice-key"})).json()["request_ids"]
    assert evicted.json()["evicted_request_ids"] == [bob.headers["x-request-id"]]
    assert listed == [alice.headers["x-request-id"]]


async def test_client_cannot_take_over_a_minted_id(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        victim = await client.post("/v1/chat/completions", content=rag_chat(["a", "b"]))
        minted = victim.headers["x-request-id"]
        attacker = await client.post(
            "/v1/chat/completions", content=rag_chat(["x", "y"]), headers={"x-request-id": minted}
        )
        await client.post("/evict", json={"request_ids": [attacker.headers["x-request-id"]]})
        listed = (await client.get("/requests")).json()["request_ids"]
    assert attacker.headers["x-request-id"] == f"c-{minted}"
    assert listed == [minted]


# ----------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/v1/../admin",
        b"/v1/..",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E%2E%2Fadmin",
        b"/v1/models/..%2f..%2fadmin",
        b"/v1/a%2fb",
        b"/v1/a%5Cb",
        b"/v1/a\\..\\b",
        b"http://evil.example/v1/models",
        b"//evil.example/v1/models",
        b"/v1/a%00b",
        b"/v1/a b",
    ],
)
async def test_passthrough_paths_never_leave_the_upstream_tree(
    gateway: AppFactory, upstream: respx.Router, raw_path: bytes
) -> None:
    catch_all = upstream.route().mock(return_value=httpx.Response(200))
    async with gateway() as client:
        as_sent = await raw_call(client.app, "GET", raw_path, [(b"host", b"gw")])
        # a server may route on a normalised path while keeping the raw one: the proxy checks the raw one
        normalised = await raw_call(client.app, "GET", raw_path, [(b"host", b"gw")], path="/v1/models")
    for status, _, body in (as_sent, normalised):
        assert status in (400, 404)
        assert "error" in json.loads(body)
    assert not catch_all.called


async def test_passthrough_stays_on_the_configured_upstream(gateway: AppFactory, upstream: respx.Router) -> None:
    seen: list[httpx.URL] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json={})

    upstream.route().mock(side_effect=record)
    async with gateway() as client:
        for raw in (
            b"/v1/@evil.example/x",
            b"/v1/a%252Fb",
            b"/v1/models?next=http://evil.example/../x",
            b"/v1//evil.example/x",
            b"/v1/./models",
        ):
            status, _, _ = await raw_call(client.app, "GET", raw, [(b"host", b"evil.example")])
            assert status == 200
    assert [url.host for url in seen] == ["engine.test"] * 5
    assert seen[0].raw_path == b"/v1/@evil.example/x"
    assert seen[1].raw_path == b"/v1/a%252Fb"  # one level of encoding kept: the engine decodes it to a%2Fb
    assert seen[2].path == "/v1/models"
    assert seen[3].raw_path == b"/v1/evil.example/x"  # normalised: a path on the engine, never a host
    assert seen[4].raw_path == b"/v1/models"


# --------------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-note", b"a\r\nx-injected: 1"),
        (b"x-note", b"a\nx-injected: 1"),
        (b"x-note", b"a\rb"),
        (b"x-note", b"a\x00b"),
        (b"x-note", b"a\x7fb"),
        (b"x-request-id", b"id\r\nx-injected: 1"),
        (b"x-no te", b"v"),
        (b"x-note:", b"v"),
        (b"x-n\xc3\xa9", b"v"),
        (b"", b"v"),
    ],
)
async def test_header_injection_is_refused(
    gateway: AppFactory, upstream: respx.Router, name: bytes, value: bytes
) -> None:
    route = upstream.route().mock(side_effect=ok_json)
    async with gateway() as client:
        for raw_path in (b"/v1/completions", b"/v1/models"):
            status, headers, body = await raw_call(
                client.app,
                "POST",
                raw_path,
                [(b"content-type", b"application/json"), (name, value)],
                [b'{"prompt":"x"}'],
            )
            assert status == 400
            assert json.loads(body)["error"]["code"] == "invalid_header"
            assert "x-injected" not in headers
    assert not route.called


async def test_non_latin1_header_values_are_forwarded_untouched(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(side_effect=ok_json)
    utf8 = "naïve ✓ 日本".encode()
    async with gateway() as client:
        response = await client.post(
            "/v1/completions",
            json={"prompt": "x"},
            headers={"x-note": utf8, "x-request-id": "idé✓".encode()},
        )
        tag = await client.post("/v1/completions", json={"prompt": "x"}, headers={"x-prefixgate-tag": "döc".encode()})
    assert response.status_code == 200
    sent = route.calls.last.request.headers.raw
    assert (b"x-note", utf8) in sent
    assert re.fullmatch(r"req-[0-9a-f]{32}", response.headers["x-request-id"])
    assert tag.status_code == 400 and tag.json()["error"]["code"] == "invalid_header"
    assert route.call_count == 1


@pytest.mark.parametrize("value", ["key\r\nx: 1", "key with space", "kéy", "key\x00"])
def test_secrets_that_cannot_be_sent_as_headers_fail_at_start(value: str) -> None:
    for name in ("upstream_api_key", "admin_token"):
        with pytest.raises(SettingsError, match=name.replace("_", "-")):
            load_settings(environ={}, **{name: value})
    with pytest.raises(SettingsError, match="api-key"):
        load_settings(environ={}, api_key=(value,))


# ---------------------------------------------------------------------------------------- secrets in logs


class _ReadFails(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices":[]}\n\n'
        raise httpx.ReadError("reset by peer")


async def test_keys_and_prompts_never_reach_logs_or_errors(
    gateway: AppFactory, upstream: respx.Router, caplog: pytest.LogCaptureFixture
) -> None:
    prompt_secret = "PROMPT-SECRET-7f3a"
    upstream_key = "UPSTREAM-KEY-91bc"
    client_key = "CLIENT-KEY-55de"
    answers = iter(
        [
            httpx.Response(200, json=OK),
            httpx.Response(500, content=b"<html>boom</html>", headers={"content-type": "text/html"}),
            httpx.ConnectError(f"connect failed for {upstream_key}"),
            httpx.ReadTimeout("slow"),
            httpx.Response(200, stream=_ReadFails(), headers={"content-type": "text/event-stream"}),
            httpx.Response(200, content=b"not json", headers={"content-type": "application/json"}),
        ]
    )

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {upstream_key}"
        item = next(answers)
        if isinstance(item, Exception):
            raise item
        return item

    upstream.route().mock(side_effect=answer)
    caplog.set_level(logging.DEBUG)
    body = rag_chat(["a", "b"], question=f"my password is {prompt_secret}")
    outputs: list[str] = []
    async with gateway(api_key=(client_key,), upstream_api_key=upstream_key, admin_token="ADMIN-TOKEN-0a0a") as client:
        auth = {"authorization": f"Bearer {client_key}"}
        for stream in (False, False, False, False, True, False):
            payload = json.loads(body) | {"stream": stream}
            response = await client.post("/v1/chat/completions", json=payload, headers=auth)
            outputs.append(response.text + json.dumps(dict(response.headers)))
        bad = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": [prompt_secret]}]}, headers=auth
        )
        bad_json = await client.post(
            "/v1/chat/completions", content=f'{{"messages": "{prompt_secret}'.encode(), headers=auth
        )
        outputs += [bad.text, bad_json.text]
        evict = await client.post(
            "/evict", json={"request_ids": [prompt_secret]}, headers={"authorization": "Bearer x"}
        )
        outputs.append(evict.text)
    assert len(outputs) == 9
    logged = caplog.text + "".join(str(r.args) + str(r.exc_text) for r in caplog.records)
    for secret in (prompt_secret, upstream_key, client_key, "ADMIN-TOKEN-0a0a"):
        assert secret not in logged
    for secret in (upstream_key, client_key, "ADMIN-TOKEN-0a0a"):
        assert all(secret not in output for output in outputs)
    assert prompt_secret not in bad.text and prompt_secret not in bad_json.text


# ----------------------------------------------------------------------------------------------- limits


async def test_body_limit_counts_streamed_chunks(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.route().mock(side_effect=ok_json)
    async with gateway(max_body_bytes=100) as client:
        chunked = await raw_call(
            client.app, "POST", b"/v1/completions", [], [b'{"prompt": "' + b"x" * 60, b"y" * 60 + b'"}']
        )
        lying = await raw_call(
            client.app, "POST", b"/v1/embeddings", [(b"content-length", b"10")], [b"z" * 80, b"z" * 80]
        )
    for status, _, body in (chunked, lying):
        assert status == 413
        assert json.loads(body)["error"]["code"] == "body_too_large"
    assert not route.called


async def test_blocks_per_request_limit(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(max_blocks_per_request=4) as client:
        over = await client.post("/v1/chat/completions", content=rag_chat(["a", "b", "c", "d", "e"]))
        listed_after_refusal = (await client.get("/requests")).json()["num_requests"]
        at_limit = await client.post("/v1/chat/completions", content=rag_chat(["a", "b", "c", "d"]))
        unplanned = await client.post(
            "/v1/chat/completions",
            content=rag_chat(["a", "b", "c", "d", "e"]),
            headers={"x-prefixgate-reorder": "off"},
        )
    assert over.status_code == 413
    error = over.json()["error"]
    assert error["code"] == "too_many_blocks" and error["type"] == "invalid_request_error"
    assert "x-request-id" in over.headers
    assert listed_after_refusal == 0
    assert at_limit.status_code == 200
    assert unplanned.status_code == 200  # the limit is on what the planner handles: reordering off finds nothing
    assert route.call_count == 2


async def test_concurrent_stream_limit(upstream: respx.Router) -> None:
    release = anyio.Event()
    started = 0

    class _Held(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            await release.wait()
            yield SSE

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal started
        if not json.loads(request.content).get("stream"):
            return httpx.Response(200, json=OK)
        started += 1
        return httpx.Response(200, stream=_Held(), headers={"content-type": "text/event-stream"})

    upstream.route().mock(side_effect=answer)
    stream_body = {"prompt": "x", "stream": True}
    results: list[httpx.Response] = []
    # Litestar's test client sends one request at a time; httpx's ASGI transport lets requests overlap
    app = create_app(make_settings(max_concurrent_streams=2), transport=httpx.MockTransport(_as_network(upstream)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:

        async def held() -> None:
            results.append(await client.post("/v1/completions", json=stream_body))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(held)
                tg.start_soon(held)
                while started < 2:
                    await anyio.sleep(0.01)
                refused = await client.post("/v1/completions", json=stream_body)
                plain = await client.post("/v1/completions", json={"prompt": "x"})
                release.set()
            after = await client.post("/v1/completions", json=stream_body)
            metrics = (await client.get("/metrics")).text
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "too_many_streams"
    assert plain.status_code == 200
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.content == SSE for r in results)
    assert after.status_code == 200
    assert "prefixgate_in_flight_requests 0.0" in metrics
