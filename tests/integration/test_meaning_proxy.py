"""Meaning kept, citation mapping, client ids, group metrics and the access log, through the whole app."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import msgspec
import pytest
import respx

from gateway.proxy.pipeline import PLAN_IN_THREAD_BYTES
from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio

DOCS = [
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair and is 330 metres tall.",
    "The Colosseum in Rome is an oval amphitheatre that could hold between 50,000 and 80,000 people.",
    "Big Ben is the nickname of the Great Bell of the clock at the north end of Westminster Palace.",
    "The Sagrada Familia in Barcelona, designed by Antoni Gaudi, has been under construction since 1882.",
]
DOCS.reverse()  # any order the empty index would not keep as it is
SOURCES = "Sources:\n" + "\n".join(f"[{i}] {doc}" for i, doc in enumerate(DOCS, 1))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chat(system: str, question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            **extra}  # fmt: skip


def answer(content: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": content}
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}


def shown(system: str) -> dict[int, str]:
    """The document each number labels in a forwarded system prompt."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\[(\d+)\] (.*)$", system, re.M)}


async def test_referenced_label_stays_on_its_document_and_is_reported(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=answer("ok")))
    async with gateway() as client:
        plain = await client.post("/v1/chat/completions", json=chat(SOURCES, "Which is the tallest?"))
        referenced = await client.post("/v1/chat/completions", json=chat(SOURCES, "What does source [3] say?"))
        metrics = (await client.get("/metrics")).text
    assert json.loads(plain.headers["x-prefixgate-result"])["reordered"] is True
    renumbered = shown(json.loads(route.calls[0].request.content)["messages"][0]["content"])
    assert renumbered != dict(enumerate(DOCS, 1)) and sorted(renumbered.values()) == sorted(DOCS)
    result = json.loads(referenced.headers["x-prefixgate-result"])
    assert result["kept_labels"] == {"referenced": 1}
    system = json.loads(route.calls[1].request.content)["messages"][0]["content"]
    # labels kept: each block carries its own number, so moving them wins nothing the index knows of: in place
    assert system == SOURCES and result["reordered"] is False
    assert 'prefixgate_groups_found_total{format="numbered"} 2.0' in metrics
    assert 'prefixgate_blocks_found_total{format="numbered"} 8.0' in metrics
    assert 'prefixgate_groups_reordered_total{format="numbered"} 1.0' in metrics  # the kept labels stayed
    assert (
        'prefixgate_groups_meaning_total{decision="keep_labels",format="numbered",reason="referenced"} 1.0' in metrics
    )


async def test_ranked_group_is_left_alone_byte_for_byte(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=answer("ok")))
    body = json.dumps(chat("Results are ranked by relevance.\n" + SOURCES, "Which is oldest?")).encode()
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=body)
        metrics = (await client.get("/metrics")).text
    assert route.calls.last.request.content == body
    assert json.loads(response.headers["x-prefixgate-result"])["left_alone"] == {"ranked": 1}
    assert 'prefixgate_groups_meaning_total{decision="leave_alone",format="numbered",reason="ranked"} 1.0' in metrics


async def test_citation_mapping_rewrites_the_json_answer(gateway: AppFactory, upstream: respx.Router) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        system = json.loads(request.content)["messages"][0]["content"]
        model_number = next(n for n, doc in shown(system).items() if doc == DOCS[2])  # where doc 3 went
        if model_number != 3:
            assert request.headers["accept-encoding"] == "identity"  # mapping: the answer must be readable
        return httpx.Response(200, json=answer(f"It is a bell [{model_number}]."))

    upstream.post("/v1/chat/completions").mock(side_effect=reply)
    request = chat("Cite them as [n].\n" + SOURCES, "What is Big Ben?")
    async with gateway() as client:  # mapping first: the same prompt sent as is first would be held as sent
        on = await client.post("/v1/chat/completions", json=request, headers={"x-prefixgate-citation-mapping": "on"})
        off = await client.post("/v1/chat/completions", json=request)
    assert json.loads(off.headers["x-prefixgate-result"])["kept_labels"] == {"cite_by_number": 1}
    assert off.json()["choices"][0]["message"]["content"] == "It is a bell [3]."  # labels kept: already right
    assert json.loads(on.headers["x-prefixgate-result"])["mapped"] == {"cite_by_number": 1}
    assert on.json()["choices"][0]["message"]["content"] == "It is a bell [3]."  # renumbered, mapped back


