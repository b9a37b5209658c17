"""The operator view (``--decision-log N``): what was done to recent requests, admin-only, bounded, off by default."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from gateway.settings import SettingsError, load_settings
from tests.integration.conftest import UPSTREAM, AppFactory
from tests.integration.test_intercept_proxy import DOCS, OK, chat, order_in, xml_docs

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

ADMIN = {"Authorization": "Bearer adm1n"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_off_by_default_no_route(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(admin_token="adm1n") as client:
        sent = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"])))
        for path in ("/debug/requests", f"/debug/requests/{sent.headers['x-request-id']}"):
            answer = await client.get(path, headers=ADMIN)
            assert answer.status_code == 404
            assert answer.json()["error"]["type"] == "not_found_error"


def test_settings_need_the_admin_token_and_stay_bounded() -> None:
    with pytest.raises(SettingsError, match="admin"):
        load_settings(environ={}, upstream=UPSTREAM, decision_log=10)
    with pytest.raises(SettingsError, match=r"--decision-log .*10000"):
        load_settings(environ={}, upstream=UPSTREAM, admin_token="a", decision_log=10_001)
    with pytest.raises(SettingsError, match="--decision-log-text"):
        load_settings(environ={}, upstream=UPSTREAM, admin_token="a", decision_log_text=True)
    env = {"PREFIXGATE_DECISION_LOG": "5", "PREFIXGATE_ADMIN_TOKEN": "a", "PREFIXGATE_DECISION_LOG_TEXT": "1"}
    settings = load_settings(environ=env, upstream=UPSTREAM)
    assert settings.decision_log == 5 and settings.decision_log_text


async def test_sent_and_forwarded_orders_by_request_id(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(admin_token="adm1n", api_key=["k1"], decision_log=10) as client:
        key = {"Authorization": "Bearer k1"}
        first = await client.post(
            "/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])), headers=key
        )
        body = chat(xml_docs(["gamma", "delta", "beta", "alpha"]))
        second = await client.post("/v1/chat/completions", content=body, headers=key)
        one = (await client.get(f"/debug/requests/{first.headers['x-request-id']}", headers=ADMIN)).json()
        two = (await client.get(f"/debug/requests/{second.headers['x-request-id']}", headers=ADMIN)).json()
        listed = (await client.get("/debug/requests?limit=1", headers=ADMIN)).json()
    # the first request's blocks, named by the order they were forwarded in
    ids = dict(zip(order_in(json.loads(route.calls[0].request.content)["messages"][0]["content"]),
                   one["groups"][0]["forwarded"], strict=True))  # fmt: skip
    (group,) = two["groups"]
    assert group["sent"][0] == ids["gamma"] and group["sent"][2:] == [ids["beta"], ids["alpha"]]
    assert group["sent"][1] not in ids.values()  # delta, new
    forwarded_names = order_in(json.loads(route.calls[1].request.content)["messages"][0]["content"])
    assert group["forwarded"][:3] == [ids[name] for name in forwarded_names[:3]]
    assert [group["sent"][i] for i in group["order"]] == group["forwarded"]
    assert group["moved"] and group["action"] and group["blocks"] == 4 and group["format"]
    assert two["result"] == json.loads(second.headers["x-prefixgate-result"])
    assert two["status"] == 200 and two["route"] == "/v1/chat/completions"
    assert "text" not in two  # never the prompt text unless asked
    assert not any(text in json.dumps(two) for text in DOCS.values())
    assert [record["request_id"] for record in listed["data"]] == [second.headers["x-request-id"]]


async def test_admin_only_bad_input_and_a_bounded_ring(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(admin_token="adm1n", api_key=["k1"], decision_log=3) as client:
        key = {"Authorization": "Bearer k1"}
        ids = []
        for i in range(5):
            answer = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta"]), f"Q{i}?"),
                                       headers=key)  # fmt: skip
            ids.append(answer.headers["x-request-id"])
        for headers in ({}, key, {"Authorization": "Bearer wrong"}):
            for path in ("/debug/requests", f"/debug/requests/{ids[-1]}"):
                refused = await client.get(path, headers=headers)
                assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        listed = (await client.get("/debug/requests?limit=100", headers=ADMIN)).json()
        assert [r["request_id"] for r in listed["data"]] == ids[:1:-1] and listed["size"] == 3
        gone = await client.get(f"/debug/requests/{ids[0]}", headers=ADMIN)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_kept"
        for bad in ("0", "-1", "x", "1e3"):
            answer = await client.get(f"/debug/requests?limit={bad}", headers=ADMIN)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "limit"


async def test_texts_only_when_asked(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(admin_token="adm1n", decision_log=4, decision_log_text=True) as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        body = chat(xml_docs(["gamma", "beta", "alpha"]))
        answer = await client.post("/v1/chat/completions", content=body)
        record = (await client.get(f"/debug/requests/{answer.headers['x-request-id']}", headers=ADMIN)).json()
        listed = (await client.get("/debug/requests", headers=ADMIN)).json()
    assert record["text"]["sent"]["text"] == body.decode()
    assert record["text"]["forwarded"]["text"] == route.calls[1].request.content.decode()
    assert record["text"]["forwarded"]["truncated"] is False
    assert record["groups"][0]["moved"]
    assert all("text" not in r for r in listed["data"])  # the list carries decisions only


async def test_big_requests_keep_counts_and_cut_texts(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    docs = "\n".join(f'<document id="{i}">{f"word{i} " * 90}</document>' for i in range(600))
    body = chat(f"Answer using the documents.\n<documents>\n{docs}\n</documents>")
    assert len(body) > 256 << 10
    async with gateway(admin_token="adm1n", decision_log=2, decision_log_text=True) as client:
        answer = await client.post("/v1/chat/completions", content=body)
        record = (await client.get(f"/debug/requests/{answer.headers['x-request-id']}", headers=ADMIN)).json()
    (group,) = record["groups"]
    assert group["blocks"] == 600 and group["listed"] is False and "sent" not in group
    sent = record["text"]["sent"]
    assert sent["truncated"] is True and sent["bytes"] == len(body) and len(sent["text"]) == 256 << 10
