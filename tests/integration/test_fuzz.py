"""Hostile and malformed input, in-process: hypothesis fuzz of the proxy routes and the index API.

The property everywhere: the answer is a 4xx OpenAI-style error or a correct forward, never a 500 and never a
hang. A forward is correct when the upstream received exactly one request and, when the gateway did not reorder
anything (``X-Prefixgate-Result``), the original bytes (the generic engine stamps only a header).

The index API's decoding edge cases (invalid UTF-8 inside strings, deep nesting), once answered with 500, are
pinned as 400s at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from gateway.app import create_app
from tests.integration.conftest import _as_network, make_settings

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ANSWER = {
    "id": "x",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
PROXY_ROUTES = ("/v1/chat/completions", "/v1/completions")
INDEX_ROUTES = ("/reorder", "/schedule", "/build", "/evict", "/search", "/insert", "/deduplicate")
DEEP = 10_000


@dataclass
class Harness:
    client: TestClient[Any]
    seen: list[bytes] = field(default_factory=list)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[httpx.Response, list[bytes]]:
        before = len(self.seen)
        response = self.client.post(path, content=body, headers=headers or {})
        return response, self.seen[before:]


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    router = respx.Router(base_url="http://engine.test", assert_all_called=False)
    state = Harness(client=None)  # type: ignore[arg-type]

    def answer(request: httpx.Request) -> httpx.Response:
        state.seen.append(request.content)
        return httpx.Response(200, json=ANSWER)

    router.route().mock(side_effect=answer)
    # no time budget here: the block limit (413) must be reached however slow the machine (the budget's own tests
    # are in tests/integration/test_hostile.py)
    settings = make_settings(max_body_bytes=32 << 20, intercept_budget_ms=600_000)
    app = create_app(settings, transport=httpx.MockTransport(_as_network(router)))
    with TestClient(app=app, timeout=30) as client:
        state.client = client
        yield state


def assert_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert set(error) == {"message", "type", "param", "code"}


def assert_proxied(response: httpx.Response, sent: bytes, forwarded: list[bytes]) -> None:
    """A 4xx error with nothing forwarded, or one forward that keeps the bytes unless blocks were reordered."""
    assert "x-request-id" in response.headers
    if response.status_code != 200:
        assert_error(response)
        assert forwarded == []
        return
    assert response.json() == ANSWER
    assert len(forwarded) == 1
    result = json.loads(response.headers.get("x-prefixgate-result", "{}"))
    if not result.get("reordered"):
        assert forwarded[0] == sent


def assert_index_answer(response: httpx.Response) -> None:
    if response.status_code == 200:
        assert response.json()["status"] == "success"
    else:
        assert_error(response)


# ---------------------------------------------------------------------------------------------- strategies

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "toolresult"]) | st.text(max_size=10)
doc_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@st.composite
def rag_text(draw: st.DrawFn) -> str:
    """Text that looks like a RAG prompt in one of the formats the intercept finds, sometimes broken."""
    docs = draw(st.lists(doc_text, min_size=0, max_size=8))
    style = draw(st.sampled_from(["xml", "numbered", "json", "separator", "markdown", "broken"]))
    if style == "xml":
        inner = "\n".join(f'<document id="{i}">{d}</document>' for i, d in enumerate(docs))
        text = f"<documents>\n{inner}\n</documents>"
    elif style == "numbered":
        text = "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(docs))
    elif style == "json":
        text = json.dumps({"results": [{"id": i, "text": d} for i, d in enumerate(docs)]})
    elif style == "separator":
        text = "\n---\n".join(docs)
    elif style == "markdown":
        text = "\n\n".join(f"## Document {i}\n{d}" for i, d in enumerate(docs))
    else:
        text = "".join(f"<document>{d}" for d in docs) + "</documents>" + "<doc id=" * len(docs)
    return draw(st.text(max_size=20)) + "\n" + text + "\n" + draw(st.text(max_size=20))


content = (
    rag_text()
    | st.text(max_size=200)
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": rag_text() | json_values}),
        max_size=3,
    )
)
message = st.fixed_dictionaries({"role": roles, "content": content | json_values}) | json_values
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=4) | json_values},
    optional={
        "model": json_values,
        "stream": st.booleans() | json_values,
        "n": json_values,
        "tools": json_values,
        "stream_options": json_values,
        "vendor": json_values,
    },
)
valid_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": rag_text()
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": rag_text()}), min_size=1, max_size=3),
    }
)
valid_chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(valid_message, min_size=1, max_size=4)},
    optional={
        "model": st.text(max_size=10),
        "stream": st.booleans(),
        "n": st.integers(1, 4),
        "vendor": json_values,
        "tools": st.lists(json_values, max_size=2),
    },
)
completion_bodies = st.fixed_dictionaries(
    {"prompt": rag_text() | st.lists(rag_text(), min_size=1, max_size=3) | st.lists(st.integers(), max_size=5)},
    optional={"model": st.text(max_size=10) | json_values, "stream": st.booleans(), "max_tokens": json_values},
)
control_headers = st.dictionaries(
    st.sampled_from(
        [
            "x-prefixgate-reorder",
            "x-prefixgate-format",
            "x-prefixgate-scope",
            "x-prefixgate-annotate",
            "x-prefixgate-tag",
            "x-prefixgate-separator",
            "x-contextpilot-enabled",
            "x-contextpilot-mode",
            "x-contextpilot-scope",
            "x-request-id",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
    | st.sampled_from(["on", "off", "auto", "xml_tag", "numbered", "all", "user,tool", "document", "---"]),
    max_size=4,
)


def mutate(body: bytes, data: st.DataObject) -> bytes:
    """Truncate, splice in random bytes, or duplicate a key of a valid body."""
    how = data.draw(st.sampled_from(["keep", "truncate", "splice", "duplicate"]))
    if how == "truncate" and body:
        return body[: data.draw(st.integers(0, len(body) - 1))]
    if how == "splice":
        at = data.draw(st.integers(0, len(body)))
        return body[:at] + data.draw(st.binary(max_size=8)) + body[at:]
    if how == "duplicate" and body.startswith(b"{") and len(body) > 2:
        return b'{"messages": [], "prompt": 1, ' + body[1:]
    return body


# --------------------------------------------------------------------------------------------- proxy fuzz


@FUZZ
@given(body=chat_bodies, headers=control_headers, data=st.data())
def test_fuzz_chat_bodies(harness: Harness, body: dict[str, Any], headers: dict[str, str], data: st.DataObject) -> None:
    sent = mutate(json.dumps(body).encode(), data)
    response, forwarded = harness.post("/v1/chat/completions", sent, headers)
    assert_proxied(response, sent, forwarded)


@FUZZ
@given(body=valid_chat_bodies, headers=control_headers, data=st.data())
def test_fuzz_rag_chat_bodies(
    harness: Harness, body: dict[str, Any], headers: dict[str, str], data: st.DataObject
) -> None:
    sent = json.dumps(body, ensure_ascii=data.draw(st.booleans())).encode()
    response, forwarded = harness.post("/v1/chat/completions", sent, headers)
    assert_proxied(response, sent, forwarded)


@FUZZ
@given(body=completion_bodies, headers=control_headers, data=st.data())
def test_fuzz_completion_bodies(
    harness: Harness, body: dict[str, Any], headers: dict[str, str], data: st.DataObject
) -> None:
    sent = mutate(json.dumps(body, ensure_ascii=data.draw(st.booleans())).encode(), data)
    response, forwarded = harness.post("/v1/completions", sent, headers)
    assert_proxied(response, sent, forwarded)


@FUZZ
@given(
    route=st.sampled_from(PROXY_ROUTES),
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_fuzz_arbitrary_bytes_and_json_on_proxy_routes(harness: Harness, route: str, body: bytes) -> None:
    response, forwarded = harness.post(route, body)
    assert_proxied(response, body, forwarded)


@FUZZ
@given(
    route=st.sampled_from(PROXY_ROUTES),
    prefix=st.sampled_from([b'{"messages": [{"role": "user", "content": "', b'{"prompt": "']),
    junk=st.binary(min_size=1, max_size=20),
)
def test_fuzz_invalid_utf8_inside_strings(harness: Harness, route: str, prefix: bytes, junk: bytes) -> None:
    sent = prefix + junk + b'"}]}' if b"messages" in prefix else prefix + junk + b'"}'
    response, forwarded = harness.post(route, sent)
    assert_proxied(response, sent, forwarded)


def _deep(kind: bytes, depth: int = DEEP) -> bytes:
    close = b"]" if kind == b"[" else b"}"
    if kind == b"[":
        return kind * depth + close * depth
    return b'{"a":' * depth + b"1" + close * depth


@pytest.mark.parametrize("route", PROXY_ROUTES)
@pytest.mark.parametrize(
    "template",
    [
        b"%s",
        b'{"messages": %s, "prompt": %s}',
        b'{"messages": [{"role": "user", "content": [%s]}], "prompt": [%s]}',
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "vendor": %s}',
    ],
)
@pytest.mark.parametrize("kind", [b"[", b"{"])
def test_deep_nesting_never_recurses_to_a_crash(harness: Harness, route: str, template: bytes, kind: bytes) -> None:
    deep = _deep(kind)
    sent = template.replace(b"%s", deep)
    response, forwarded = harness.post(route, sent)
    assert_proxied(response, sent, forwarded)


@pytest.mark.parametrize("route", PROXY_ROUTES)
def test_huge_strings_numbers_and_duplicate_keys(harness: Harness, route: str) -> None:
    huge = "w " * (4 << 20)  # 8 MB of text
    cases = [
        {"messages": [{"role": "user", "content": huge}], "prompt": huge},
        {"messages": [{"role": "user", "content": "x"}], "prompt": [10**400, -(10**400)], "n": -(10**300)},
    ]
    bodies = [json.dumps(case).encode() for case in cases]
    bodies += [
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "max_tokens": ' + b"9" * 100_000 + b"}",
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": [' + b"7" * 100_000 + b"]}",
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "temperature": 1e' + b"9" * 1000 + b"}",
        b'{"messages": [], "messages": [{"role": "user", "content": "a"}], "prompt": 1, "prompt": "b"}',
        b'{"messages": [{"role": "user", "role": 5, "content": "a"}], "prompt": "x", "stream": true, "stream": 1}',
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "n": 1e999}',
        b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "n": NaN}',
    ]
    for sent in bodies:
        response, forwarded = harness.post(route, sent)
        assert_proxied(response, sent, forwarded)


def test_tens_of_thousands_of_blocks_are_refused_cleanly(harness: Harness) -> None:
    docs = "\n".join(f"<doc>block {i} " + "w " * 5 + "</doc>" for i in range(30_000))
    for route, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"<docs>\n{docs}\n</docs>\nQ?"}]}),
        ("/v1/completions", {"prompt": f"<docs>\n{docs}\n</docs>\nQ?"}),
    ):
        sent = json.dumps(body).encode()
        response, forwarded = harness.post(route, sent)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_many_blocks"
        assert forwarded == []


def test_body_over_the_limit_is_413_on_every_route(harness: Harness) -> None:
    too_big = b'{"prompt": "' + b"x" * (33 << 20) + b'"}'
    for route in (*PROXY_ROUTES, "/v1/embeddings", "/reorder"):
        response, forwarded = harness.post(route, too_big)
        assert response.status_code == 413, route
        assert_error(response)
        assert forwarded == []


# --------------------------------------------------------------------------------------------- index fuzz

contexts = (
    st.lists(st.lists(st.integers(), max_size=6), max_size=6)
    | st.lists(st.lists(st.text(max_size=8), max_size=6), max_size=6)
    | json_values
)
index_bodies = st.fixed_dictionaries(
    {},
    optional={
        "contexts": contexts,
        "context": st.lists(st.integers() | st.text(max_size=8), max_size=6) | json_values,
        "request_ids": st.lists(st.text(max_size=20), max_size=5) | json_values,
        "parent_request_ids": st.lists(st.none() | st.text(max_size=10), max_size=6) | json_values,
        "alpha": json_values,
        "linkage_method": st.sampled_from(["average", "ward", "nope"]) | json_values,
        "deduplicate": json_values,
        "hint_template": json_values,
        "search_path": json_values,
        "total_tokens": json_values,
        "update_access": json_values,
        "initial_tokens_per_context": json_values,
    },
)


@FUZZ
@given(route=st.sampled_from(INDEX_ROUTES), body=index_bodies, data=st.data())
def test_fuzz_index_api(harness: Harness, route: str, body: dict[str, Any], data: st.DataObject) -> None:
    sent = json.dumps(body).encode()
    if data.draw(st.booleans()):
        sent = sent[: data.draw(st.integers(0, len(sent)))]
    response, forwarded = harness.post(route, sent)
    assert_index_answer(response)
    assert forwarded == []


@FUZZ
@given(route=st.sampled_from(INDEX_ROUTES), text=st.text(max_size=200))
def test_fuzz_index_api_with_text_bodies(harness: Harness, route: str, text: str) -> None:
    response, _ = harness.post(route, text.encode())
    assert_index_answer(response)


# ----------------------------------------------------------------------------- index-API decoding edge cases


@pytest.mark.parametrize(
    ("route", "body"),
    [
        # /reorder, /schedule and /evict hold the depth ...
        ("/reorder", b'{"contexts": %s}'),
        ("/schedule", b'{"contexts": [%s]}'),
        ("/evict", b'{"request_ids": %s}'),
        # ... /search, /insert and /deduplicate answer it with a 400
        ("/search", b'{"context": [%s]}'),
        ("/insert", b'{"context": [%s]}'),
        ("/deduplicate", b'{"contexts": [[%s]], "parent_request_ids": [null]}'),
    ],
)
def test_index_api_deep_nesting(harness: Harness, route: str, body: bytes) -> None:
    response, _ = harness.post(route, body.replace(b"%s", _deep(b"[")))
    assert_index_answer(response)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/reorder", b'{"contexts": [["\xff"]]}'),
        ("/schedule", b'{"contexts": [["a"]], "linkage_method": "\xc3\x28"}'),
        ("/search", b'{"context": ["\xff"]}'),
        ("/insert", b'{"context": ["\xff"]}'),
        ("/deduplicate", b'{"contexts": [["\xff"]], "parent_request_ids": [null]}'),
        ("/evict", b'{"request_ids": ["\xff"]}'),
    ],
)
def test_index_api_invalid_utf8_is_a_400(harness: Harness, route: str, body: bytes) -> None:
    response, _ = harness.post(route, body)
    assert_index_answer(response)