async def test_citation_mapping_rewrites_a_stream_split_inside_a_citation(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        system = json.loads(request.content)["messages"][0]["content"]
        number = str(next(n for n, doc in shown(system).items() if doc == DOCS[0]))
        pieces = ["The tower ", "[", number, "] is in Paris (Document ", number, ")."]
        events = [{"id": "c", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
        events.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        body = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    upstream.post("/v1/chat/completions").mock(side_effect=reply)
    request = chat("Cite them as [n].\n" + SOURCES, "Where is the tower?", stream=True)
    async with gateway(citation_mapping=True) as client:
        response = await client.post("/v1/chat/completions", json=request)
    text = "".join(
        choice["delta"].get("content", "")
        for event in response.text.split("\n\n")
        if event.startswith("data: {")
        for choice in json.loads(event[6:])["choices"]
    )
    assert text == "The tower [1] is in Paris (Document 1)."
    assert response.text.endswith("data: [DONE]\n\n")


async def test_sglang_forwards_the_rid_reorder_issued(gateway: AppFactory, upstream: respx.Router) -> None:
    """ContextPilot's Online Usage, step 2: the id /reorder returned comes back as body "rid"."""
    route = upstream.post("/v1/completions").mock(return_value=httpx.Response(200, json={"choices": []}))
    async with gateway(engine="sglang", api_key=["k1"]) as client:
        auth = {"authorization": "Bearer k1"}
        reordered = (await client.post("/reorder", json={"contexts": [["a", "b"], ["b", "c"]]})).json()
        rid = reordered["request_ids"][0]
        request = {"model": "m", "prompt": "What is machine learning?", "max_tokens": 5, "rid": rid}
        response = await client.post("/v1/completions", json=request, headers=auth)
        own = await client.post("/v1/completions", json={**request, "rid": "mine-1"}, headers=auth)
        both = await client.post(
            "/v1/completions", json={**request, "rid": "mine-2"}, headers=auth | {"x-request-id": rid}
        )
    assert json.loads(route.calls[0].request.content)["rid"] == rid
    assert response.headers["x-request-id"] == rid
    namespaced = json.loads(route.calls[1].request.content)["rid"]
    assert re.fullmatch(r"k[0-9a-f]{8}-mine-1", namespaced) and own.headers["x-request-id"] == namespaced
    assert json.loads(route.calls[2].request.content)["rid"] == rid == both.headers["x-request-id"]


@pytest.mark.parametrize("engine", ["vllm", "openai", "llamacpp", "sglang"])
@pytest.mark.parametrize("field", ["rid", "request_id", "header"])
async def test_every_engine_honours_the_client_id(
    gateway: AppFactory, upstream: respx.Router, engine: str, field: str
) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=answer("ok")))
    upstream.get("/props").mock(return_value=httpx.Response(200, json={"total_slots": 2}))
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-request-id": "client-7"} if field == "header" else {}
    if field != "header":
        body[field] = "client-7"
    async with gateway(engine=engine) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
    sent = route.calls.last.request
    forwarded = json.loads(sent.content)
    assert response.headers["x-request-id"] == "client-7"
    assert sent.headers["x-request-id"] == "client-7"
    if field != "header":
        assert forwarded[field] == "client-7"
    if engine == "sglang":
        assert forwarded["rid"] == "client-7"


async def test_a_batch_list_of_rids_is_the_clients(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(return_value=httpx.Response(200, json={"choices": []}))
    async with gateway(engine="sglang") as client:
        await client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "rid": ["r1", "r2"]})
    assert json.loads(route.calls.last.request.content)["rid"] == ["r1", "r2"]


