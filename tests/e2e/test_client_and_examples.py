"""``gateway.client.api`` and the ``examples/`` scripts against a live gateway and simulated engine, over real sockets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.sim import SimConfig, create_sim_app
from gateway.app import create_app
from gateway.client.api import AsyncIndexClient, IndexAPIError, IndexClient, IndexUnavailable
from gateway.settings import load_settings
from tests.e2e.servers import free_port, serve_in_thread

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["rag_chat.py", "batch_reorder.py", "agent_tools.py", "claude_documents.py"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """A gateway in front of the simulated engine, which reports its evictions to the gateway's ``/evict``."""
    gateway_port = free_port()
    with serve_in_thread(create_sim_app(SimConfig(evict_url=f"http://127.0.0.1:{gateway_port}/evict"))) as engine:
        app = create_app(load_settings(environ={}, upstream=engine, port=gateway_port))
        with serve_in_thread(app, port=gateway_port) as base:
            yield base


@pytest.fixture
def index_only(request: pytest.FixtureRequest) -> Iterator[str]:
    """A gateway without an engine (the index API does not need one); settings from the test's parameters."""
    settings: dict[str, Any] = getattr(request, "param", {})
    app = create_app(load_settings(environ={}, upstream="http://127.0.0.1:9", **settings))
    with serve_in_thread(app) as base:
        yield base


def run_example(name: str, base_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / name), "--base-url", base_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def example_output(name: str, base_url: str) -> str:
    """Run an example that must succeed; its stdout."""
    done = run_example(name, base_url)
    assert done.returncode == 0, done.stderr
    return done.stdout


def result_headers(out: str) -> list[dict[str, Any]]:
    """The ``X-Prefixgate-Result`` headers an example printed, in order."""
    return [json.loads(line) for line in re.findall(r"X-Prefixgate-Result: (\{.*\})", out)]


def _check_contract(contexts: list[list[Any]], raw: dict[str, Any]) -> None:
    reordered, order, ids = raw["reordered_contexts"], raw["original_indices"], raw["request_ids"]
    assert sorted(order) == list(range(len(contexts)))
    for position, index in enumerate(order):
        assert sorted(map(repr, reordered[position])) == sorted(map(repr, contexts[index]))
    assert len(ids) == len(set(ids)) == len(contexts)
    assert raw["scheduled_request_ids"] == [ids[i] for i in order]


# ---- examples ----------------------------------------------------------------------------------------------------


def test_rag_chat_example(gateway: str) -> None:
    out = example_output("rag_chat.py", gateway)
    headers = result_headers(out)
    assert len(headers) == 4
    assert all(header["groups"] == 1 and header["blocks"] >= 3 for header in headers)
    cached = [int(n) for n in re.findall(r"cached_tokens: (\d+) of \d+ prompt tokens", out)]
    assert len(cached) == 4
    # questions 2-4 share documents with earlier ones: most of each prompt comes from the cache
    assert all(n > 100 for n in cached[1:]), out
    assert "summary: 4 questions" in out


def test_batch_reorder_example(gateway: str) -> None:
    out = example_output("batch_reorder.py", gateway)
    order = json.loads(re.search(r"execution order \(input positions\): (\[.*\])", out).group(1))  # type: ignore[union-attr]
    assert sorted(order) == list(range(6))
    ran = re.findall(r"ran #(\d+): input (\d+), docs \[.*\], id (req-[0-9a-f]+)", out)
    assert [int(position) for position, _, _ in ran] == list(range(6))
    assert [int(index) for _, index, _ in ran] == order
    assert len({rid for _, _, rid in ran}) == 6
    results = re.findall(r"^  \[(\d)\] .* ran #(\d) cached_tokens=(\d+)/(\d+)", out, flags=re.MULTILINE)
    assert [int(index) for index, *_ in results] == list(range(6))  # back in input order
    assert sum(int(cached) for *_, cached, _ in results) > 0
    assert "summary: 6 requests" in out


def test_agent_tools_example(gateway: str) -> None:
    out = example_output("agent_tools.py", gateway)
    headers = result_headers(out)
    assert len(headers) == 2
    assert headers[0]["blocks"] == 4
    assert headers[1]["memo_hits"] > 0
    assert "turn 2 reused turn 1's prompt: yes" in out


