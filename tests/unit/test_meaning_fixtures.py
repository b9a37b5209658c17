"""Meaning fixtures: whole requests whose blocks something refers to, ranks or dates, run through the planner.

Each ``tests/fixtures/prompts/meaning/<name>.json`` holds a request (``route``, ``request``), what must hold after
the planner rewrote it (``expect``) and the decisions ``X-Prefixgate-Result`` must report (``header``):

- ``identical``: the forwarded body is byte-identical to the request;
- ``labels``: the blocks moved, and every label still names the same content (:func:`label_contents` before and after);
- ``renumbered``: positive controls, the same documents with nothing referring to them: blocks moved and were
  renumbered by position (so the other fixtures are not identical merely because nothing ever moves).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.metrics import Metrics
from gateway.planning.intercept import find_groups
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.settings import load_settings
from gateway.wire.chat import decode_request

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "meaning"
CASES = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(FIXTURES.glob("*.json"))}


def plan(route: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Run one request through a fresh planner; return the body it would forward and its result header."""
    settings = load_settings(environ={})
    planner = Planner(settings, Residency(max_requests=100, stateless=False), Metrics())
    return run(planner, route, body, headers)


def plan_warm(route: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, Any]]:
    """As ``plan``, against an index that holds every group's blocks in reverse order: moving them wins cached
    blocks, so groups whose labels stay with their blocks move too (cold, they stay where they are)."""
    settings = load_settings(environ={})
    residency = Residency(max_requests=100, stateless=False)
    fresh = Planner(settings, residency, Metrics())
    cold = fresh.plan(fresh.read(decode_request(body, route), headers or {}), "req-cold")
    for i, (key, blocks) in enumerate(cold.commits):
        residency.index.commit(key, f"req-warm-{i}", tuple(reversed(blocks)))
    return run(Planner(settings, residency, Metrics()), route, body, headers)


