"""The router without a network: replicas are ranked by their indexes alone (``LiveIndex.cached`` agrees with the
plan), each request is planned once, against the winner's index only, committed there only, and a request that
could not be sent is planned again for the next replica."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.planning.plan import PlannedRequest
from gateway.settings import load_settings
from gateway.upstream.router import Route, Router
from gateway.wire.chat import CHAT_ROUTE, decode_request
from scheduler.index import LiveIndex
from tests.integration.test_intercept_proxy import chat, order_in, xml_docs

UPSTREAMS = [f"http://10.0.0.{r + 1}:8000" for r in range(4)]


@given(
    st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=8), min_size=1, max_size=6),
    st.lists(st.integers(0, 12), max_size=10),
)
def test_cached_is_the_plans_count_without_counting_a_plan(paths: list[list[int]], blocks: list[int]) -> None:
    index = LiveIndex()
    for i, path in enumerate(paths):
        index.commit(b"k", f"r{i}", path)
    plans = index.stats().plans
    assert index.cached(b"k", blocks) == index.plan(b"k", blocks).cached
    assert index.cached(b"k", blocks, budget=1) <= index.cached(b"k", blocks), "a smaller search: a lower bound"
    assert index.cached(b"other", blocks) == 0
    assert index.stats().plans == plans + 1, "only plan() is counted"


def test_a_conversation_is_known_by_its_first_two_messages_or_its_session() -> None:
    from gateway.upstream.router import _conversation

    def key(content: bytes, **headers: str) -> bytes | None:
        return _conversation(decode_request(content, CHAT_ROUTE), headers)

    first = key(chat(xml_docs(["alpha", "beta"]), "q1"))
    assert first == key(chat(xml_docs(["alpha", "beta"]), "q1"))
    assert first != key(chat(xml_docs(["alpha", "beta"]), "q2"))
    assert first != key(chat(xml_docs(["beta", "alpha"]), "q1"))
    assert key(chat("a", "b"), **{"x-session-id": "s1"}) == key(chat("c", "d"), **{"x-session-id": "s1"})
    assert key(chat("a", "b", user="u1")) == key(chat("c", "d", user="u1")) != first


def _router() -> Router:
    router: Router = create_app(load_settings(environ={}, upstream=UPSTREAMS)).state.proxy.planner
    return router


def _plan(router: Router, content: bytes, request_id: str) -> PlannedRequest:
    planned = router.plan(router.read(decode_request(content, CHAT_ROUTE), {}), request_id)
    assert isinstance(planned.routing, Route)
    return planned


def _replica(planned: PlannedRequest) -> Any:
    assert isinstance(planned.routing, Route) and planned.upstream is planned.routing.replica
    return planned.routing.replica


def _sent_order(planned: PlannedRequest, content: bytes) -> list[str]:
    messages = planned.fields.get("messages")
    system = json.loads(bytes(messages[0])) if messages else json.loads(content)["messages"][0]
    return order_in(system["content"])


def _plans(router: Router) -> list[int]:
    return [replica.residency.index.stats().plans for replica in router.replicas]


def test_each_request_is_planned_once_against_the_winners_index_only() -> None:
    router = _router()
    first_body = chat(xml_docs(["alpha", "beta"]), "q1")
    first = _plan(router, first_body, "req-1")
    first.accept()
    first.finish()
    home = _replica(first)
    assert "req-1" in home.residency.index
    assert all("req-1" not in r.residency.index for r in router.replicas if r is not home)
    other = _plan(router, chat(xml_docs(["gamma", "delta"]), "q2"), "req-2")
    other.accept()
    other.finish()
    assert _replica(other) is not home, "a miss goes to a replica that was sent fewer requests"
    before = _plans(router)
    body = chat(xml_docs(["beta", "gamma", "alpha"]), "q3")
    again = _plan(router, body, "req-3")
    after = _plans(router)
    assert _replica(again) is home and again.result["predicted_cached_blocks"] == 2
    assert [b - a for a, b in zip(before, after, strict=True)] == [int(r is home) for r in router.replicas], (
        "one plan, on the winner's index; the others were only asked what they hold"
    )
    assert _sent_order(again, body)[:2] == _sent_order(first, first_body), "ordered for the winner's cache"
    again.accept()
    assert "req-3" in home.residency.index
    assert all("req-3" not in r.residency.index for r in router.replicas if r is not home)
    again.finish()
    assert all(r.in_flight == 0 and r.queued_tokens == 0 for r in router.replicas)


def test_a_request_without_blocks_is_ranked_on_load() -> None:
    router = _router()
    busy = _plan(router, chat("no documents here", "hello"), "req-1")  # held in flight
    idle = _plan(router, chat("nothing either", "hi"), "req-2")
    assert _replica(idle) is not _replica(busy)
    assert idle.result["replica"] == _replica(idle).name and "reordered" in idle.result
    for planned in (busy, idle):
        planned.accept()
        planned.finish()


def test_an_unsent_request_is_planned_again_for_the_next_replica() -> None:
    router = _router()
    content = chat(xml_docs(["alpha", "beta"]), "q1")
    body = decode_request(content, CHAT_ROUTE)
    failed = router.plan(router.read(body, {}), "req-1")
    assert isinstance(failed.routing, Route)
    moved: Any = failed.reroute(body, {})
    assert isinstance(moved.routing, Route)
    failed.finish()
    assert _replica(moved) is failed.routing.ranking[1] and moved.result["replica"] == _replica(moved).name
    moved.accept()
    moved.finish()
    assert "req-1" in _replica(moved).residency.index
    assert "req-1" not in _replica(failed).residency.index


OFF = {"x-prefixgate-reorder": "off"}


def test_a_request_left_as_sent_is_routed_to_the_replica_that_holds_it() -> None:
    """Issue 19 item 5: with reordering off, the prompt as sent still picks the replica whose cache holds it."""
    router = _router()
    body = chat(xml_docs(["delta", "alpha", "gamma"]), "q1")
    first = router.plan(router.read(decode_request(body, CHAT_ROUTE), OFF), "req-1")
    assert isinstance(first.routing, Route) and first.fields == {}
    first.accept()
    first.finish()
    for i in range(2):  # one replica is sent nothing: a load-only choice picks it
        other = _plan(router, chat(f"unrelated {i} " * 80, "hi"), f"other-{i}")
        other.accept()
        other.finish()
    # another question: another conversation (no affinity), the same documents first
    again = router.plan(
        router.read(decode_request(chat(xml_docs(["delta", "alpha", "gamma"]), "q2"), CHAT_ROUTE), OFF), "req-2"
    )
    assert isinstance(again.routing, Route)
    assert _replica(again) is _replica(first) and again.result["replica"] == _replica(first).name
    assert again.fields == {}
    again.finish()


def test_a_prompt_whose_order_the_cache_holds_goes_out_as_sent() -> None:
    """The engine holds the prompt as sent (an earlier request with reordering off): the rewrite would lose it."""
    router = _router()
    body = chat(xml_docs(["delta", "alpha", "gamma"]), "q1")
    probe = _plan(_router(), body, "probe")
    assert probe.fields, "a fresh gateway reorders this prompt (else the test proves nothing)"
    held = router.plan(router.read(decode_request(body, CHAT_ROUTE), OFF), "req-1")
    held.accept()
    held.finish()
    again = _plan(router, body, "req-2")
    assert again.fields == {} and again.result["reordered"] is False
    assert again.result["left_alone"] == {"cached_as_sent": 1}
    assert again.result["predicted_cached_tokens"] > 100
    again.accept()
    again.finish()
    metrics = router.replicas.replicas[0].planner.metrics.render().decode()  # type: ignore[union-attr]
    assert 'prefixgate_left_alone_total{reason="cached_as_sent"} 1.0' in metrics
