"""The simulated engine over a real loopback socket, driven by the official openai SDK."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from engines.sim import SimConfig, build_server
from tests.e2e.servers import wait_for

pytestmark = pytest.mark.timeout(60)


@contextmanager
def running_sim(config: SimConfig) -> Iterator[str]:
    """A sim engine served by uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(config, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "sim engine did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class _EvictReceiver(BaseHTTPRequestHandler):
    received: list[tuple[str | None, dict[str, Any]]]
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((self.headers.get("authorization"), json.loads(body)))
        self.send_response(self.status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def evict_receiver() -> Iterator[tuple[str, list[tuple[str | None, dict[str, Any]]]]]:
    handler = type("Receiver", (_EvictReceiver,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/evict", handler.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with running_sim(SimConfig(prefill_us_per_token=1.0)) as url:
        yield url


@pytest.fixture
def client(sim_url: str) -> Iterator[OpenAI]:
    httpx.post(f"{sim_url}/sim/reset")
    with OpenAI(base_url=f"{sim_url}/v1", api_key="unused", max_retries=0, timeout=10) as sdk:
        yield sdk


def stats(url: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{url}/sim/stats").json()
    return result


DOC = " ".join(f"Paragraph {i} talks about topic {i % 7} in some detail." for i in range(60))


def test_health_and_models(client: OpenAI, sim_url: str) -> None:
    assert httpx.get(f"{sim_url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["sim"]


def test_chat_completion_shape_and_request_id(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="sim",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=7,
        extra_headers={"X-Request-Id": "hdr-1"},
    )
    assert raw.headers["x-request-id"] == "hdr-1"
    reply = raw.parse()
    assert reply.id == "chatcmpl-hdr-1"
    assert reply.object == "chat.completion"
    assert reply.model == "sim"
    [choice] = reply.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 7
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    timings = (reply.model_extra or {})["timings"]
    assert timings["prompt_n"] == reply.usage.prompt_tokens and timings["cache_n"] == 0


def test_body_rid_wins_and_default_max_tokens_is_16(client: OpenAI) -> None:
    reply = client.completions.create(model="sim", prompt="Once upon a time", extra_body={"rid": "sg-7"})
    assert reply.id == "cmpl-sg-7"
    assert reply.object == "text_completion"
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_output_is_deterministic(client: OpenAI) -> None:
    texts = {client.completions.create(model="sim", prompt=DOC, max_tokens=5).choices[0].text for _ in range(3)}
    assert len(texts) == 1


def test_cached_tokens_grow_on_a_repeated_prefix(client: OpenAI) -> None:
    def ask(question: str) -> Any:
        messages = [{"role": "system", "content": DOC}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="sim", messages=messages, max_tokens=4).usage

    first, second, again = ask("What is topic 3?"), ask("Summarise topic 5."), ask("Summarise topic 5.")
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens > 500
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    assert again.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1  # one token is always computed
    cache = stats(str(client.base_url).removesuffix("/v1/"))["cache"]
    assert cache["hit_tokens"] > 0 and cache["size_tokens"] > 0


def test_multi_turn_hits_the_cached_answer(client: OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": DOC}]
    turn1 = client.chat.completions.create(model="sim", messages=messages, max_tokens=12)
    messages += [{"role": "assistant", "content": turn1.choices[0].message.content}, {"role": "user", "content": "ok"}]
    turn2 = client.chat.completions.create(model="sim", messages=messages, max_tokens=3)
    assert turn1.usage is not None and turn2.usage is not None
    assert turn2.usage.prompt_tokens_details is not None
    assert turn2.usage.prompt_tokens_details.cached_tokens == turn1.usage.prompt_tokens + 12


def test_n_and_batched_prompts(client: OpenAI) -> None:
    chat = client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) == 3
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    batch = client.completions.create(model="sim", prompt=["alpha beta", "gamma delta"], n=2, max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    tokens = client.completions.create(model="sim", prompt=[[16, 17, 18], [19, 20]], max_tokens=1)
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 5 and len(tokens.choices) == 2
    single = client.completions.create(model="sim", prompt=[16, 17, 18, 19], max_tokens=1)
    assert single.usage is not None and single.usage.prompt_tokens == 4


def test_streamed_chat_with_usage(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = client.chat.completions.create(model="sim", messages=messages, max_tokens=6).choices[0].message.content
    stream = client.chat.completions.create(
        model="sim", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == last.usage.prompt_tokens - 1
    assert all(c.usage is None for c in body)


def test_streamed_completion_without_usage(client: OpenAI) -> None:
    chunks = list(client.completions.create(model="sim", prompt="abc", max_tokens=3, stream=True, n=2))
    assert {c.object for c in chunks} == {"text_completion"}
    assert all(c.choices for c in chunks)
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length") == [0, 1]
    assert sum(1 for c in chunks if c.choices[0].text) == 6


def test_sse_framing(sim_url: str) -> None:
    body = {"model": "sim", "prompt": "x y z", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{sim_url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_errors_use_the_openai_envelope(client: OpenAI, sim_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="sim", messages=[])
    assert excinfo.value.status_code == 400
    bad_json = httpx.post(f"{sim_url}/v1/chat/completions", content=b"{nope")
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    wrong_type = httpx.post(f"{sim_url}/v1/completions", json={"prompt": "x", "max_tokens": "ten"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "max_tokens"
    missing = httpx.post(f"{sim_url}/v1/completions", json={"model": "sim"})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{sim_url}/v1/nothing").status_code == 404
    assert httpx.get(f"{sim_url}/v1/completions").status_code == 405


def test_unknown_fields_are_tolerated_and_requests_recorded(client: OpenAI, sim_url: str) -> None:
    client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}], "vendor": 1}],
        max_tokens=1,
        extra_body={"vendor_field": {"nested": [1, 2]}, "cache_salt": "s"},
        extra_headers={"X-Custom": "yes"},
    )
    [record] = httpx.get(f"{sim_url}/sim/requests").json()
    assert record["method"] == "POST" and record["path"] == "/v1/chat/completions"
    assert record["body"]["vendor_field"] == {"nested": [1, 2]}
    assert record["headers"]["x-custom"] == "yes"
    httpx.post(f"{sim_url}/sim/reset")
    assert httpx.get(f"{sim_url}/sim/requests").json() == []
    assert stats(sim_url)["requests_total"] == 0


def test_fault_knobs(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.completions.create(model="sim", prompt="x", extra_headers={"X-Sim-Fault": "503"})
    assert excinfo.value.status_code == 503
    stream = client.completions.create(
        model="sim", prompt="x", max_tokens=5, stream=True, extra_headers={"X-Sim-Fault": "midstream"}
    )
    with pytest.raises(openai.APIError, match="simulated fault"):
        list(stream)


def test_first_byte_arrives_while_the_engine_is_still_generating() -> None:
    with (
        running_sim(SimConfig(decode_us_per_token=2000)) as url,
        OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk,
    ):
        start = time.monotonic()
        stream = sdk.completions.create(model="sim", prompt="go", max_tokens=150, stream=True)
        arrivals = [time.monotonic() - start for _ in stream]
        assert len(arrivals) == 151
        assert arrivals[-1] >= 0.25  # 150 tokens x 2 ms
        assert arrivals[1] < arrivals[-1] / 2


def test_client_disconnect_mid_stream_is_counted_as_cancelled() -> None:
    with (
        running_sim(SimConfig(decode_us_per_token=2000)) as url,
        OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk,
    ):
        stream = sdk.completions.create(model="sim", prompt="a long story", max_tokens=5000, stream=True)
        received = [next(iter(stream)) for _ in range(3)]
        assert len(received) == 3
        assert stats(url)["in_flight"] == 1
        stream.close()
        wait_for(lambda: stats(url)["cancelled"] == 1)
        wait_for(lambda: stats(url)["in_flight"] == 0)
        assert stats(url)["completion_tokens"] == 0


def test_evictions_are_posted_with_the_request_ids() -> None:
    with evict_receiver() as (evict_url, received):
        config = SimConfig(capacity_tokens=300, evict_url=evict_url, evict_token="s3cret", evict_flush_ms=2)
        with running_sim(config) as url, OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
            sent = [f"ev-{i}" for i in range(8)]
            for i, rid in enumerate(sent):
                prompt = f"request {i}: " + " ".join(f"w{i}x{j}" for j in range(90))
                sdk.completions.create(model="sim", prompt=prompt, max_tokens=4, extra_body={"rid": rid})
            wait_for(lambda: any("ev-0" in body["request_ids"] for _, body in received))
            evicted = [rid for _, body in received for rid in body["request_ids"]]
            assert set(evicted) <= set(sent[:-1])  # the newest request is still cached
            assert len(evicted) == len(set(evicted))
            assert {auth for auth, _ in received} == {"Bearer s3cret"}
            current = stats(url)
            assert current["cache"]["size_tokens"] <= 300
            wait_for(lambda: stats(url)["evictions"]["sent"] == current["cache"]["evicted_requests"])
            assert stats(url)["evictions"]["dropped"] == 0


def test_failing_eviction_endpoint_is_retried_not_fatal() -> None:
    """The hook's own sender: while the gateway is unreachable ids are kept and retried with backoff, not dropped."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/evict"
    config = SimConfig(capacity_tokens=50, evict_url=dead_url, evict_flush_ms=1)
    with running_sim(config) as url, OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk:
        for i in range(3):
            sdk.completions.create(model="sim", prompt=" ".join(f"t{i}_{j}" for j in range(40)), max_tokens=2)
        wait_for(lambda: stats(url)["evictions"]["failed_posts"] >= 3)
        evictions = stats(url)["evictions"]
        assert evictions["accepted"] >= 1 and evictions["sent"] == 0 and evictions["dropped"] == 0
        assert sdk.completions.create(model="sim", prompt="still alive", max_tokens=1).choices


def test_cli_serves_until_terminated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--port", str(port), "--model", "tiny", "--capacity-tokens", "1000", "--prefill-us", "0"]
    process = subprocess.Popen([sys.executable, "-m", "engines.sim", *args, "--log-level", "warning"])
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, "sim engine exited"
                return False

        wait_for(healthy, timeout=20)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["data"][0]["id"] == "tiny"
        assert httpx.get(f"http://127.0.0.1:{port}/sim/stats").json()["cache"]["capacity_tokens"] == 1000
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the parent sees how it ended.
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)


def test_prefill_is_serial_and_caches_only_once_computed() -> None:
    prompt = " ".join(f"word{i}" for i in range(100))  # 100 tokens x 2 ms = 200 ms of prefill
    with (
        running_sim(SimConfig(prefill_us_per_token=2000)) as url,
        OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as sdk,
    ):
        results: list[Any] = []

        def ask() -> None:
            results.append(sdk.completions.create(model="sim", prompt=prompt, max_tokens=1).usage)

        start = time.monotonic()
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        elapsed = time.monotonic() - start
        assert [u.prompt_tokens_details.cached_tokens for u in results] == [0, 0]
        assert elapsed >= 0.4  # the second prefill queued behind the first
        again = sdk.completions.create(model="sim", prompt=prompt, max_tokens=1)
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        assert again.usage.prompt_tokens_details.cached_tokens == 99
        assert (again.model_extra or {})["timings"]["prompt_ms"] == 2.0
