"""Meaning kept on ``/v1/messages`` and ``/v1/responses`` through the whole app: the bytes forwarded, the
``X-Prefixgate-Result`` header and ``/metrics``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

from tests.integration.conftest import AppFactory
from tests.unit.test_meaning_apis import CASES

pytestmark = pytest.mark.anyio

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 1}}  # fmt: skip
RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "model": "m", "output": [],
            "usage": {"input_tokens": 10, "output_tokens": 1, "total_tokens": 11,
                      "input_tokens_details": {"cached_tokens": 0}}}  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def body_of(name: str) -> bytes:
    return json.dumps(CASES[name]["request"]).encode()


async def test_messages_documents_named_by_the_user_keep_their_order_and_say_why(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))
    async with gateway() as client:
        free = await client.post("/v1/messages", content=body_of("control_msg_documents"))
        named = await client.post("/v1/messages", content=body_of("msg_second_document_only"))
        ranked = await client.post("/v1/messages", content=body_of("msg_system_ranked"))
        metrics = (await client.get("/metrics")).text
    assert json.loads(free.headers["x-prefixgate-result"])["reordered"] is True
    assert route.calls[0].request.content != body_of("control_msg_documents")
    assert route.calls[1].request.content == body_of("msg_second_document_only")
    assert route.calls[2].request.content == body_of("msg_system_ranked")
    result = json.loads(named.headers["x-prefixgate-result"])
    assert result["left_alone"] == {"referenced": 1} and result["reordered"] is False
    assert json.loads(ranked.headers["x-prefixgate-result"])["left_alone"] == {"ranked": 1}
    assert 'prefixgate_groups_found_total{format="document"} 3.0' in metrics
    assert 'prefixgate_groups_reordered_total{format="document"} 1.0' in metrics
    meaning = "prefixgate_groups_meaning_total"
    assert f'{meaning}{{decision="leave_alone",format="document",reason="referenced"}} 1.0' in metrics
    assert f'{meaning}{{decision="leave_alone",format="document",reason="ranked"}} 1.0' in metrics


async def test_responses_result_named_in_input_text_keeps_its_place(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/responses").mock(return_value=httpx.Response(200, json=RESPONSE))
    async with gateway() as client:
        free = await client.post("/v1/responses", content=body_of("control_resp_file_search"))
        named = await client.post("/v1/responses", content=body_of("resp_input_text_result_2"))
        metrics = (await client.get("/metrics")).text
    assert json.loads(free.headers["x-prefixgate-result"])["reordered"] is True
    assert route.calls[1].request.content == body_of("resp_input_text_result_2")
    assert json.loads(named.headers["x-prefixgate-result"])["left_alone"] == {"referenced": 1}
    assert (
        'prefixgate_groups_meaning_total{decision="leave_alone",format="file_search_result",reason="referenced"} 1.0'
        in metrics
    )


async def test_a_text_group_keeps_its_labels_when_another_part_of_a_messages_request_names_one(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))
    request: dict[str, Any] = CASES["msg_text_sources_referenced"]["request"]
    async with gateway() as client:
        response = await client.post("/v1/messages", json=request)
        metrics = (await client.get("/metrics")).text
    assert json.loads(response.headers["x-prefixgate-result"])["kept_labels"] == {"referenced": 1}
    system = json.loads(route.calls[0].request.content)["system"]
    assert system == request["system"]  # each [n] on its own source; moving them would win nothing: in place
    assert (
        'prefixgate_groups_meaning_total{decision="keep_labels",format="numbered",reason="referenced"} 1.0' in metrics
    )
