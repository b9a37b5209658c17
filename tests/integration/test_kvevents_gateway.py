"""KV events from a real ZMQ publisher keep the gateway's index in step with the engine."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import respx
import zmq
import zmq.asyncio

from tests.e2e.servers import free_port
from tests.integration.conftest import AppFactory

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

OK = {"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
DOCS = "\n".join(f'<document id="{i}">' + f"text of document {i} " * 12 + "</document>" for i in range(3))
BODY = {"model": "m", "messages": [{"role": "system", "content": f"<documents>\n{DOCS}\n</documents>"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Publisher:
    """An engine-side publisher: ``[topic, seq, msgpack EventBatch]``, tagged-map events."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.seq = 0

    async def publish(self, *events: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode([time.time(), list(events), None])
        await self.socket.send_multipart([b"kv", self.seq.to_bytes(8, "big"), payload])
        self.seq += 1


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await anyio.sleep(0.02)


async def test_block_removed_releases_the_request(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    port = free_port()
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.PUB)
    socket.bind(f"tcp://127.0.0.1:{port}")
    publisher = Publisher(socket)
    try:
        async with gateway(
            engine="vllm", kv_events_endpoint=(f"tcp://127.0.0.1:{port}",), kv_events_topic="kv"
        ) as client:
            subscriber = client.app.state.kv_subscribers[0]

            async def joined() -> bool:  # ZMQ's slow joiner: publish until the subscriber has seen a batch
                await publisher.publish()
                return subscriber.last_seq is not None

            await _until(joined)
            response = await client.post("/v1/chat/completions", json=BODY)
            rid = response.headers["x-request-id"]
            sent = json.loads(route.calls.last.request.content)
            assert sent["session_id"] == rid
            assert sent["vllm_xargs"] == {"kv_cache_report_mode": "full"}

            stored = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": [1, 2],
                      "block_size": 16, "lora_id": None, "medium": "GPU", "session_id": rid}  # fmt: skip
            await publisher.publish(stored)
            await publisher.publish({"type": "BlockRemoved", "block_hashes": [99], "medium": "GPU"})

            async def requests() -> list[str]:
                ids: list[str] = (await client.get("/requests")).json()["request_ids"]
                return ids

            await _until(lambda: _seen(client.app.state.kv_tracker, rid))
            assert await requests() == [rid]  # an unrelated removal releases nothing
            await publisher.publish({"type": "BlockRemoved", "block_hashes": [11, 12], "medium": "GPU"})

            async def released() -> bool:
                return await requests() == []

            await _until(released)
    finally:
        socket.close(linger=0)
        context.term()


async def _seen(tracker: Any, rid: str) -> bool:
    return bool(tracker.is_cached(rid))


async def test_client_session_id_is_kept(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    async with gateway(engine="sglang", kv_events_endpoint=(f"tcp://127.0.0.1:{free_port()}",)) as client:
        await client.post("/v1/chat/completions", json={**BODY, "session_id": "mine"})
    sent = json.loads(route.calls.last.request.content)
    assert sent["session_id"] == "mine"
    assert "vllm_xargs" not in sent


async def test_a_failing_subscriber_is_restarted_and_reported_in_metrics(
    gateway: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines.kvevents.subscriber import KVEventSubscriber

    original = KVEventSubscriber._on_frames
    failures = []

    async def fails_once(self: KVEventSubscriber, frames: list[bytes]) -> None:
        if not failures:
            failures.append(frames)
            raise RuntimeError("a bug in the subscriber")
        await original(self, frames)

    monkeypatch.setattr(KVEventSubscriber, "_on_frames", fails_once)
    port = free_port()
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.PUB)
    socket.bind(f"tcp://127.0.0.1:{port}")
    publisher = Publisher(socket)
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        async with gateway(engine="vllm", kv_events_endpoint=(endpoint,), kv_events_topic="kv") as client:
            subscriber = client.app.state.kv_subscribers[0]

            async def applied() -> bool:
                await publisher.publish({"type": "BlockStored", "block_hashes": [publisher.seq], "parent_block_hash": None,
                                         "token_ids": [1], "block_size": 16, "lora_id": None, "medium": "GPU"})  # fmt: skip
                return subscriber.last_seq is not None

            await _until(applied, timeout=10)
            assert failures, "the injected failure never happened"
            metrics = (await client.get("/metrics")).text
            assert f'prefixgate_background_restarts_total{{task="kv-events {endpoint}"}} 1.0' in metrics
            assert f'prefixgate_background_running{{task="kv-events {endpoint}"}} 1.0' in metrics
            # a batch published while the subscriber restarted may still land after the scrape: at most that many
            (line,) = [
                row for row in metrics.splitlines() if row.startswith('prefixgate_kv_events_total{kind="batches"}')
            ]
            scraped = float(line.rsplit(" ", 1)[1])
            assert 1 <= scraped <= client.app.state.kv_tracker.counters.batches
    finally:
        socket.close(linger=0)
        context.term()
