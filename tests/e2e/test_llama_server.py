"""The real llama-server behaves as the gateway's llama.cpp adapter assumes.

Random weights: assertions are about response shapes, usage and prefix-cache counters
(`usage.prompt_tokens_details.cached_tokens`, `timings.cache_n`), `/slots` and `id_slot`, never text.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.llama import LlamaServer, LlamaServerError, StartLlamaServer, run_llama_server

# The fixtures live with the launcher; bound here (not imported by name) so test parameters do not shadow imports.
pytestmark = pytest.mark.llama

WORDS = [
    *("alpha", "bravo", "cargo", "delta", "eagle", "fable", "gamma", "hotel", "index", "joker", "kilo", "lemon"),
    *("metro", "nylon", "opera", "piano", "quest", "radio", "sigma", "tango", "ultra", "vivid", "whale", "xenon"),
    *("yacht", "zebra"),
]


def prose(tag: str, words: int, stride: int = 7) -> str:
    """Deterministic lowercase text, about three tokens per word; `tag` makes prompts differ from the start."""
    return f"{tag}: " + " ".join(WORDS[(i * stride) % len(WORDS)] for i in range(words))


@contextlib.contextmanager
def openai_client(server: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def complete(client: openai.OpenAI, prompt: str, **extra_body: Any) -> tuple[openai.types.Completion, dict[str, Any]]:
    """One greedy completion; returns the response and its llama.cpp `timings`."""
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, extra_body=extra_body or None
    )
    assert response.model_extra is not None
    timings: dict[str, Any] = response.model_extra["timings"]
    return response, timings


def cached(response: openai.types.Completion | openai.types.chat.ChatCompletionChunk) -> int:
    assert response.usage is not None
    assert response.usage.prompt_tokens_details is not None
    cached_tokens = response.usage.prompt_tokens_details.cached_tokens
    assert cached_tokens is not None
    return cached_tokens


def slots(server: LlamaServer) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/slots", timeout=10)
    response.raise_for_status()
    body: list[dict[str, Any]] = response.json()
    return body


def test_completion_reports_usage_and_timings(llama_server: LlamaServer) -> None:
    with openai_client(llama_server) as client:
        response, timings = complete(client, prose("doc", 20))

    assert response.object == "text_completion"
    assert len(response.choices) == 1
    assert response.choices[0].finish_reason in {"length", "stop"}
    assert response.usage is not None
    assert response.usage.prompt_tokens > 20
    assert 0 < response.usage.completion_tokens <= 4
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert cached(response) == timings["cache_n"] == 0
    assert timings["prompt_n"] == response.usage.prompt_tokens
    assert timings["predicted_n"] == response.usage.completion_tokens


def test_chat_completion_uses_the_embedded_template(llama_server: LlamaServer) -> None:
    with openai_client(llama_server) as client:
        response = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": prose("ask", 10)}],
            max_tokens=4,
            temperature=0,
        )

    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.usage is not None
    # ChatML adds the role markers, so the prompt is longer than the two contents alone.
    assert response.usage.prompt_tokens > 10 * 2
    assert 0 < response.usage.completion_tokens <= 4


def test_repeated_prompt_is_served_from_the_prefix_cache(llama_server: LlamaServer) -> None:
    prompt = prose("doc", 150)
    with openai_client(llama_server) as client:
        first, first_timings = complete(client, prompt)
        second, second_timings = complete(client, prompt)

    assert first.usage is not None and second.usage is not None
    assert cached(first) == first_timings["cache_n"] == 0
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    # All but the last prompt token are reused; that one is evaluated again to produce logits.
    assert cached(second) == second_timings["cache_n"] > first.usage.prompt_tokens // 2
    assert second_timings["cache_n"] + second_timings["prompt_n"] == second.usage.prompt_tokens
    assert second_timings["prompt_n"] >= 1


def test_shared_prefix_is_reused_up_to_the_divergence(llama_server: LlamaServer) -> None:
    shared = prose("doc", 100)
    with openai_client(llama_server) as client:
        first, _ = complete(client, shared + " " + prose("one", 30, stride=3))
        second, timings = complete(client, shared + " " + prose("two", 30, stride=5))

    assert first.usage is not None and second.usage is not None
    assert 0 < timings["cache_n"] < second.usage.prompt_tokens
    assert timings["cache_n"] >= 100  # at least the shared hundred words (about three tokens each)
    assert timings["cache_n"] + timings["prompt_n"] == second.usage.prompt_tokens


def test_streamed_chat_ends_with_a_usage_chunk(llama_server: LlamaServer) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prose("chat", 60)}]
    usage_chunks = []
    for _ in range(2):
        # a client per stream: llama-server closes the connection after a streamed answer without saying so, and a
        # second request written into it before the close arrives would fail (the gateway resends such a request)
        with openai_client(llama_server) as client:
            stream = client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            with stream:
                chunks = list(stream)
            assert {c.id for c in chunks} == {chunks[0].id}
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            # The role rides on the first delta with output; when the sampled bytes produce no text
            # (random weights: a split UTF-8 sequence) llama-server sends no role chunk at all.
            roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
            assert roles in ([], ["assistant"])
            assert roles == [] or chunks[0].choices[0].delta.role == "assistant"
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finishes in (["length"], ["stop"])
            last = chunks[-1]
            assert last.choices == []
            assert last.usage is not None
            assert last.model_extra is not None and "timings" in last.model_extra
            assert all(c.usage is None for c in chunks[:-1])
            usage_chunks.append(last)

    first, second = usage_chunks
    assert cached(first) == 0
    assert cached(second) > 0
    assert cached(second) == second.model_extra["timings"]["cache_n"]  # type: ignore[index]


def test_stream_is_data_only_sse_ending_in_done(llama_server: LlamaServer) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prose("raw", 20)}],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{llama_server.url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()

    assert raw.endswith(b"\n\n")
    events = raw.rstrip(b"\n").split(b"\n\n")
    assert all(event.startswith(b"data: ") for event in events)
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("count", [1, 3])
def test_slots_endpoint_lists_the_configured_slots(start_llama_server: StartLlamaServer, count: int) -> None:
    server = start_llama_server(slots=count)
    listed = slots(server)

    assert [slot["id"] for slot in listed] == list(range(count))
    assert all(slot["is_processing"] is False for slot in listed)
    assert all(slot["n_ctx"] > 0 for slot in listed)


def test_id_slot_pins_a_request_to_a_slot(start_llama_server: StartLlamaServer) -> None:
    # Without the host-RAM prompt cache a slot can only reuse what is in its own KV cache.
    server = start_llama_server(slots=2, cache_ram=0)
    prompt = prose("doc", 80)
    with openai_client(server) as client:
        _, on_zero = complete(client, prompt, id_slot=0)
        _, on_one = complete(client, prompt, id_slot=1)
        _, zero_again = complete(client, prompt, id_slot=0)

    assert on_zero["cache_n"] == 0
    assert on_one["cache_n"] == 0  # slot 1 never saw the prompt, although slot 0 holds it
    assert zero_again["cache_n"] > 0
    tasks = [slot["id_task"] for slot in slots(server)]
    assert tasks[0] > tasks[1]  # slot 0 served the latest task


def test_unrelated_prompt_evicts_the_only_slot_without_ram_cache(start_llama_server: StartLlamaServer) -> None:
    server = start_llama_server(slots=1, cache_ram=0)
    doc, other = prose("doc", 120), prose("other", 120, stride=5)
    with openai_client(server) as client:
        counters = [complete(client, prompt)[1]["cache_n"] for prompt in (doc, doc, other, doc)]

    cold, warm, unrelated, after_eviction = counters
    assert cold == 0
    assert warm > 0
    assert unrelated == 0
    assert after_eviction == 0


def test_default_ram_cache_restores_an_evicted_prefix(start_llama_server: StartLlamaServer) -> None:
    # The contrast to the test above: with the default --cache-ram, leaving the slot is not eviction.
    server = start_llama_server(slots=1)
    doc, other = prose("doc", 120), prose("other", 120, stride=5)
    with openai_client(server) as client:
        counters = [complete(client, prompt)[1]["cache_n"] for prompt in (doc, other, doc)]

    cold, unrelated, restored = counters
    assert cold == unrelated == 0
    assert restored > 0


def test_slot_erase_forces_an_eviction(start_llama_server: StartLlamaServer, tmp_path: Path) -> None:
    server = start_llama_server(slots=1, cache_ram=0, extra_args=("--slot-save-path", str(tmp_path)))
    prompt = prose("doc", 40)
    with openai_client(server) as client:
        complete(client, prompt)
        erased = httpx.post(f"{server.url}/slots/0", params={"action": "erase"}, timeout=10)
        _, after_erase = complete(client, prompt)

    assert erased.status_code == 200
    assert erased.json()["n_erased"] > 0
    assert after_erase["cache_n"] == 0


def test_tokenizer_is_the_tiny_byte_level_bpe(llama_server: LlamaServer) -> None:
    response = httpx.post(f"{llama_server.url}/tokenize", json={"content": "hello world"}, timeout=10)
    response.raise_for_status()

    # "hello" -> h el lo, " world" -> Ġw or ld: the letter-pair merges give three tokens per word.
    assert len(response.json()["tokens"]) == 6


def test_metrics_expose_prompt_token_counters(llama_server: LlamaServer) -> None:
    with openai_client(llama_server) as client:
        complete(client, prose("doc", 10))
    response = httpx.get(f"{llama_server.url}/metrics", timeout=10)

    assert response.status_code == 200
    assert "llamacpp:prompt_tokens_total" in response.text


def test_startup_failure_reports_the_log(llama_binary: Path, tmp_path: Path) -> None:
    with (
        pytest.raises(LlamaServerError, match="exited with status"),
        run_llama_server(llama_binary, tmp_path / "missing.gguf", log_path=tmp_path / "server.log"),
    ):
        pass
