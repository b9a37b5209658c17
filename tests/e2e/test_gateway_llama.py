"""The gateway in front of a real llama-server (tiny generated model): slots, eviction tracking, RAG replay."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.llama import LlamaServer, StartLlamaServer
from tests.e2e.servers import serve_in_thread, wait_for

pytestmark = [pytest.mark.llama, pytest.mark.timeout(180)]

_WORDS = [a + b + c for a in "bdfklmnprst" for b in "aeiou" for c in "lmnrst"]


def _doc(seed: int, words: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


DOCS = {i: _doc(i) for i in range(12)}


def rag_chat(doc_ids: list[int], question: str) -> dict[str, Any]:
    inner = "\n".join(f'<document id="{i}">{DOCS[i]}</document>' for i in doc_ids)
    system = f"answer from the documents.\n<documents>\n{inner}\n</documents>"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0}


@contextmanager
def gateway_for(server: LlamaServer, **settings: Any) -> Iterator[str]:
    app = create_app(load_settings(environ={}, upstream=server.url, engine="llamacpp", **settings))
    with serve_in_thread(app) as base:
        wait_for(lambda: httpx.get(f"{base}/health").json()["slots"] is not None, what="the slot count")
        yield base


def _post(base: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    result = response.headers.get("x-prefixgate-result")
    return response.json(), (httpx.Response(200, content=result).json() if result else {})


def test_sdk_completions_chat_and_streaming(start_llama_server: StartLlamaServer) -> None:
    server = start_llama_server(slots=2)
    with gateway_for(server) as base, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as sdk:
        completion = sdk.completions.create(model="tiny", prompt="hello there friend", max_tokens=3, temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        chat = sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.object == "chat.completion"
        stream = sdk.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_slot_aware_routing_returns_to_the_slot_holding_the_prefix(start_llama_server: StartLlamaServer) -> None:
    server = start_llama_server(slots=2, cache_ram=0)
    with gateway_for(server, llamacpp_prompt_cache=False) as base:  # its slots are its whole cache: pinned
        _, first = _post(base, rag_chat([0, 1, 2, 3], "what is first"))
        _, other = _post(base, rag_chat([7, 8, 9], "something else"))
        again, third = _post(base, rag_chat([3, 2, 0, 1], "what is third"))
    assert first["slot"] != other["slot"]  # the unrelated request took the idle, least recently used slot
    assert third["slot"] == first["slot"]
    assert third["predicted_cached_blocks"] == 4
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.8 * again["usage"]["prompt_tokens"] - 20  # everything up to the question was reused
    assert again["timings"]["cache_n"] == cached


def test_slot_reuse_releases_the_previous_occupant(start_llama_server: StartLlamaServer) -> None:
    server = start_llama_server(slots=1, cache_ram=0)
    with gateway_for(server, llamacpp_prompt_cache=False) as base:
        _post(base, rag_chat([0, 1, 2], "one"))
        first_ids = httpx.get(f"{base}/requests").json()["request_ids"]
        _post(base, rag_chat([5, 6, 7], "two"))
        second_ids = httpx.get(f"{base}/requests").json()["request_ids"]
        again, result = _post(base, rag_chat([2, 1, 0], "three"))
    assert len(first_ids) == 1
    assert first_ids[0] not in second_ids and len(second_ids) == 1
    # the index knew the slot no longer held [0, 1, 2] and the engine agrees: nothing cached
    assert result["predicted_cached_blocks"] == 0
    assert again["timings"]["cache_n"] < 40


def test_rag_replay_gateway_beats_direct(start_llama_server: StartLlamaServer) -> None:
    rng = random.Random(3)
    queries = [(rng.sample(range(6), 4), f"question {i}") for i in range(12)]

    def replay(base: str) -> tuple[int, int]:
        prompt = cached = 0
        for doc_ids, question in queries:
            answer, _ = _post(base, rag_chat(doc_ids, question))
            prompt += answer["usage"]["prompt_tokens"]
            cached += answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        return prompt, cached

    direct_prompt, direct_cached = replay(start_llama_server(slots=2, cache_ram=0).url)
    with gateway_for(start_llama_server(slots=2, cache_ram=0)) as base:
        gateway_prompt, gateway_cached = replay(base)
    assert gateway_prompt == direct_prompt  # same prompts, only the block order differs
    assert gateway_cached > 1.5 * direct_cached
