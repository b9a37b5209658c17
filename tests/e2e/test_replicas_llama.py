"""Two real llama-servers behind one gateway: routing follows the cache, and the chosen server's slot hits it."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import load_settings
from tests.e2e.llama import StartLlamaServer
from tests.e2e.servers import serve_in_thread
from tests.e2e.test_gateway_llama import rag_chat

pytestmark = [pytest.mark.llama, pytest.mark.timeout(180)]


def _post(base: str, doc_ids: list[int], question: str) -> tuple[str, int, dict[str, int]]:
    response = httpx.post(f"{base}/v1/chat/completions", json=rag_chat(doc_ids, question), timeout=60)
    response.raise_for_status()
    result = response.json()
    header = httpx.Response(200, content=response.headers["x-prefixgate-result"]).json()
    return header["replica"], result["usage"]["prompt_tokens_details"]["cached_tokens"], header


def test_two_llama_servers_routing_follows_the_cache(start_llama_server: StartLlamaServer) -> None:
    servers = [start_llama_server(slots=2, cache_ram=0) for _ in range(2)]
    settings = load_settings(
        environ={}, upstream=[s.url for s in servers], engine="llamacpp", health_interval=1.0,
        llamacpp_prompt_cache=False,  # --cache-ram 0: the slots are each server's whole cache, requests are pinned
    )  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app) as base:
        deadline = time.monotonic() + 15
        while any(r.planner is None or r.planner.slot_count is None for r in app.state.replicas.replicas):
            assert time.monotonic() < deadline, "the gateway did not learn both servers' slot counts"
            time.sleep(0.05)
        home, _, first = _post(base, [0, 1, 2, 3], "what is first")
        away, _, _ = _post(base, [7, 8, 9, 10], "something else")
        assert away != home, "a miss at low load goes to the idle server"
        replica, cached, again = _post(base, [3, 2, 1, 0], "and again")
        assert replica == home and again["predicted_cached_blocks"] == 4 and again["reordered"]
        assert "slot" in again and again["slot"] == first["slot"]
        assert cached > 200, "the llama-server reused the slot's prompt: the reordered prefix matched its cache"
