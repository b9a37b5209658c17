"""The Anthropic SDK on ``/v1/messages`` and the OpenAI SDK on ``/v1/responses``, through the gateway to a real
llama-server (tiny generated model): answers, engine-reported cached tokens in ``/metrics``, and a RAG replay whose
documents the gateway reorders into a shared prefix."""

from __future__ import annotations

import json
import random

import anthropic
import httpx
import openai
import pytest

from tests.e2e.llama import StartLlamaServer
from tests.e2e.test_gateway_llama import DOCS, gateway_for

pytestmark = [pytest.mark.llama, pytest.mark.timeout(180)]


def _system(doc_ids: list[int]) -> str:
    inner = "\n".join(f'<document id="{i}">{DOCS[i]}</document>' for i in doc_ids)
    return f"answer from the documents.\n<documents>\n{inner}\n</documents>"


def _cached(base: str, route: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f'prefixgate_engine_cached_tokens_total{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_messages_and_responses_sdks(start_llama_server: StartLlamaServer) -> None:
    server = start_llama_server(slots=2)
    with gateway_for(server) as base:
        claude = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        with claude, oai:
            system = _system([0, 1, 2])
            question = [{"role": "user", "content": [{"type": "text", "text": "what is first"}]}]
            first = claude.messages.create(model="tiny", max_tokens=3, system=system, messages=question)
            assert first.type == "message" and first.usage.output_tokens <= 3
            with claude.messages.stream(model="tiny", max_tokens=3, system=system, messages=question) as stream:
                message = stream.get_final_message()
            assert message.usage.cache_read_input_tokens and message.usage.cache_read_input_tokens > 0
            # with llama-server's prompt cache (its default --cache-ram) no request is slot-pinned: llama.cpp's own
            # choice finds the slot, or the saved prompt, holding the prefix
            oai.responses.create(model="tiny", instructions=system, input="what is second", max_output_tokens=3)
            raw = oai.responses.with_raw_response.create(model="tiny", instructions=system, input="third?",
                                                         max_output_tokens=2)  # fmt: skip
            response = raw.parse()
            assert response.usage is not None and response.usage.input_tokens_details.cached_tokens > 0
            assert "slot" not in json.loads(raw.headers["x-prefixgate-result"])
        assert _cached(base, "/v1/messages") >= message.usage.cache_read_input_tokens
        assert _cached(base, "/v1/responses") >= response.usage.input_tokens_details.cached_tokens


def test_messages_rag_replay_gateway_beats_direct(start_llama_server: StartLlamaServer) -> None:
    rng = random.Random(5)
    queries = [(rng.sample(range(6), 4), f"question {i}") for i in range(12)]

    def replay(base: str) -> tuple[int, int]:
        prompt = cached = 0
        with anthropic.Anthropic(base_url=base, api_key="x", max_retries=0) as claude:
            for doc_ids, question in queries:
                answer = claude.messages.create(
                    model="tiny", max_tokens=2, system=_system(doc_ids), extra_body={"temperature": 0},
                    messages=[{"role": "user", "content": question}],
                )  # fmt: skip
                reused = answer.usage.cache_read_input_tokens or 0
                prompt += answer.usage.input_tokens + reused
                cached += reused
        return prompt, cached

    direct_prompt, direct_cached = replay(start_llama_server(slots=2, cache_ram=0).url)
    with gateway_for(start_llama_server(slots=2, cache_ram=0)) as base:
        gateway_prompt, gateway_cached = replay(base)
    assert gateway_prompt == direct_prompt  # same prompts, only the document order differs
    assert gateway_cached > 1.5 * direct_cached
