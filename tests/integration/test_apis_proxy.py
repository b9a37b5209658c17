"""Anthropic Messages and OpenAI Responses through the gateway: what is moved, what keeps its bytes, what comes back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio

TEXTS = {k: f"Passage {k}: " + " ".join(f"t{k}x{i}" for i in range(40)) for k in ("alpha", "beta", "gamma", "delta")}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "ok"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 30, "output_tokens": 1},
}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def document(name: str, *, cite: bool = False, cache: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": TEXTS[name]},
        "title": name,
    }
    if cite:
        block["citations"] = {"enabled": True}
    if cache:
        block["cache_control"] = {"type": "ephemeral"}
    return block


def messages_body(docs: list[dict[str, Any]], question: str = "What now?", **extra: Any) -> dict[str, Any]:
    content = [*docs, IMAGE, {"type": "text", "text": question, "cache_control": {"type": "ephemeral"}}]
    return {
        "model": "m",
        "max_tokens": 8,
        "system": [{"type": "text", "text": "Answer from the documents.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": content}],
        "vendor": {"keep": [1, None]},
        **extra,
    }


def titles(body: dict[str, Any]) -> list[str]:
    return [b["title"] for b in body["messages"][0]["content"] if b.get("type") == "document"]


async def test_documents_move_as_whole_blocks_and_every_other_byte_stays(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))
    async with gateway() as client:
        await client.post("/v1/messages", content=compact(messages_body([document(n) for n in ("alpha", "beta")])))
        order = ["gamma", "beta", "delta", "alpha"]
        sent = compact(messages_body([document(n) for n in order]))
        response = await client.post("/v1/messages", content=sent)
    first = json.loads(route.calls[0].request.content)
    forwarded = route.calls[1].request.content
    sent_order = titles(json.loads(forwarded))
    assert sent_order[:2] == titles(first)  # the cached pair leads
    assert sorted(sent_order) == sorted(order) and sent_order != order
    # the forwarded body is the client's, byte for byte, with the document blocks in the new order
    assert forwarded == compact(messages_body([document(n) for n in sent_order]))
    result = json.loads(response.headers["x-prefixgate-result"])
    assert result["reordered"] is True and result["blocks"] == 4 and result["predicted_cached_blocks"] == 2


async def test_a_cache_breakpoint_stays_put_and_still_covers_the_same_blocks(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))
    docs = [document("delta"), document("gamma"), document("beta", cache=True), document("alpha")]
    async with gateway() as client:
        await client.post("/v1/messages", content=compact(messages_body([document("gamma"), document("delta")])))
        await client.post("/v1/messages", content=compact(messages_body(docs)))
    content = json.loads(route.calls[1].request.content)["messages"][0]["content"]
    assert content[2] == document("beta", cache=True) and content[3] == document("alpha")
    assert {b["title"] for b in content[:2]} == {"gamma", "delta"}


async def test_text_blocks_inside_messages_are_planned_like_chat(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))

    def xml(names: list[str]) -> str:
        return "Docs:\n" + "\n".join(f'<document id="{n}">{TEXTS[n]}</document>' for n in names) + "\nAnswer."

    async with gateway() as client:
        for names in (["alpha", "beta", "gamma"], ["gamma", "alpha", "beta"]):
            body = {"model": "m", "max_tokens": 4, "system": xml(names), "messages": [{"role": "user", "content": "q"}]}
            await client.post("/v1/messages", json=body)
    systems = [json.loads(call.request.content)["system"] for call in route.calls]
    assert systems[0] == systems[1]


def citing(index: int) -> dict[str, Any]:
    return {"type": "char_location", "cited_text": "Passage", "document_index": index, "document_title": None,
            "start_char_index": 0, "end_char_index": 7}  # fmt: skip


async def _reordered_pair(client: Any, cite: bool, stream: bool = False) -> tuple[list[str], Any]:
    await client.post("/v1/messages", json=messages_body([document(n, cite=cite) for n in ("beta", "gamma")]))
    order = ["alpha", "gamma", "beta"]
    body = messages_body([document(n, cite=cite) for n in order], stream=stream)
    response = await client.post("/v1/messages", json=body, headers={"accept-encoding": "gzip"})
    return order, response


async def test_citations_point_at_the_clients_document(gateway: AppFactory, upstream: respx.Router) -> None:
    answer = {**MESSAGE, "content": [{"type": "text", "text": "x", "citations": [citing(0), citing(2)]}]}
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=answer))
    async with gateway() as client:
        order, response = await _reordered_pair(client, cite=True)
    sent_order = titles(json.loads(route.calls[1].request.content))
    assert sent_order != order
    assert (
        route.calls[1].request.headers["accept-encoding"] == "identity"
    )  # an answer to rewrite must come uncompressed
    cited = [c["document_index"] for c in response.json()["content"][0]["citations"]]
    assert [order[i] for i in cited] == [sent_order[0], sent_order[2]]
    assert response.json()["usage"] == MESSAGE["usage"]


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], fail: bool = False) -> None:
        self.chunks, self.fail = chunks, fail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.fail:
            raise httpx.ReadError("connection reset")


def sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def test_streamed_citations_are_remapped_and_other_events_pass_untouched(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    start = sse("message_start", {"type": "message_start", "message": {**MESSAGE, "content": []}})
    delta = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "citations_delta", "citation": citing(0)}})  # fmt: skip
    text = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}})  # fmt: skip
    stop = sse("message_stop", {"type": "message_stop"})
    chunks = [start + delta[:30], delta[30:] + text, stop]
    stream_route = upstream.post("/v1/messages")
    stream_route.side_effect = [
        httpx.Response(200, json=MESSAGE),
        httpx.Response(200, stream=_Chunks(chunks), headers={"content-type": "text/event-stream"}),
    ]
    async with gateway() as client:
        order, response = await _reordered_pair(client, cite=True, stream=True)
        metrics = (await client.get("/metrics")).text
    sent_order = titles(json.loads(stream_route.calls[1].request.content))
    events = response.content.split(b"\n\n")
    assert events[0] + b"\n\n" == start and events[2] + b"\n\n" == text and events[3] + b"\n\n" == stop
    citation = json.loads(events[1].split(b"data: ", 1)[1])["delta"]["citation"]
    assert order[citation["document_index"]] == sent_order[0]
    assert 'prefixgate_engine_cached_tokens_total{route="/v1/messages"} 60.0' in metrics


async def test_a_resent_answer_keeps_the_conversation_in_one_order(gateway: AppFactory, upstream: respx.Router) -> None:
    answer = {**MESSAGE, "content": [{"type": "text", "text": "x", "citations": [citing(0)]}]}
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=answer))
    async with gateway() as client:
        order, first = await _reordered_pair(client, cite=True)
        body = messages_body([document(n, cite=True) for n in order])
        body["messages"] += [{"role": "assistant", "content": first.json()["content"]},
                             {"role": "user", "content": "and then?"}]  # fmt: skip
        await client.post("/v1/messages", content=compact(body))
    turn1, turn2 = (json.loads(call.request.content) for call in route.calls[1:])
    sent_order = titles(turn1)
    assert turn2["messages"][0] == turn1["messages"][0]  # the documents go in the order the engine already holds
    client_index = first.json()["content"][0]["citations"][0]["document_index"]
    sent_index = turn2["messages"][1]["content"][0]["citations"][0]["document_index"]
    assert client_index != sent_index == 0  # the engine reads back the index it wrote
    assert order[client_index] == sent_order[sent_index]


async def test_messages_errors_are_anthropic_shaped(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/messages").mock(
        return_value=httpx.Response(500, json={"error": {"message": "engine broke", "type": "server_error"}})
    )
    async with gateway(api_key=("k1",)) as client:
        missing = await client.post("/v1/messages", json={"model": "m"}, headers={"x-api-key": "k1"})
        refused = await client.post("/v1/messages", json=messages_body([]), headers={"x-api-key": "nope"})
        upstream_error = await client.post("/v1/messages", json=messages_body([]), headers={"x-api-key": "k1"})
        bearer = await client.post("/v1/messages", json=messages_body([]), headers={"authorization": "Bearer k1"})
        openai_route = await client.post("/v1/chat/completions", json={"model": "m"}, headers={"x-api-key": "k1"})
    assert missing.status_code == 400
    assert missing.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "missing required parameter: 'messages'"}}  # fmt: skip
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert upstream_error.status_code == 500
    assert upstream_error.json() == {"type": "error", "error": {"type": "api_error", "message": "engine broke"}}
    assert bearer.status_code == 500
    assert "x-api-key" not in route.calls[0].request.headers  # a gateway key never reaches the engine
    assert openai_route.status_code == 400 and openai_route.json()["error"]["param"] == "messages"


async def test_a_broken_stream_ends_with_the_routes_error_event(gateway: AppFactory, upstream: respx.Router) -> None:
    text = sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "hi"}})  # fmt: skip
    upstream.post("/v1/messages").mock(
        return_value=httpx.Response(
            200, stream=_Chunks([text], fail=True), headers={"content-type": "text/event-stream"}
        )
    )
    upstream.post("/v1/responses").mock(
        return_value=httpx.Response(
            200, stream=_Chunks([b"event: x\ndata: {}\n\n"], fail=True), headers={"content-type": "text/event-stream"}
        )
    )
    async with gateway() as client:
        messages = await client.post("/v1/messages", json=messages_body([], stream=True))
        responses = await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
    last = messages.content.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ")[1])["error"]["type"] == "api_error"
    event = json.loads(responses.content.split(b"\n\n")[-2].split(b"data: ")[1])
    assert event["type"] == "error" and event["code"] == "upstream_connection_lost"


RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
            "usage": {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 2}}  # fmt: skip


def responses_body(names: list[str], **extra: Any) -> dict[str, Any]:
    results = json.dumps({"results": [{"id": n, "text": TEXTS[n]} for n in names]})
    hits = [{"file_id": f"file-{n}", "filename": f"{n}.txt", "score": 0.5, "text": TEXTS[n]} for n in names]
    items = [
        {"role": "developer", "content": "Use the tools."},
        {"type": "function_call", "call_id": "c1", "name": "search", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": results},
        {"type": "file_search_call", "id": "fs1", "queries": ["q"], "status": "completed", "results": hits},
        {"role": "user", "content": [{"type": "input_text", "text": "What now?"}]},
    ]
    return {"model": "m", "instructions": "Be brief.", "input": items, "store": False, **extra}


def result_ids(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    items = {item.get("type"): item for item in body["input"]}
    tools = [r["id"] for r in json.loads(items["function_call_output"]["output"])["results"]]
    return tools, [r["file_id"][5:] for r in items["file_search_call"]["results"]]


async def test_responses_tool_outputs_and_file_search_results_reordered(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/responses").mock(return_value=httpx.Response(200, json=RESPONSE))
    async with gateway(engine="vllm") as client:
        await client.post("/v1/responses", json=responses_body(["beta", "gamma"]))
        order = ["gamma", "alpha", "beta"]
        response = await client.post("/v1/responses", content=compact(responses_body(order)))
        # the file search results follow the tool output, so they share a prefix only when it is the same
        same_tools = responses_body(order)
        same_tools["input"][3]["results"] = same_tools["input"][3]["results"][1:]
        await client.post("/v1/responses", json=same_tools)
        metrics = (await client.get("/metrics")).text
    first, second, third = (json.loads(call.request.content) for call in route.calls)
    tools, files = result_ids(second)
    assert tools[:2] == result_ids(first)[0] and sorted(tools) == sorted(order) and tools != order
    assert result_ids(third)[1] == [name for name in files if name != "gamma"]
    assert second["request_id"] == response.headers["x-request-id"]  # vLLM files a response under its request_id
    assert {k: v for k, v in second.items() if k not in ("input", "request_id")} == {
        k: v for k, v in responses_body(order).items() if k != "input"
    }
    assert second["input"][4] == responses_body(order)["input"][4]
    assert json.loads(response.headers["x-prefixgate-result"])["groups"] == 2
    assert 'prefixgate_engine_cached_tokens_total{route="/v1/responses"} 60.0' in metrics
    assert 'prefixgate_engine_prompt_tokens_total{route="/v1/responses"} 150.0' in metrics


async def test_previous_response_id_is_left_alone_and_says_why(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/responses").mock(return_value=httpx.Response(200, json=RESPONSE))
    async with gateway() as client:
        await client.post("/v1/responses", json=responses_body(["beta", "gamma"]))
        body = compact(responses_body(["gamma", "alpha", "beta"], previous_response_id="resp_0"))
        response = await client.post("/v1/responses", content=body)
        metrics = (await client.get("/metrics")).text
    assert route.calls[1].request.content == body
    assert json.loads(response.headers["x-prefixgate-result"])["left_alone"] == {"previous_response_id": 1}
    assert 'prefixgate_left_alone_total{reason="previous_response_id"} 1.0' in metrics


async def test_control_headers_apply_to_messages(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))
    tool_docs = {"type": "tool_result", "tool_use_id": "t1", "content": [document("delta"), document("alpha")]}
    body = messages_body([document(n) for n in ("gamma", "beta", "alpha")])
    body["messages"][0]["content"].insert(0, tool_docs)
    async with gateway() as client:
        off = await client.post("/v1/messages", content=compact(body), headers={"x-prefixgate-reorder": "off"})
        tool_only = await client.post("/v1/messages", content=compact(body), headers={"x-prefixgate-scope": "tool"})
        everything = await client.post("/v1/messages", content=compact(body))
    assert route.calls[0].request.content == compact(body)
    assert json.loads(off.headers["x-prefixgate-result"])["enabled"] is False
    tool_sent = json.loads(route.calls[1].request.content)["messages"][0]["content"]
    assert tool_sent[1:4] == body["messages"][0]["content"][1:4]  # user documents stay: out of scope
    assert json.loads(tool_only.headers["x-prefixgate-result"])["groups"] == 1
    assert json.loads(everything.headers["x-prefixgate-result"])["groups"] == 2
    assert [b["title"] for b in tool_sent[0]["content"]] == [
        b["title"] for b in json.loads(route.calls[2].request.content)["messages"][0]["content"][0]["content"]
    ]


async def test_usage_read_from_a_large_final_responses_event(gateway: AppFactory, upstream: respx.Router) -> None:
    final = {"type": "response.completed", "sequence_number": 3,
             "response": {**RESPONSE, "output": [{"type": "message", "content": [{"type": "output_text",
                                                                                  "text": "y" * 300_000}]}]}}  # fmt: skip
    event = sse("response.completed", final)
    chunks = [event[i : i + 16_384] for i in range(0, len(event), 16_384)]
    upstream.post("/v1/responses").mock(
        return_value=httpx.Response(200, stream=_Chunks(chunks), headers={"content-type": "text/event-stream"})
    )
    async with gateway() as client:
        answer = await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})
        metrics = (await client.get("/metrics")).text
    assert answer.content == event
    assert 'prefixgate_engine_cached_tokens_total{route="/v1/responses"} 20.0' in metrics


@pytest.mark.parametrize("cite", [False, True])
async def test_text_inside_one_search_result_is_planned_unless_cited(
    gateway: AppFactory, upstream: respx.Router, cite: bool
) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))

    def result(names: list[str]) -> dict[str, Any]:
        text = "\n".join(f'<passage id="{n}">{TEXTS[n]}</passage>' for n in names)
        block = {"type": "search_result", "source": "kb", "title": "hits", "content": [{"type": "text", "text": text}]}
        return {**block, "citations": {"enabled": cite}}

    async with gateway() as client:
        for names in (["alpha", "beta", "gamma"], ["gamma", "beta", "alpha"]):
            body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [result(names)]}]}
            await client.post("/v1/messages", json=body)
    sent = [json.loads(call.request.content)["messages"][0]["content"][0] for call in route.calls]
    if cite:
        assert sent[1] == result(["gamma", "beta", "alpha"])  # cited block ranges point into it: left as sent
    else:
        assert sent[0]["content"] == sent[1]["content"]


async def test_a_big_body_is_planned_off_the_loop_the_same_way(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/messages").mock(return_value=httpx.Response(200, json=MESSAGE))

    def big(name: str) -> dict[str, Any]:
        block = document(name)
        block["source"]["data"] = TEXTS[name] * 100  # ~40 KB each: the body is planned in a worker thread
        return block

    async with gateway() as client:
        await client.post("/v1/messages", content=compact(messages_body([big(n) for n in ("beta", "gamma")])))
        response = await client.post(
            "/v1/messages", content=compact(messages_body([big(n) for n in ("gamma", "alpha", "beta")]))
        )
    sent = json.loads(route.calls[1].request.content)
    assert len(route.calls[1].request.content) > 64 << 10
    assert titles(sent)[:2] == titles(json.loads(route.calls[0].request.content))
    assert json.loads(response.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 2


CHAT_ANSWER = {"id": "c1", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
               "message": {"role": "assistant", "content": "ok"}}], "usage": {"prompt_tokens": 5,
               "completion_tokens": 1, "total_tokens": 6}}  # fmt: skip
COMPLETION_ANSWER = {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "ok",
                     "finish_reason": "stop", "logprobs": None}]}  # fmt: skip
OWN_TEMPLATE = (
    "You are the help desk of ACME. Ground every answer in the excerpts below.\n\n{context}\n\n"
    "Using only the excerpts above, answer: {question}"
)
# the route, a body holding the text, where the forwarded text is, the engine's answer
LEARNED_ROUTES = {
    "chat": ("/v1/chat/completions", lambda t: {"model": "m", "messages": [{"role": "user", "content": t}]},
             lambda b: b["messages"][0]["content"], CHAT_ANSWER),
    "completions": ("/v1/completions", lambda t: {"model": "m", "prompt": t, "max_tokens": 2}, lambda b: b["prompt"],
                    COMPLETION_ANSWER),
    "messages": ("/v1/messages", lambda t: {"model": "m", "max_tokens": 4, "system": t,
                 "messages": [{"role": "user", "content": "go"}]}, lambda b: b["system"], MESSAGE),
    "responses": ("/v1/responses", lambda t: {"model": "m", "instructions": t, "input": "go"},
                  lambda b: b["instructions"], RESPONSE),
}  # fmt: skip


@pytest.mark.parametrize("api", sorted(LEARNED_ROUTES))
async def test_an_applications_own_template_is_learned_on_every_api(
    gateway: AppFactory, upstream: respx.Router, api: str
) -> None:
    """A template no detector knows, in a chat message, a completion prompt, a Messages system prompt and Responses
    instructions: learned from the traffic, its documents move whole, its head and question stay in place."""
    import random

    from gateway.planning.intercept import audit_rewrite
    from tests.integration.test_frameworks import DOCS, FIRST, SECOND

    path, body, text_of, answer = LEARNED_ROUTES[api]
    route = upstream.post(path).mock(return_value=httpx.Response(200, json=answer))
    rng = random.Random(5)
    contexts = [rng.sample(DOCS, 3) for _ in range(20)] + [FIRST, SECOND]
    sent = [OWN_TEMPLATE.format(context="\n\n".join(docs), question=f"q{i}?") for i, docs in enumerate(contexts)]
    async with gateway() as client:
        for text in sent:
            response = await client.post(path, json=body(text))
            assert response.status_code == 200
    forwarded = [text_of(json.loads(call.request.content)) for call in route.calls]
    moved = sum(audit_rewrite(s, f, docs).moved for s, f, docs in zip(sent, forwarded, contexts, strict=True))
    assert moved >= 2
    assert forwarded[-1] != sent[-1] and forwarded[-1].startswith(forwarded[-2][:200])  # SECOND leads as FIRST went
    assert json.loads(response.headers["x-prefixgate-result"])["reordered"] is True
