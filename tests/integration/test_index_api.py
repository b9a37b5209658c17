"""The ContextPilot-compatible index API, in-process: contracts, modes, bad input, admin token."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


CONTEXTS = [[1, 2, 3, 9], [3, 2, 1, 7], [1, 2, 3, 9], [5, 6], [2, 1, 8]]


def _check_contract(contexts: list[list[Any]], body: dict[str, Any]) -> None:
    reordered, order, ids = body["reordered_contexts"], body["original_indices"], body["request_ids"]
    assert sorted(order) == list(range(len(contexts)))
    for position, index in enumerate(order):
        assert sorted(map(repr, reordered[position])) == sorted(map(repr, contexts[index]))
    assert len(ids) == len(contexts) == len(set(ids))
    assert all(isinstance(i, str) and i for i in ids)
    assert body["scheduled_request_ids"] == [ids[i] for i in order]


async def test_stateless_schedule_is_a_permutation(gateway: AppFactory) -> None:
    async with gateway() as client:
        response = await client.post("/schedule", json={"contexts": CONTEXTS})
        stats = await client.get("/stats")
    body = response.json()
    assert response.status_code == 200
    assert body["mode"] == "stateless"
    assert body["input_type"] == "integer"
    _check_contract(CONTEXTS, body)
    # shared blocks come first: the three contexts holding {1, 2, 3} start with the same block
    firsts = [ctx[0] for ctx in body["reordered_contexts"] if {1, 2} <= set(ctx)]
    assert len(set(firsts)) == 1
    assert stats.json()["index_stats"]["num_requests"] == 0


async def test_batch_search_setting_reaches_the_batch_plan(gateway: AppFactory) -> None:
    """``--batch-search``: two pairs that share a block each, found only by moving contexts together."""
    from tests.unit.test_scheduler_search import TWO_PAIRS

    shared: dict[int, int] = {}
    for search in (0, 50):
        async with gateway(batch_search=search) as client:
            body = (await client.post("/schedule", json={"contexts": TWO_PAIRS})).json()
        _check_contract(TWO_PAIRS, body)
        runs = body["reordered_contexts"]
        shared[search] = sum(
            next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            for a, b in pairwise(runs)
        )
    assert shared == {0: 1, 50: 2}


async def test_stateful_initial_then_incremental(gateway: AppFactory) -> None:
    async with gateway() as client:
        first = (await client.post("/reorder", json={"contexts": CONTEXTS})).json()
        second = (await client.post("/reorder", json={"contexts": [[9, 3, 1, 2, 4]]})).json()
        stats = (await client.get("/stats")).json()
        requests = (await client.get("/requests")).json()
    assert first["mode"] == "initial"
    _check_contract(CONTEXTS, first)
    assert second["mode"] == "incremental"
    # the live index already holds a path over {1, 2, 3, 9}: the new context takes it first
    assert second["reordered_contexts"][0][:4] == first["reordered_contexts"][first["original_indices"].index(0)]
    assert second["stats"]["predicted_cached_blocks"] == 4
    assert stats["index_stats"]["num_requests"] == len(CONTEXTS) + 1
    assert set(requests["request_ids"]) == set(first["request_ids"]) | set(second["request_ids"])


async def test_conversation_turns_run_in_input_order(gateway: AppFactory) -> None:
    # turn 2 ([1, 2]) alone would run first: it is a prefix of the path the others share
    contexts = [[1, 2, 3, 9], [1, 2], [1, 2, 3, 8]]
    async with gateway() as client:
        free = (await client.post("/schedule", json={"contexts": contexts})).json()
        by_id = (
            await client.post("/schedule", json={"contexts": contexts, "conversation_ids": ["c", "c", None]})
        ).json()
        by_parent = await client.post("/reorder", json={"contexts": contexts, "parent_request_ids": ["p", "p", None]})
    assert free["original_indices"][0] == 1
    for body in (by_id, by_parent.json()):
        _check_contract(contexts, body)
        assert body["original_indices"].index(0) < body["original_indices"].index(1)


async def test_stateful_reorder_orders_uncached_blocks_by_live_popularity(gateway: AppFactory) -> None:
    async with gateway() as client:
        first = (await client.post("/reorder", json={"contexts": [[7, 3, 100 + n] for n in range(5)]})).json()
        await client.post("/evict", json={"request_ids": first["request_ids"]})  # nothing cached any more
        second = (await client.post("/reorder", json={"contexts": [[1, 3, 5, 7]]})).json()
        stateless = (await client.post("/schedule", json={"contexts": [[1, 3, 5, 7]]})).json()
    assert second["stats"]["predicted_cached_blocks"] == 0
    assert second["reordered_contexts"] == [[3, 7, 1, 5]]  # 3 and 7 were in five live requests
    assert stateless["reordered_contexts"] == [[1, 3, 5, 7]]


async def test_string_contexts_and_64_bit_ids(gateway: AppFactory) -> None:
    strings = [["doc a", "doc b", "doc c"], ["doc c", "doc b"], ["doc a", "doc a"]]
    big = [[2**64 - 1, -(2**63), 0], [0, 2**64 - 1]]
    async with gateway() as client:
        s = (await client.post("/reorder", json={"contexts": strings})).json()
        b = (await client.post("/reorder", json={"contexts": big})).json()
    assert s["input_type"] == "string"
    _check_contract(strings, s)
    _check_contract(big, b)


async def test_evict_accepts_engine_mangled_ids_and_is_idempotent(gateway: AppFactory) -> None:
    async with gateway() as client:
        body = (await client.post("/reorder", json={"contexts": CONTEXTS})).json()
        rid0, rid1 = body["request_ids"][0], body["request_ids"][1]
        mangled = [f"chatcmpl-{rid0}", f"cmpl-{rid1}-0-1a2b3c4d", "HEALTH_CHECK_1", "req-unknown"]
        first = (await client.post("/evict", json={"request_ids": mangled})).json()
        again = (await client.post("/evict", json={"request_ids": mangled})).json()
    assert first["status"] == "success"
    assert first["evicted_request_ids"] == [rid0, rid1]
    assert first["removed_count"] == 2
    assert first["not_found"] == ["req-unknown"]
    assert first["normalized_request_ids"] == [rid0, rid1, "req-unknown"]
    assert first["requests_remaining"] == len(CONTEXTS) - 2
    assert again["removed_count"] == 0


async def test_stateless_server_evict_is_200(gateway: AppFactory) -> None:
    async with gateway(stateless=True) as client:
        reorder = (await client.post("/reorder", json={"contexts": CONTEXTS})).json()
        evict = await client.post("/evict", json={"request_ids": ["req-x"]})
        health = (await client.get("/health")).json()
    assert reorder["mode"] == "stateless"
    assert evict.status_code == 200 and evict.json()["removed_count"] == 0
    assert health["mode"] == "stateless"


async def test_fresh_server_health_is_200(gateway: AppFactory) -> None:
    async with gateway() as client:
        health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
    assert health.json()["mode"] == "live"


async def test_deduplicate_multi_turn(gateway: AppFactory) -> None:
    async with gateway() as client:
        turn1 = (await client.post("/reorder", json={"contexts": [[1, 2, 3]], "deduplicate": True})).json()
        rid = turn1["request_ids"][0]
        turn2 = (
            await client.post(
                "/deduplicate",
                json={"contexts": [[2, 3, 4]], "parent_request_ids": [rid], "hint_template": "see doc {doc_id}"},
            )
        ).json()
        mismatched = await client.post("/deduplicate", json={"contexts": [[1], [2]], "parent_request_ids": [None]})
    assert turn1["deduplication"]["results"][0]["is_new_conversation"] is True
    result = turn2["results"][0]
    assert result["overlapping_docs"] == [2, 3]
    assert result["new_docs"] == [4]
    assert result["reference_hints"] == ["see doc 2", "see doc 3"]
    assert result["is_new_conversation"] is False
    assert mismatched.status_code == 400


async def test_reset_clears(gateway: AppFactory) -> None:
    async with gateway() as client:
        await client.post("/reorder", json={"contexts": CONTEXTS})
        reset = await client.post("/reset")
        stats = (await client.get("/stats")).json()
        again = (await client.post("/reorder", json={"contexts": CONTEXTS})).json()
    assert reset.json()["status"] == "success"
    assert stats["index_stats"]["num_requests"] == 0
    assert again["mode"] == "initial"


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"contexts": "abc"}, 400, "contexts"),
        ({"contexts": [[1, "a"]]}, 400, "contexts[0][1]"),
        ({"contexts": [[1], ["a"]]}, 400, "contexts[1][0]"),
        ({"contexts": [[1.5]]}, 400, "contexts[0][0]"),
        ({"contexts": [[True]]}, 400, "contexts[0][0]"),
        ({"contexts": [[[1]]]}, 400, "contexts[0][0]"),
        ({"contexts": [[1]], "parent_request_ids": [None, None]}, 400, "parent_request_ids"),
        ({"contexts": [[1]], "conversation_ids": ["a", "b"]}, 400, "conversation_ids"),
        ({"contexts": [[1]], "linkage_method": "bogus"}, 400, "linkage_method"),
        ({"contexts": [[1]], "alpha": "x"}, 400, "alpha"),
        ({}, 400, None),
    ],
)
async def test_bad_reorder_input(gateway: AppFactory, payload: dict[str, Any], status: int, param: str | None) -> None:
    async with gateway() as client:
        response = await client.post("/reorder", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def test_limits_give_413(gateway: AppFactory) -> None:
    async with gateway(reorder_max_contexts=2, reorder_max_blocks=3) as client:
        many = await client.post("/reorder", json={"contexts": [[1], [2], [3]]})
        long = await client.post("/reorder", json={"contexts": [[1, 2, 3, 4]]})
    assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_contexts"
    assert long.status_code == 413 and long.json()["error"]["param"] == "contexts[0]"


async def test_admin_token_guards_state_changes(gateway: AppFactory) -> None:
    auth = {"authorization": "Bearer adm1n"}
    async with gateway(admin_token="adm1n") as client:
        assert (await client.post("/reorder", json={"contexts": CONTEXTS})).status_code == 401
        assert (await client.post("/evict", json={"request_ids": []})).status_code == 401
        assert (await client.post("/reset")).status_code == 401
        assert (
            await client.post("/evict", json={"request_ids": []}, headers={"authorization": "Bearer x"})
        ).status_code == 401
        # with a token configured, read-only and stateless routes need it too (or a client key)
        assert (await client.post("/schedule", json={"contexts": CONTEXTS})).status_code == 401
        assert (await client.get("/stats")).status_code == 401
        assert (await client.post("/schedule", json={"contexts": CONTEXTS}, headers=auth)).status_code == 200
        assert (await client.get("/stats", headers=auth)).status_code == 200
        assert (await client.post("/reorder", json={"contexts": CONTEXTS}, headers=auth)).status_code == 200
        assert (await client.post("/evict", json={"request_ids": []}, headers=auth)).status_code == 200


async def test_openapi_schema_lists_the_index_api(gateway: AppFactory) -> None:
    async with gateway() as client:
        schema = (await client.get("/schema/openapi.json")).json()
    for path in ("/reorder", "/evict", "/deduplicate", "/reset", "/stats", "/health", "/build", "/schedule"):
        assert path in schema["paths"]


async def test_ids_from_reorder_are_honoured_by_the_proxy(gateway: AppFactory, upstream: Any) -> None:
    import httpx

    route = upstream.post("/v1/completions").mock(return_value=httpx.Response(200, json={"choices": []}))
    async with gateway() as client:
        issued = (await client.post("/reorder", json={"contexts": [[1, 2], [2, 3]]})).json()["request_ids"]
        batch = await client.post("/v1/completions", json={"prompt": "x"}, headers={"x-request-id": issued[0]})
        forged = await client.post("/v1/completions", json={"prompt": "x"}, headers={"x-request-id": "req-not-issued"})
        bad = await client.get("/nope", headers={"x-request-id": "bad id\r\nx"})
    # the batch flow: the engine files the prompt under the id /reorder returned, so evictions find it
    assert batch.headers["x-request-id"] == issued[0]
    assert route.calls[0].request.headers["x-request-id"] == issued[0]
    # an id that merely looks minted is namespaced: it can never stand for a live index entry
    assert forged.headers["x-request-id"] == "c-req-not-issued"
    assert "x-request-id" not in bad.headers
