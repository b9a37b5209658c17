"""Hostile inputs, in-process: the per-request cost budget, tenant isolation, and connection-specific headers.

The same classes run against a real ``prefixgate serve`` process in ``tests/e2e/test_edge.py``; here each rule is
pinned down exactly (forwarded bytes, result header, metrics, status codes).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import respx

from tests.integration.conftest import AppFactory
from tests.integration.test_security import ok_json, rag_chat

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

ADMIN = {"authorization": "Bearer admin-token"}
ALICE = {"authorization": "Bearer alice-key"}
BOB = {"authorization": "Bearer bob-key"}
TENANTS = {"api_key": ("alice-key", "bob-key"), "admin_token": "admin-token"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def many_styles(styles: int) -> str:
    """Numbered lists in many distinct ``Doc<spaces>N:`` styles, then ordinary text: the issue's stall."""
    head = "".join(f"Doc{' ' * s}1: some text here\nDoc{' ' * s}2: more text here\n" for s in range(1, styles + 1))
    return head + "ordinary words in a line of prose\n" * 20_000


def result(response: httpx.Response) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(response.headers["x-prefixgate-result"])
    return parsed


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------------------------------------- budget


async def test_past_the_budget_the_text_is_forwarded_unchanged_and_counted(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    docs = "\n".join(
        f"<document>Text {i}: " + " ".join(f"w{i}x{j}" for j in range(20)) + "</document>" for i in range(3)
    )
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"<documents>{docs}</documents>"}]})
    async with gateway(intercept_budget_ms=0.000001) as client:
        answer = await client.post("/v1/chat/completions", content=body)
        metrics = (await client.get("/metrics")).text
    assert answer.status_code == 200
    assert result(answer) == {"groups": 0, "blocks": 0, "reordered": False, "predicted_cached_blocks": 0,
                              "predicted_cached_tokens": 0, "memo_hits": 0, "skipped": "budget"}  # fmt: skip
    assert json.loads(route.calls[0].request.content)["messages"] == json.loads(body)["messages"]
    assert metric(metrics, "prefixgate_intercept_skipped_total", 'reason="budget"') == 1


async def test_many_numbering_styles_are_planned_within_the_budget(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    text = many_styles(400)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    # a generous budget: before the fix this text needed minutes; now it is planned completely
    async with gateway(intercept_budget_ms=30_000) as client:
        answer = await client.post("/v1/chat/completions", content=body)
    assert answer.status_code == 200
    assert "skipped" not in result(answer)


@pytest.mark.parametrize("slice_s", [1e9, 1e-9])
async def test_a_request_slow_to_read_is_planned_again_in_a_worker_thread(
    gateway: AppFactory, upstream: respx.Router, monkeypatch: pytest.MonkeyPatch, slice_s: float
) -> None:
    """Past the event loop's inline slice for reading its texts, a request under the size threshold is planned again
    in a worker thread, with the whole budget: it goes out exactly as planning it inline sends it. (The slice is
    set to nothing so that every request takes that path, and to forever for the inline baseline.)"""
    monkeypatch.setattr("gateway.planning.planner.INLINE_SCAN_SECONDS", slice_s)
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        answers = [
            await client.post("/v1/chat/completions", content=rag_chat(names))
            for names in (["a", "b", "x"], ["c", "b", "a"], ["c", "b", "a"])
        ]
        metrics = (await client.get("/metrics")).text
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    sent = [json.loads(call.request.content)["messages"][0]["content"] for call in route.calls]
    assert sent[1].index('id="a"') < sent[1].index('id="b"') < sent[1].index('id="c"')  # the cached a, b first
    assert sent[2] == sent[1] and result(answers[1])["reordered"] is True and "skipped" not in result(answers[1])
    handed_off = metric(metrics, "prefixgate_planned_in_thread_total", 'reason="slow_texts"')
    assert handed_off == (2 if slice_s < 1 else 0)  # the third request's texts are all in the memo: nothing to read


# ------------------------------------------------------------------------------------------------ tenancy


async def test_one_key_cannot_learn_what_another_key_sent(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS) as client:
        first = await client.post("/v1/chat/completions", content=rag_chat(["salary", "b", "c"]), headers=ALICE)
        probe = await client.post("/v1/chat/completions", content=rag_chat(["salary", "b", "c"]), headers=BOB)
        again = await client.post("/v1/chat/completions", content=rag_chat(["salary", "b", "c"]), headers=ALICE)
    assert result(first)["memo_hits"] == 0
    # bob sends exactly what alice sent: nothing in his answer depends on alice's traffic
    assert result(probe)["memo_hits"] == 0
    assert result(probe)["predicted_cached_blocks"] == 0
    # alice's own history still serves her
    assert result(again)["memo_hits"] == 2  # the system prompt and the question
    assert result(again)["predicted_cached_blocks"] == 3


async def test_shared_cache_is_opt_in_and_hides_what_it_shares(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS, shared_cache=True) as client:
        await client.post("/v1/chat/completions", content=rag_chat(["a", "b", "c"]), headers=ALICE)
        probe = await client.post("/v1/chat/completions", content=rag_chat(["a", "b", "c"]), headers=BOB)
    assert "memo_hits" not in result(probe)
    assert "predicted_cached_blocks" not in result(probe)


async def test_with_a_shared_cache_one_key_cannot_cut_another_keys_chunk(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    """``--shared-cache`` with keys: learned boundaries count distinct keys. Bob sends Alice's chunk's paragraphs
    apart ten times (a LangChain stuff chain, documents joined by blank lines); Alice's next request still goes out
    with the chunk whole (without keys, or before this rule, ten requests apart against two whole cut it)."""
    from tests.unit.test_intercept_boundaries import prompt

    a, b = "Alice's chunk, its first part.", "Alice's chunk, its second part."
    chunk, other = f"{a}\n\n{b}", "Another of Alice's chunks."

    def chat(chunks: list[str], question: str) -> bytes:
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt(chunks, question)}]}).encode()

    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS, shared_cache=True) as client:
        await client.post("/v1/chat/completions", content=chat([chunk, other], "first?"), headers=ALICE)
        for i in range(10):
            await client.post("/v1/chat/completions", content=chat([a, "Bob's x."], f"x{i}?"), headers=BOB)
            await client.post("/v1/chat/completions", content=chat(["Bob's y.", b], f"y{i}?"), headers=BOB)
        again = await client.post("/v1/chat/completions", content=chat([other, chunk], "again?"), headers=ALICE)
    assert result(again)["blocks"] == 2, "two documents: the chunk's blank line is not a boundary"
    sent = json.loads(route.calls[-1].request.content)["messages"][0]["content"]
    assert chunk in sent, "Alice's chunk went out whole"


