"""The official OpenAI SDK against the gateway in front of the simulated engine, over real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from engines.sim import SimConfig, create_sim_app
from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.servers import free_port, serve_in_thread, wait_for

pytestmark = pytest.mark.timeout(60)


def _stack(sim: SimConfig, **settings: Any) -> Iterator[tuple[str, str]]:
    gateway_port = free_port()
    sim = SimConfig(**{**sim.__dict__, "evict_url": f"http://127.0.0.1:{gateway_port}/evict"}) if sim.evict_url else sim
    with serve_in_thread(create_sim_app(sim)) as engine:
        app = create_app(load_settings(environ={}, upstream=engine, port=gateway_port, **settings))
        with serve_in_thread(app, port=gateway_port) as gateway:
            yield gateway, engine


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str]]:
    yield from _stack(SimConfig(prefill_us_per_token=1.0, decode_us_per_token=2000.0))


@pytest.fixture
def client(stack: tuple[str, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack[0]}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _sim_requests(engine: str) -> list[dict[str, Any]]:
    payload: list[dict[str, Any]] = httpx.get(f"{engine}/sim/requests").json()
    return payload


def test_chat_with_tools_and_unknown_fields(client: openai.OpenAI, stack: tuple[str, str]) -> None:
    tools: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    raw = client.chat.completions.with_raw_response.create(
        model="sim",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=5,
        tools=tools,
        extra_body={"vendor_flag": {"x": [1, None]}, "top_k": None},
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    request_id = raw.headers["x-request-id"]
    seen = _sim_requests(stack[1])[-1]
    assert seen["headers"]["x-request-id"] == request_id
    assert seen["body"]["tools"] == tools
    assert seen["body"]["vendor_flag"] == {"x": [1, None]}
    assert "top_k" in seen["body"] and seen["body"]["top_k"] is None


def test_completions_n2_and_cached_tokens(client: openai.OpenAI) -> None:
    prompt = "shared prefix " * 200 + "tail"
    first = client.completions.create(model="sim", prompt=prompt, max_tokens=3, n=2)
    second = client.completions.create(model="sim", prompt=prompt, max_tokens=3)
    assert len(first.choices) == 2
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_streaming_completions(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="sim", prompt="abc def", max_tokens=3, stream=True)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) == 3


def test_first_byte_relayed_while_engine_still_generates(stack: tuple[str, str]) -> None:
    body = {"model": "sim", "prompt": "x", "max_tokens": 200, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{stack[0]}/v1/completions", json=body, timeout=30) as response:
        iterator = response.iter_raw()
        first = next(iterator)
        first_at = time.perf_counter() - started
        for _ in iterator:
            pass
        total = time.perf_counter() - started
    assert first.startswith(b"data: ")
    # 200 tokens at 2 ms each: the whole stream takes ~0.4 s. A buffering proxy would hand over the first
    # chunk only when the engine is done (first_at close to total); relayed chunks leave most of it after.
    assert total > 0.3
    assert total - first_at > 0.2


def test_client_disconnect_cancels_upstream(stack: tuple[str, str]) -> None:
    gateway, engine = stack
    before = httpx.get(f"{engine}/sim/stats").json()["cancelled"]
    host, port = gateway.removeprefix("http://").split(":")
    body = b'{"model": "sim", "prompt": "long", "max_tokens": 2000, "stream": true}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert b"200 OK" in sock.recv(4096)
    wait_for(lambda: httpx.get(f"{engine}/sim/stats").json()["cancelled"] > before, 5, "the upstream cancellation")
    stats = httpx.get(f"{engine}/sim/stats").json()
    assert stats["cancelled"] == before + 1
    assert stats["in_flight"] == 0


def test_engine_error_mid_stream_reaches_sdk_as_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=50,
        stream=True,
        extra_headers={"x-sim-fault": "midstream"},
    )
    with pytest.raises(openai.APIError):
        list(stream)


def test_engine_status_error_relayed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], extra_headers={"x-sim-fault": "503"}
        )
    assert info.value.status_code == 503


def test_models_passthrough(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["sim"]


def test_upstream_down_is_502_then_recovers() -> None:
    engine_port = free_port()
    app = create_app(load_settings(environ={}, upstream=f"http://127.0.0.1:{engine_port}"))
    with serve_in_thread(app) as gateway, openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as info:
            sdk.completions.create(model="sim", prompt="x", max_tokens=1)
        assert info.value.status_code == 502
        with serve_in_thread(create_sim_app(SimConfig()), port=engine_port):
            assert sdk.completions.create(model="sim", prompt="x", max_tokens=1).choices
