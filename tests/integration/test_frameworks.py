"""The real frameworks' default RAG prompts, rendered by the libraries, are found and reordered by the gateway.

The documents carry no marker (LangChain's ``page_content`` joined by blank lines, LlamaIndex nodes without
metadata) and hold blank lines of their own, so the gateway must first learn where one ends from traffic: the
warm-up requests retrieve the same chunks in other company. Then a request is reordered into the order an
earlier request left in the cache, and every document arrives whole.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
import respx

from gateway.planning.intercept import find_groups
from tests.frameworks import CASES, Case, quiet
from tests.integration.conftest import AppFactory

pytestmark = pytest.mark.anyio

DOCS = [
    "The refund policy allows a full refund within 30 days of purchase.\n\nAfter 30 days, refunds are prorated "
    "by the remaining subscription period.",
    "Two-factor authentication is enabled from the security page.\n\nBackup codes are shown once; store them "
    "offline.\n\nLost codes require an identity check by support.",
    "Invoices are sent on the first business day of each month.",
    "The mobile app syncs every fifteen minutes on cellular networks.\n\nOn wireless networks it syncs "
    "immediately after each change.",
    "Data exports are produced as compressed archives of newline-delimited records.\n\nLarge exports are split "
    "into parts of two gigabytes each.",
    "Support answers within four business hours for paid plans.\n\nFree plans are answered by the community forum.",
]
OK = {"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
OK_TEXT = {"id": "x", "object": "text_completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def texts(body: dict[str, Any]) -> list[str]:
    if "prompt" in body:
        prompt = body["prompt"]
        return list(prompt) if isinstance(prompt, list) else [prompt]
    return [m["content"] for m in body["messages"] if isinstance(m.get("content"), str)]


def context_text(body: dict[str, Any]) -> str:
    """The text that holds the documents."""
    return max(texts(body), key=lambda text: sum(doc in text for doc in DOCS))


def order(text: str, docs: list[str]) -> list[int]:
    return sorted((DOCS.index(doc) for doc in docs), key=lambda i: text.index(DOCS[i]))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_the_rendered_template_is_the_one_recognised(case: Case) -> None:
    """Fails when a library changes its template: the group must exist and span exactly the documents."""
    with quiet():
        body = case.render(DOCS[:4], "How do refunds work?")
    text = context_text(body)
    assert all(doc in text for doc in DOCS[:4])
    groups = [group for t in texts(body) for group in find_groups(t)]
    assert [group.label for group in groups] == [case.label]
    (group,) = groups
    first, last = text.index(DOCS[0]), text.index(DOCS[3]) + len(DOCS[3])
    assert group.start <= first and last <= group.end  # the whole context, and no more than a record's label
    assert text[last : group.end].strip() == "" and len(text[group.start : first]) < 64
    if case.label.endswith(":paragraphs"):
        assert len(group) == sum(doc.count("\n\n") + 1 for doc in DOCS[:4])  # a candidate per paragraph
    if case.label.startswith("haystack"):
        # Haystack indents each document's first line: its unindented later paragraphs continue it, never cut
        firsts = [i for i in range(len(group)) if i not in group.joined]
        assert [text[group.blocks[i].start : group.blocks[i].end] for i in firsts] == [
            doc.split("\n\n")[0] for doc in DOCS[:4]
        ]
    if not case.label.endswith(":paragraphs"):
        assert len(group) == 4  # exact boundaries: metadata lines or Source:/Content: records


FIRST, SECOND = [DOCS[i] for i in (1, 4, 0, 3)], [DOCS[i] for i in (3, 0, 1, 4)]


@pytest.fixture
def bodies(case: Case) -> list[dict[str, Any]]:
    """Twenty warm-up requests over three of the documents each, then the same four documents in two orders.

    Twenty: a blank line is a boundary only once its two sides were seen apart more often than together.

    Rendered outside the test's event loop: some libraries start loops of their own when they find one running.
    """
    rng = random.Random(5)
    with quiet():
        rendered = [case.render(rng.sample(DOCS, 3), f"question {i}?") for i in range(20)]
        # the same question twice: rag-prompt puts it before the context, where it is part of the prefix
        rendered += [case.render(docs, "How do refunds work?") for docs in (FIRST, SECOND)]
    return rendered


@pytest.mark.parametrize("case", CASES, ids=repr)
async def test_found_and_reordered_through_the_gateway(
    case: Case, bodies: list[dict[str, Any]], gateway: AppFactory, upstream: respx.Router
) -> None:
    chat = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    text = upstream.post("/v1/completions").mock(return_value=httpx.Response(200, json=OK_TEXT))
    route = "/v1/completions" if "prompt" in bodies[0] else "/v1/chat/completions"
    results = []
    async with gateway() as client:
        for body in bodies:
            response = await client.post(route, json=body)
            assert response.status_code == 200
            results.append(json.loads(response.headers["x-prefixgate-result"]))
    calls = (text if route == "/v1/completions" else chat).calls
    sent_first = context_text(json.loads(calls[-2].request.content))
    sent_second = context_text(json.loads(calls[-1].request.content))
    assert all(doc in sent_second for doc in SECOND)  # every document whole
    assert sent_second != context_text(bodies[-1])
    assert order(sent_second, SECOND) == order(sent_first, FIRST)  # the order the cache holds
    assert results[-2]["blocks"] == 4 and results[-1]["blocks"] == 4
    assert results[-1]["reordered"] is True and results[-1]["predicted_cached_blocks"] == 4
    if case.label.endswith(":paragraphs"):  # the first request of a chunk is never split
        assert results[0]["groups"] == 0


def test_every_case_renders_quickly_and_differently() -> None:
    """Guard against a render that ignores its input (a test that could not fail)."""
    with quiet():
        for case in CASES:
            one, two = (context_text(case.render(docs, "q?")) for docs in (DOCS[:3], DOCS[3:]))
            assert one != two and DOCS[0] in one and DOCS[3] in two, case.name


async def test_explicit_template_mode_never_cuts_a_first_seen_document(
    gateway: AppFactory, upstream: respx.Router
) -> None:
    """``X-Prefixgate-Format: template`` used to cut at every blank line and interleave paragraphs."""
    route = upstream.post("/v1/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    with quiet():
        body = CASES[0].render(DOCS[:4], "How do refunds work?")
    async with gateway() as client:
        response = await client.post("/v1/chat/completions", json=body, headers={"X-Prefixgate-Format": "template"})
    assert json.loads(response.headers["x-prefixgate-result"])["groups"] == 0
    assert json.loads(route.calls[0].request.content)["messages"] == body["messages"]