def run(
    planner: Planner, route: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[bytes, dict[str, Any]]:
    request = decode_request(body, route)
    planned = planner.plan(planner.read(request, headers or {}), "req-test")
    request.update(planned.fields)
    return request.encode(), planned.result


def texts(body: bytes) -> list[str]:
    """Every text of a chat or completion body, in order."""
    decoded = msgspec.json.decode(body)
    if "prompt" in decoded:
        return [decoded["prompt"]]
    out: list[str] = []
    for message in decoded["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(part["text"] for part in content if part.get("type") == "text")
    return out


def label_contents(original: str, rewritten: str) -> tuple[dict[int, str], dict[int, str]]:
    """Label -> the content it names, before and after the rewrite, for every numbered block of ``original``.

    After: where each block's content now sits, the number its own marker (``[#] ``, ``Document #:``,
    ``<document index="#">``) carries there. Labels kept on moved blocks no longer count up, so the rewritten
    text is read with the original markers rather than detected again.
    """
    before: dict[int, str] = {}
    after: dict[int, str] = {}
    for group in find_groups(original):
        for block in group.blocks:
            if block.number is None:
                continue
            content = block.content(original)
            before[block.number.value] = content
            head = re.escape(original[block.start : block.number.start])
            tail = re.escape(original[block.number.end : block.content_start])
            found = re.search(f"{head}(\\d+){tail}{re.escape(content)}", rewritten)
            assert found is not None, "every block is still in the rewritten text, with a marker of its shape"
            after[int(found.group(1))] = content
    return before, after


def test_there_are_at_least_thirty_negative_fixtures() -> None:
    negatives = [name for name, case in CASES.items() if case["expect"] != "renumbered"]
    assert len(negatives) >= 30
    assert {case["expect"] for case in CASES.values()} == {"identical", "labels", "renumbered"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_keeps_its_meaning(name: str) -> None:
    case = CASES[name]
    body = msgspec.json.encode(case["request"])
    sent, result = plan(case["route"], body)
    assert result["groups"] >= 1, "the fixture must hold a group, or it proves nothing"
    for key in ("kept_labels", "left_alone", "mapped"):
        assert result.get(key, {}) == case["header"].get(key, {}), key
    if case["expect"] == "labels":
        # labels kept: moving the blocks gains nothing on a cold index, so they stay; they move once it wins
        assert sent == body and result["reordered"] is False
        sent, result = plan_warm(case["route"], body)
        for key in ("kept_labels", "left_alone", "mapped"):
            assert result.get(key, {}) == case["header"].get(key, {}), key
    before, after = texts(body), texts(sent)
    if case["expect"] == "identical":
        assert sent == body
        return
    assert sent != body, "the blocks must move for the fixture to test anything"
    assert result["reordered"] is True
    checked = 0
    for original, rewritten in zip(before, after, strict=True):
        labels_before, labels_after = label_contents(original, rewritten)
        if not labels_before:
            continue
        checked += 1
        assert sorted(rewritten) == sorted(original)  # only moved (and, for controls, renumbered)
        assert sorted(labels_after.values()) == sorted(labels_before.values())
        if case["expect"] == "labels":
            assert labels_after == labels_before
        else:
            assert labels_after != labels_before
    assert checked


def test_the_decision_is_part_of_the_memo_key() -> None:
    """Turn 1 is renumbered; turn 2 resends the same system prompt, and now a question names ``source [3]``."""
    case = CASES["control_renumbered_bracket"]["request"]
    settings = load_settings(environ={})
    planner = Planner(settings, Residency(max_requests=100, stateless=False), Metrics())

    def turn(request: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        return run(planner, "/v1/chat/completions", msgspec.json.encode(request))

    first, result1 = turn(case)
    assert result1["reordered"] is True and "kept_labels" not in result1
    referenced = {**case, "messages": [case["messages"][0], {"role": "user", "content": "What does source [3] say?"}]}
    second, result2 = turn(referenced)
    assert result2["kept_labels"] == {"referenced": 1}
    system = texts(msgspec.json.encode(referenced))[0]
    labels_before, labels_after = label_contents(system, texts(second)[0])
    assert labels_after == labels_before
    again, result3 = turn(case)
    assert again == first
    assert result3["memo_hits"] == 2  # both texts of turn 1, under turn 1's decisions


def test_citation_mapping_is_refused_when_another_list_uses_the_same_numbers() -> None:
    system = CASES["cite_them_as_n"]["request"]["messages"][0]["content"]
    tool_list = "Earlier search:\n[1] Something else entirely, about rivers.\n[2] And another thing, about lakes."
    one = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Which?"}]}
    two = {**one, "messages": [*one["messages"], {"role": "user", "content": tool_list}]}
    mapping = {"x-prefixgate-citation-mapping": "on"}
    _, alone = plan("/v1/chat/completions", msgspec.json.encode(one), mapping)
    _, ambiguous = plan("/v1/chat/completions", msgspec.json.encode(two), mapping)
    assert alone["mapped"] == {"cite_by_number": 1}
    assert ambiguous["kept_labels"] == {"cite_by_number": 2} and "mapped" not in ambiguous


_WORDS = ["tower", "bell", "river", "bridge", "castle", "museum", "harbour", "garden", "market", "library"]
_LAYOUTS = {
    "bracket": lambda docs: "Sources:\n" + "\n".join(f"[{i}] {d}" for i, d in enumerate(docs, 1)),
    "worded": lambda docs: "\n\n".join(f"Document {i}: {d}" for i, d in enumerate(docs, 1)),
    "xml": lambda docs: (
        "<documents>\n"
        + "\n".join(f'<document index="{i}">{d}</document>' for i, d in enumerate(docs, 1))
        + "\n</documents>"
    ),
}


@settings(max_examples=40, deadline=None)
@given(
    words=st.lists(st.lists(st.sampled_from(_WORDS), min_size=8, max_size=14), min_size=2, max_size=8, unique_by=tuple),
    layout=st.sampled_from(sorted(_LAYOUTS)),
    data=st.data(),
)
def test_any_referenced_list_keeps_every_label_on_its_content(words: list[list[str]], layout: str, data: Any) -> None:
    docs = [" ".join(ws).capitalize() + "." for ws in words]
    number = data.draw(st.integers(1, len(docs)))
    form = data.draw(st.sampled_from([f"What does [{number}] say?", f"Summarize Document {number} only.",
                                      f"Is source {number} right?"]))  # fmt: skip
    system = "Answer from these.\n" + _LAYOUTS[layout](docs)
    request = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": form}]}
    body = msgspec.json.encode(request)
    sent, result = plan("/v1/chat/completions", body)
    assert result["groups"] == 1
    assert result.get("kept_labels") == {"referenced": 1}
    forwarded = texts(sent)[0]
    assert sorted(forwarded) == sorted(system)
    labels_before, labels_after = label_contents(system, forwarded)
    assert labels_after == labels_before