async def test_index_routes_need_the_admin_token_or_a_key(gateway: AppFactory) -> None:
    schedule = {"contexts": [[1, 2], [2, 3]]}
    async with gateway(**TENANTS) as client:
        for method, path, body in (
            ("GET", "/requests", None),
            ("GET", "/stats", None),
            ("POST", "/search", {"context": [1, 2]}),
            ("POST", "/schedule", schedule),
            ("POST", "/reorder", schedule),
            ("POST", "/evict", {"request_ids": ["x"]}),
        ):
            refused = await client.request(method, path, json=body)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["type"] == "authentication_error"
        assert (await client.get("/requests", headers=ADMIN)).status_code == 200
        assert (await client.get("/requests", headers=ALICE)).status_code == 200
        # stateful /reorder changes what everyone shares: a client key is not enough
        assert (await client.post("/reorder", json=schedule, headers=ALICE)).status_code == 401


async def test_requests_lists_only_the_callers_ids(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS) as client:
        mine = await client.post(
            "/v1/chat/completions",
            content=rag_chat(["a", "b"]),
            headers={**ALICE, "x-request-id": "alice-1"},
        )
        theirs = await client.post(
            "/v1/chat/completions", content=rag_chat(["c", "d"]), headers={**BOB, "x-request-id": "bob-secret"}
        )
        as_alice = (await client.get("/requests", headers=ALICE)).json()["request_ids"]
        as_admin = (await client.get("/requests", headers=ADMIN)).json()["request_ids"]
    assert as_alice == [mine.headers["x-request-id"]]
    assert set(as_admin) == {mine.headers["x-request-id"], theirs.headers["x-request-id"]}


async def test_issued_ids_are_honoured_only_for_their_key(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS) as client:
        issued = (await client.post("/schedule", json={"contexts": [[1, 2]]}, headers=ALICE)).json()["request_ids"][0]
        used = await client.post(
            "/v1/chat/completions", content=rag_chat(["a", "b"]), headers={**ALICE, "x-request-id": issued}
        )
        stolen = await client.post(
            "/v1/chat/completions", content=rag_chat(["a", "b"]), headers={**BOB, "x-request-id": issued}
        )
    assert used.headers["x-request-id"] == issued
    assert stolen.headers["x-request-id"] != issued
    assert stolen.headers["x-request-id"].endswith(f"-{issued}")


async def test_stateless_schedule_is_bounded(gateway: AppFactory) -> None:
    async with gateway(**TENANTS, schedule_max_contexts=100) as client:
        big = await client.post("/schedule", json={"contexts": [[i] for i in range(101)]}, headers=ALICE)
        fine = await client.post("/schedule", json={"contexts": [[i] for i in range(100)]}, headers=ALICE)
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "too_many_contexts"
    assert fine.status_code == 200


async def test_one_key_cannot_flush_ids_issued_to_another(gateway: AppFactory, upstream: respx.Router) -> None:
    upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway(**TENANTS, index_max_requests=50) as client:
        issued = (await client.post("/schedule", json={"contexts": [[1]]}, headers=ALICE)).json()["request_ids"][0]
        for _ in range(3):  # bob fills his own pool many times over
            await client.post("/schedule", json={"contexts": [[i] for i in range(50)]}, headers=BOB)
        used = await client.post(
            "/v1/chat/completions", content=rag_chat(["a", "b"]), headers={**ALICE, "x-request-id": issued}
        )
    assert used.headers["x-request-id"] == issued


# ----------------------------------------------------------------------------------------- hop-by-hop headers


async def test_fields_named_in_connection_are_not_forwarded(gateway: AppFactory, upstream: respx.Router) -> None:
    route = upstream.post("/v1/chat/completions").mock(side_effect=ok_json)
    async with gateway() as client:
        await client.post(
            "/v1/chat/completions",
            content=rag_chat(["a", "b"]),
            headers={"connection": "keep-alive, X-Internal-Hop", "x-internal-hop": "secret", "x-kept": "yes"},
        )
    sent = route.calls[0].request.headers
    assert "x-internal-hop" not in sent
    assert sent["x-kept"] == "yes"
