"""llama.cpp slot discovery runs supervised: an unexpected answer that breaks it costs a restart, not the gateway."""

from __future__ import annotations

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
