"""The exchange's phases as the client and the index see them: the engine accepts a request when a 2xx answer head
arrives (what it was sent is committed to the live index before anything is relayed), and only then."""

from __future__ import annotations

import httpx
import pytest
import respx

from tests.integration.conftest import AppFactory
from tests.integration.test_intercept_proxy import chat, xml_docs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("answer", "status", "committed"),
    [
        (httpx.Response(200, content=b"[1]", headers={"content-type": "application/json"}), 502, 1),
        (httpx.Response(500, json={"error": {"message": "boom"}}), 500, 0),
        (httpx.Response(400, json={"error": {"message": "bad"}}), 400, 0),
    ],
    ids=["2xx head, invalid body", "5xx", "4xx"],
)
async def test_the_engine_accepts_on_a_2xx_head(
    gateway: AppFactory, upstream: respx.Router, answer: httpx.Response, status: int, committed: int
) -> None:
    upstream.post("/v1/chat/completions").mock(return_value=answer)
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", content=chat(xml_docs(["alpha", "beta", "gamma"])))
        stats = (await client.get("/stats")).json()
    assert response.status_code == status
    # a 2xx head commits even when its body then fails (the engine has the prompt); an error head never does
    assert stats["index_stats"]["num_requests"] == committed