def test_claude_documents_example(gateway: str) -> None:
    out = example_output("claude_documents.py", gateway)
    headers = result_headers(out)
    assert len(headers) == 3 and all(header["groups"] == 1 for header in headers)
    assert any(header["reordered"] for header in headers[1:])
    cited = re.findall(r"citation: document_index (\d) -> '([a-z-]+)'", out)
    assert len(cited) == 3  # the simulated engine cites the first document it is sent; each checked by the script
    cached = [int(n) for n in re.findall(r"cache_read_input_tokens: (\d+) of", out)]
    assert cached[0] < 20 and all(n > 100 for n in cached[1:]), out  # the first shares only the template
    assert "summary: 3 questions" in out


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_exit_non_zero_when_the_gateway_is_down(name: str) -> None:
    done = run_example(name, f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "error:" in done.stderr


# ---- the sync client ---------------------------------------------------------------------------------------------


def test_sync_client_against_live_gateway(gateway: str) -> None:
    contexts = [["alpha", "beta", "gamma"], ["gamma", "beta", "delta"], ["alpha", "beta"], ["beta", "alpha", "gamma"]]
    with IndexClient(gateway) as client:
        assert client.is_ready()
        assert client.health()["mode"] == "live"
        reordered, order = client.reorder(contexts)
        _check_contract(contexts, {**client.reorder_raw(contexts), "reordered_contexts": reordered})  # fresh ids
        assert sorted(order) == [0, 1, 2, 3]
        for position, index in enumerate(order):
            assert sorted(reordered[position]) == sorted(contexts[index])

        raw = client.reorder_raw([[1, 2, 3], [3, 2, 4], [1, 2, 3]], deduplicate=True)
        _check_contract([[1, 2, 3], [3, 2, 4], [1, 2, 3]], raw)
        assert raw["mode"] == "incremental"
        assert raw["deduplication"]["enabled"] is True
        live = set(client.get_requests()["request_ids"])
        assert set(raw["request_ids"]) <= live

        evicted = client.evict([f"chatcmpl-{raw['request_ids'][0]}", "req-unknown"])
        assert evicted["removed_count"] == 1
        assert evicted["not_found"] == ["req-unknown"]
        assert raw["request_ids"][0] not in client.get_requests()["request_ids"]

        turn2 = client.deduplicate([[2, 3, 5]], parent_request_ids=[raw["request_ids"][1]])
        assert turn2["results"][0]["overlapping_docs"] == [2, 3]
        assert turn2["results"][0]["new_docs"] == [5]
        assert client.stats()["index_stats"]["num_requests"] == client.get_stats()["index_stats"]["num_requests"]


def test_sync_client_typed_error_on_bad_request(gateway: str) -> None:
    with IndexClient(gateway) as client, pytest.raises(IndexAPIError) as caught:
        client.reorder_raw([[1, "a"]])  # type: ignore[arg-type]
    error = caught.value
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert error.param == "contexts[0][1]"
    assert error.code == "invalid_contexts"


def test_sync_client_unavailable_on_closed_port() -> None:
    with IndexClient(f"http://127.0.0.1:{free_port()}", timeout=5.0) as client:
        with pytest.raises(IndexUnavailable) as caught:
            client.evict(["req-1"])
        assert caught.value.timed_out is False
        assert client.is_ready() is False


@pytest.mark.parametrize("index_only", [{"stateless": True}], indirect=True)
def test_stateless_gateway_evict_is_200(index_only: str) -> None:
    with IndexClient(index_only) as client:
        assert client.health()["mode"] == "stateless"
        assert client.evict(["req-1"])["removed_count"] == 0
        assert client.reorder_raw([[1, 2], [2, 1]])["mode"] == "stateless"


@pytest.mark.parametrize("index_only", [{"admin_token": "s3cret"}], indirect=True)
def test_admin_token(index_only: str) -> None:
    with IndexClient(index_only) as anonymous, pytest.raises(IndexAPIError) as caught:
        anonymous.reset()
    assert (caught.value.status, caught.value.type) == (401, "authentication_error")
    with IndexClient(index_only, admin_token="s3cret") as admin:
        assert admin.reset()["status"] == "success"
        assert admin.reorder([[1, 2]])[1] == [0]


# ---- the async client --------------------------------------------------------------------------------------------


async def test_async_client_against_live_gateway(gateway: str) -> None:
    contexts = [[10, 11, 12], [12, 11, 13], [10, 11]]
    async with AsyncIndexClient(gateway) as client:
        assert await client.is_ready()
        reordered, order = await client.reorder(contexts)
        assert sorted(order) == [0, 1, 2]
        for position, index in enumerate(order):
            assert sorted(reordered[position]) == sorted(contexts[index])
        raw = await client.reorder_raw(contexts, deduplicate=True)
        _check_contract(contexts, raw)
        evicted = await client.evict(raw["request_ids"][:2])
        assert evicted["removed_count"] == 2
        turn2 = await client.deduplicate([[11, 12, 14]], [raw["request_ids"][2]])
        assert turn2["results"][0]["overlapping_docs"] == [11]
        with pytest.raises(IndexAPIError) as caught:
            await client.deduplicate([[1]], [None, None])
        assert (caught.value.status, caught.value.param) == (400, "parent_request_ids")
        assert "index_stats" in await client.get_stats()


async def test_async_client_unavailable_on_closed_port() -> None:
    async with AsyncIndexClient(f"http://127.0.0.1:{free_port()}", timeout=5.0) as client:
        with pytest.raises(IndexUnavailable):
            await client.reorder([[1, 2]])
        assert await client.is_ready() is False
