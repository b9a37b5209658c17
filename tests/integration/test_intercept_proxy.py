"""Blocks inside unchanged OpenAI requests are reordered against the live index; nothing else changes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest
import respx

from gateway.planning import texts as texts_module
from gateway.proxy.pipeline import PLAN_IN_THREAD_BYTES
from scheduler.index import LiveIndex
from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio

DOCS = {
    k: f"Document {k} text: " + " ".join(f"w{k}x{i}" for i in range(30)) for k in ("alpha", "beta", "gamma", "delta")
}
OK = {"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def xml_docs(names: list[str]) -> str:
    inner = "\n".join(f'<document id="{n}" source="kb">{DOCS[n]}</document>' for n in names)
    return f"Answer using the documents.\n<documents>\n{inner}\n</documents>\nBe concise."


def chat(system: str, question: str = "What now?", **extra: Any) -> bytes:
    body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    return json.dumps({**body, **extra}).encode()


def order_in(text: str) -> list[str]:
    return sorted(DOCS, key=lambda n: text.find(f'id="{n}"') if f'id="{n}"' in text else 1 << 30)[
        : sum(f'id="{n}"' in text for n in DOCS)
    ]


def forwarded(route: respx.Route, i: int = -1) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(route.calls[i].request.content)
    return result


async def test_second_request_takes_the_cached_order(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway() as client:
        first = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        second = await client.post("/v1/chat/completions", content=chat(xml_docs(["gamma", "delta", "beta", "alpha"])))
    sent1 = forwarded(route, 0)["messages"][0]["content"]
    sent2 = forwarded(route, 1)["messages"][0]["content"]
    head = order_in(sent1)
    assert order_in(sent2)[:3] == head
    assert sent2.startswith(sent1[: sent1.index(f'id="{head[-1]}"')])
    result2 = json.loads(second.headers["x-prefixgate-result"])
    assert result2["groups"] == 1 and result2["blocks"] == 4
    assert result2["predicted_cached_blocks"] == 3
    assert json.loads(first.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 0


async def test_only_block_order_changes(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    body = chat(xml_docs(["delta", "alpha", "gamma"]), "Q?", vendor={"k": [1.50, None]}, temperature=None)
    async with gateway() as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "delta", "gamma"])))
        await client.post("/v1/chat/completions", content=body)
    sent = msgspec.json.decode(route.calls[1].request.content, type=dict[str, msgspec.Raw])
    original = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    for key in ("model", "vendor", "temperature"):
        assert bytes(sent[key]) == bytes(original[key])
    system_out = json.loads(route.calls[1].request.content)["messages"][0]["content"]
    system_in = json.loads(body)["messages"][0]["content"]
    assert system_out != system_in
    assert sorted(system_out) == sorted(system_in)  # a permutation of the same characters
    assert system_out.startswith("Answer using the documents.\n<documents>\n")
    assert system_out.endswith("\n</documents>\nBe concise.")
    messages = msgspec.json.decode(sent["messages"], type=list[msgspec.Raw])
    originals = msgspec.json.decode(original["messages"], type=list[msgspec.Raw])
    assert bytes(messages[1]) == bytes(originals[1])  # the untouched user message keeps its exact bytes


async def test_multi_turn_resend_is_rewritten_identically(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))

    def tool_text(names: list[str]) -> str:
        return json.dumps({"results": [{"url": f"https://kb/{n}", "text": DOCS[n]} for n in names]})

    def conversation(names: list[str]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "search please"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": tool_text(names)},
        ]

    async with gateway() as client:
        # another conversation first caches the same documents, in the order the gateway gives them
        await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": conversation(["beta", "alpha", "gamma"])}
        )
        held = [
            r["url"].rsplit("/", 1)[1] for r in json.loads(forwarded(route, 0)["messages"][2]["content"])["results"]
        ]
        turn1 = conversation(held[::-1])  # this one's retriever ranks them the other way round
        await client.post("/v1/chat/completions", json={"model": "m", "messages": turn1})
        turn2 = [*turn1, {"role": "assistant", "content": "Found it."}, {"role": "user", "content": "more?"}]
        await client.post("/v1/chat/completions", json={"model": "m", "messages": turn2})
    sent_turn1 = forwarded(route, 1)["messages"]
    sent_turn2 = forwarded(route, 2)["messages"]
    assert sent_turn1[2]["content"] == tool_text(held)  # turn 1 really was rewritten, to the order the engine holds
    assert sent_turn2[:3] == sent_turn1
    tool_out = json.loads(sent_turn2[2]["content"])
    assert sorted(r["url"] for r in tool_out["results"]) == sorted(f"https://kb/{n}" for n in held)
    assert all(r["text"] in DOCS.values() for r in tool_out["results"])  # nothing lost or replaced by hints


async def test_reorder_off_forwards_original_bytes(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    body = chat(xml_docs(["delta", "alpha", "gamma"]))
    async with gateway() as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "gamma", "delta"])))
        r1 = await client.post("/v1/chat/completions", content=body, headers={"x-prefixgate-reorder": "off"})
        await client.post("/v1/chat/completions", content=body, headers={"x-contextpilot-enabled": "false"})
    assert route.calls[1].request.content == body
    assert route.calls[2].request.content == body
    assert "x-prefixgate-reorder" not in route.calls[1].request.headers
    assert json.loads(r1.headers["x-prefixgate-result"])["enabled"] is False


async def test_server_option_no_reorder(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    body = chat(xml_docs(["delta", "alpha", "gamma"]))
    other = chat(xml_docs(["gamma", "delta", "alpha"]))  # ``body`` as sent is held after the second request
    async with gateway(reorder=False) as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "gamma", "delta"])))
        await client.post("/v1/chat/completions", content=body)
        await client.post("/v1/chat/completions", content=other, headers={"x-prefixgate-reorder": "on"})
    assert route.calls[1].request.content == body
    assert route.calls[2].request.content != other


@pytest.mark.parametrize(
    ("header", "value"),
    [("x-prefixgate-format", "nonsense"), ("x-prefixgate-scope", "everything"), ("x-prefixgate-reorder", "maybe")],
)
async def test_bad_control_header_is_400(gateway: AppFactory, upstream: respx.Router, header: str, value: str) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=chat("x"), headers={header: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"].lower() == header
    assert not route.called


async def test_scope_limits_where_blocks_are_looked_for(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    body = chat(xml_docs(["delta", "alpha", "gamma"]))
    async with gateway() as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "gamma", "delta"])))
        await client.post("/v1/chat/completions", content=body, headers={"x-prefixgate-scope": "tool"})
        await client.post("/v1/chat/completions", content=body, headers={"x-contextpilot-scope": "system"})
    assert route.calls[1].request.content == body
    assert route.calls[2].request.content != body


async def test_completion_prompt_numbered_blocks_renumbered(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/completions").mock(return_value=httpx.Response(200, json=OK))

    def prompt(names: list[str]) -> str:
        docs = "\n\n".join(f"[{i}] {DOCS[n]}" for i, n in enumerate(names, 1))
        return f"Sources:\n\n{docs}\n\nQuestion: which?\nAnswer:"

    async with gateway() as client:
        await client.post("/v1/completions", json={"model": "m", "prompt": prompt(["alpha", "beta", "gamma"])})
        await client.post("/v1/completions", json={"model": "m", "prompt": prompt(["gamma", "alpha", "beta"])})
    first = forwarded(route, 0)["prompt"]
    second = forwarded(route, 1)["prompt"]
    assert second == first  # same blocks, same canonical rendering, numbering by position


async def test_relevance_annotation(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(relevance_annotation=True) as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        await client.post("/v1/chat/completions", content=chat(xml_docs(["gamma", "beta", "alpha"])))
    sent = forwarded(route, 1)["messages"][0]["content"]
    assert "Relevance order" in sent
    assert sent.index("Relevance order") > sent.index("</documents>")


async def test_prose_with_citations_untouched(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    text = "As [1] and [2] show, caching helps. See also [3].\n\n1. Install it.\n2. Run it.\n3. Done."
    body = chat(text, text)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=body)
    assert route.calls[0].request.content == body
    assert json.loads(response.headers["x-prefixgate-result"])["groups"] == 0


async def test_eviction_releases_the_committed_path(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway() as client:
        first = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        stats = (await client.get("/stats")).json()["index_stats"]
        evicted = (
            await client.post("/evict", json={"request_ids": [f"chatcmpl-{first.headers['x-request-id']}"]})
        ).json()
        after = (await client.get("/stats")).json()["index_stats"]
    assert stats["num_requests"] == 1
    assert evicted["removed_count"] == 1
    assert after["num_requests"] == 0


async def test_failed_upstream_commits_nothing(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(500, json={"error": {"message": "x"}}))
    async with gateway() as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        stats = (await client.get("/stats")).json()["index_stats"]
    assert stats["num_requests"] == 0


async def test_engine_feedback_releases_stale_entries(gateway: AppFactory, upstream: respx.Router) -> None:
    def usage(cached: int) -> dict[str, Any]:
        return {
            **OK,
            "usage": {"prompt_tokens": 400, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": cached}},
        }

    route = upstream.post("/v1/chat/completions")
    async with gateway() as client:
        route.mock(return_value=httpx.Response(200, json=usage(0)))
        first = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        # the engine agrees with the prediction: nothing is released
        route.mock(return_value=httpx.Response(200, json=usage(380)))
        second = await client.post("/v1/chat/completions", content=chat(xml_docs(["gamma", "beta", "alpha"]), "Q2"))
        ids = (await client.get("/requests")).json()["request_ids"]
        # the engine evicted the documents without telling the gateway: far fewer cached tokens than predicted
        route.mock(return_value=httpx.Response(200, json=usage(0)))
        third = await client.post("/v1/chat/completions", content=chat(xml_docs(["beta", "alpha", "gamma"]), "Q3"))
        after = (await client.get("/requests")).json()["request_ids"]
        metrics = (await client.get("/metrics")).text
    assert json.loads(second.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 3
    assert ids == [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert json.loads(third.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 3
    assert after == [third.headers["x-request-id"]]
    assert "prefixgate_stale_predictions_total 1.0" in metrics
    assert "prefixgate_stale_released_total 2.0" in metrics


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a worker thread
        return False
    return True


async def test_a_big_prompt_is_planned_in_a_worker_thread_and_the_index_used_on_the_loop(
    gateway: AppFactory, upstream: respx.Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_loop: dict[str, set[bool]] = {"find_groups": set(), "index": set()}

    def spy(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            on_loop[name].add(_on_event_loop())
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(texts_module, "find_groups", spy("find_groups", texts_module.find_groups))
    monkeypatch.setattr(LiveIndex, "plan", spy("index", LiveIndex.plan))
    monkeypatch.setattr(LiveIndex, "commit", spy("index", LiveIndex.commit))
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    question = "Which one? " + "padding " * (PLAN_IN_THREAD_BYTES // 8)
    async with gateway() as client:
        await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"]), question))
        second = await client.post(
            "/v1/chat/completions", content=chat(xml_docs(["gamma", "delta", "beta", "alpha"]), question)
        )
    assert len(route.calls[1].request.content) > PLAN_IN_THREAD_BYTES
    assert on_loop == {"find_groups": {False}, "index": {True}}
    head = order_in(forwarded(route, 0)["messages"][0]["content"])
    assert order_in(forwarded(route, 1)["messages"][0]["content"])[:3] == head  # the first one was committed
    assert json.loads(second.headers["x-prefixgate-result"])["predicted_cached_blocks"] == 3
    assert forwarded(route, 1)["messages"][1]["content"] == question
