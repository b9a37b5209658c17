"""Whatever shape a client sends, the Messages and Responses walks either plan it or leave it alone; they never fail
with anything but a 400, and a rewrite only ever permutes what the client sent."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.metrics import Metrics
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire import SHAPES
from gateway.wire.chat import decode_request
from gateway.wire.walk import Reader, ScopedWalker

PLANNER = Planner(load_settings(environ={}), Residency(max_requests=10_000, stateless=False), Metrics())
DOCS = [f"Passage {i}: " + " ".join(f"w{i}x{j}" for j in range(12)) for i in range(4)]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["", "x", *DOCS]))
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "text"]), inner),
    max_leaves=6,
)
block_types = st.sampled_from(["text", "document", "search_result", "tool_result", "image", 7, None])


@st.composite
def blocks(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(block_types)
    block: dict[str, Any] = {"type": kind}
    text = draw(st.sampled_from(DOCS))
    if kind == "text":
        block["text"] = draw(st.one_of(st.just(text), anything))
    elif kind == "document":
        block["source"] = draw(st.one_of(
            st.just({"type": "text", "media_type": "text/plain", "data": text}),
            st.just({"type": "content", "content": [{"type": "text", "text": text}]}), anything))  # fmt: skip
        block["citations"] = draw(st.one_of(st.just({"enabled": True}), anything))
    elif kind == "search_result":
        block.update(source="s", title="t", content=[{"type": "text", "text": text}])
    elif kind == "tool_result":
        block["content"] = draw(st.one_of(st.just(text), st.lists(st.just({"type": "document", "source": {
            "type": "text", "media_type": "text/plain", "data": text}}), max_size=3), anything))  # fmt: skip
    if draw(st.booleans()):
        block["cache_control"] = draw(st.one_of(st.just({"type": "ephemeral"}), anything))
    return block


messages_bodies = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "system": st.one_of(st.just("sys"), st.lists(blocks(), max_size=2), anything),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", 3]),
                    "content": st.one_of(st.sampled_from(DOCS), st.lists(blocks(), max_size=5)),
                }
            ),
            min_size=1,
            max_size=3,
        ),
    }
)
items = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "developer", "assistant", ["x"]]),
            "content": st.one_of(
                st.sampled_from(DOCS),
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "type": st.sampled_from(["input_text", "x"]),
                            "text": st.one_of(st.sampled_from(DOCS), anything),
                        }
                    ),
                    max_size=3,
                ),
                anything,
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call_output"),
            "call_id": st.just("c"),
            "output": st.one_of(st.sampled_from(DOCS), anything),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("file_search_call"),
            "results": st.one_of(st.lists(st.sampled_from(DOCS).map(lambda t: {"text": t}), max_size=4), anything),
        }
    ),
    anything.filter(lambda value: isinstance(value, dict)),
)
responses_bodies = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "instructions": st.one_of(st.just("Be brief."), st.none()),
        "input": st.one_of(st.sampled_from(DOCS), st.lists(items, max_size=5)),
    }
)


def _plan(route: str, body: dict[str, Any]) -> bytes | None:
    try:
        request = decode_request(json.dumps(body).encode(), route)
        request.update(PLANNER.plan(PLANNER.read(request, {}), "r1").fields)
    except InvalidRequest:
        return None
    return request.encode()


def _leaves(value: Any) -> Counter[str]:
    """Every scalar with its path of keys (list positions left out): a permutation keeps this multiset."""
    found: Counter[str] = Counter()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{path}.{key}")
        elif isinstance(node, list):
            for child in node:
                walk(child, path + "[]")
        else:
            found[f"{path}={json.dumps(node)}"] += 1

    walk(value, "")
    return found


WALKS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_only_permutes(route: str, body: dict[str, Any]) -> None:
    """Planning ``body`` does not fail, and a rewrite only moves its leaves."""
    out = _plan(route, body)
    if out is not None:
        assert _leaves(msgspec.json.decode(out)) == _leaves(body)


@WALKS
@given(messages_bodies)
def test_messages_walk_never_fails_and_only_permutes(body: dict[str, Any]) -> None:
    assert_only_permutes("/v1/messages", body)


@WALKS
@given(responses_bodies)
def test_responses_walk_never_fails_and_only_permutes(body: dict[str, Any]) -> None:
    assert_only_permutes("/v1/responses", body)


def _walk_twice(route: str, body: dict[str, Any]) -> None:
    """The planner reads a body with a ``Reader`` walk, then plans it with a ``ScopedWalker`` walk that names each
    text by its ordinal in the first: both walks must meet the same texts in the same order."""
    try:
        request = decode_request(json.dumps(body).encode(), route)
    except InvalidRequest:
        return
    scope = ("system", "user", "tool")
    reader = Reader(scope)
    SHAPES[route].plan(request.top, request.raw, reader)
    met: list[int] = []

    def text(value: str, key: int) -> None:
        assert reader.texts[key] == (value, True)
        met.append(key)

    walker = ScopedWalker(lambda data: None, text, lambda units, form, first: None, scope)
    SHAPES[route].plan(request.top, request.raw, walker)
    assert met == [i for i, (_, in_scope) in enumerate(reader.texts) if in_scope]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages_bodies, responses_bodies)
def test_the_reading_walk_and_the_planning_walk_meet_the_same_texts(messages: Any, responses: Any) -> None:
    _walk_twice("/v1/messages", messages)
    _walk_twice("/v1/responses", responses)