async def test_access_log_line(gateway: AppFactory, upstream: respx.Router, caplog: pytest.LogCaptureFixture) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 64}}
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json={**answer("ok"), "usage": usage}))
    caplog.set_level(logging.INFO, logger="prefixgate.access")
    async with gateway() as client:
        await client.post("/v1/chat/completions", json=chat(SOURCES, "Hi"), headers={"x-request-id": "acc-1"})
    async with gateway(access_log=True) as client:
        await client.post("/v1/chat/completions", json=chat(SOURCES, "Hi"), headers={"x-request-id": "acc-2"})
    lines = [r.getMessage() for r in caplog.records if r.name == "prefixgate.access"]
    assert len(lines) == 1
    assert re.fullmatch(
        r"id=acc-2 route=/v1/chat/completions status=200 groups=1 reordered=true predicted_cached_tokens=0 "
        r"cached_tokens=64 latency_ms=\d+\.\d",
        lines[0],
    )


async def test_a_big_prompt_planned_in_a_worker_thread_keeps_its_meaning(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=answer("ok")))
    question = "What does source [3] say? " + "padding " * (PLAN_IN_THREAD_BYTES // 8)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json=chat(SOURCES, question))
    assert len(route.calls.last.request.content) > PLAN_IN_THREAD_BYTES
    assert json.loads(response.headers["x-prefixgate-result"])["kept_labels"] == {"referenced": 1}
    system = json.loads(route.calls.last.request.content)["messages"][0]["content"]
    assert shown(system) == dict(enumerate(DOCS, 1))  # labels kept (and, gaining nothing, left in place)


def tool_turns(names: list[str], *later: str) -> dict[str, Any]:
    """An agent's conversation: a question, the search tool's documents (``names`` of ``DOCS``), an answer and the
    ``later`` questions."""
    call = {"id": "t1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    result = "\n".join(f"<document>{DOCS[int(n)]}</document>" for n in names)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Tell me about landmarks."},
                                      {"role": "assistant", "content": None, "tool_calls": [call]},
                                      {"role": "tool", "tool_call_id": "t1", "content": result}]  # fmt: skip
    for question in later:
        messages += [{"role": "assistant", "content": "Here is what I found."}, {"role": "user", "content": question}]
    return {"model": "m", "messages": messages}


def forwarded_tool(call: Any) -> list[int]:
    content = next(m for m in json.loads(call.request.content)["messages"] if m["role"] == "tool")["content"]
    return [DOCS.index(doc) for doc in re.findall(r"<document>(.*?)</document>", content)]


async def test_a_later_turn_naming_a_position_kept_in_place_keeps_the_order_sent_before(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    """Issue 20: a later turn that names "the first document" no longer sends the earlier tool result in the client's
    order (losing the cached conversation) when the order it was sent in holds the same first document; one that
    names a position the earlier order changed still does."""
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=answer("ok")))
    async with gateway() as client:
        # the cache holds documents 3 and 1 after the same question: the tool result's 0, 3, 1, 2 goes out with
        # them first, in the order the engine holds them
        await client.post("/v1/chat/completions", json=tool_turns(["3", "1"]))
        held = forwarded_tool(route.calls[-1])
        first = await client.post("/v1/chat/completions", json=tool_turns(["0", "3", "1", "2"]))
        sent_order = forwarded_tool(route.calls[-1])
        later = {}
        for question in ("What does the last document say?", "And the first document?"):
            response = await client.post("/v1/chat/completions", json=tool_turns(["0", "3", "1", "2"], question))
            later[question] = (forwarded_tool(route.calls[-1]), json.loads(response.headers["x-prefixgate-result"]))
    assert json.loads(first.headers["x-prefixgate-result"])["reordered"] is True
    assert sorted(held) == [1, 3] and sent_order == [*held, 0, 2]  # the cached pair first, then the new documents
    order, result = later["What does the last document say?"]  # 2 is last both ways: the cached order again
    assert order == sent_order and result["order_sent_before"] == 1 and "left_alone" not in result
    order, result = later["And the first document?"]  # position 1 holds 3 or 1 as sent before, 0 for the client
    assert order == [0, 3, 1, 2] and result["left_alone"] == {"referenced": 1} and "order_sent_before" not in result
