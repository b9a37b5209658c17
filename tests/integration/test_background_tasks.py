"""llama.cpp slot discovery runs supervised: an unexpected answer that breaks it costs a restart, not the gateway."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
import respx

from tests.integration.conftest import AppFactory

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_slot_discovery_survives_an_error_and_finishes(gateway: AppFactory, upstream: respx.Router) -> None:
    # The first /props answer is JSON of the wrong shape (a list): reading it raises inside discovery.
    upstream.get("/props").mock(
        side_effect=[httpx.Response(200, json=["not", "props"]), httpx.Response(200, json={"total_slots": 3})]
    )
    async with gateway(engine="llamacpp") as client:
        with anyio.fail_after(10):
            while (await client.get("/health")).json()["slots"] is None:
                await anyio.sleep(0.05)
        assert (await client.get("/health")).json()["slots"] == 3
        metrics = (await client.get("/metrics")).text
    assert 'prefixgate_background_restarts_total{task="llamacpp-slots"} 1.0' in metrics
    assert 'prefixgate_background_running{task="llamacpp-slots"} 0.0' in metrics  # done, not dead: /health has slots


async def test_tokenizer_auto_counts_with_the_model_the_engine_names(
    gateway: AppFactory, upstream: respx.Router, tmp_path: Path
) -> None:
    """vLLM started on a model directory names it as ``root`` in /v1/models: on the same host, ``--tokenizer auto``
    counts the prompt with that model's tokenizer.json, and predictions count every text exactly."""
    from tests.unit.test_cache_granularity import _tokenizer_file

    model = tmp_path / "model"
    model.mkdir()
    _tokenizer_file(tmp_path).rename(model / "tokenizer.json")
    upstream.get("/v1/models").mock(
        side_effect=[httpx.ConnectError("engine starting"),
                     httpx.Response(200, json={"object": "list", "data": [{"id": "m", "root": str(model)}]})]
    )  # fmt: skip
    async with gateway(engine="vllm", tokenizer="auto") as client:
        tokens = client.app.state.replicas.replicas[0].planner.tokens
        with anyio.fail_after(10):
            while not tokens.ready:
                await anyio.sleep(0.05)
        assert tokens.source == str(model) and tokens.count("cache engine") > 0


async def test_tokenizer_auto_estimates_when_the_model_is_not_on_this_host(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    models = upstream.get("/v1/models").mock(return_value=httpx.Response(200, json={"data": [{"id": "org/not-here"}]}))
    async with gateway(engine="vllm", tokenizer="auto") as client:
        with anyio.fail_after(10):
            while not models.called or 'task="tokenizer"} 1.0' in (await client.get("/metrics")).text:
                await anyio.sleep(0.05)
        assert not client.app.state.replicas.replicas[0].planner.tokens.ready
        assert (await client.get("/health")).status_code == 200
