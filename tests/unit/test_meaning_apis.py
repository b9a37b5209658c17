"""Meaning kept on ``/v1/messages`` and ``/v1/responses``: whole requests run through the planner.

Each ``tests/fixtures/prompts/meaning/apis/<name>.json`` has the shape of the chat fixtures
(``tests/unit/test_meaning_fixtures.py``): ``identical`` (forwarded byte for byte), ``labels`` (a text group moved
with every label still naming its content) or ``reordered`` (positive controls: the same blocks, nothing refers to
them, and they move), with the decisions ``X-Prefixgate-Result`` must report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.metrics import Metrics
from gateway.planning.intercept.meaning import Decision, RequestCues, scan
from gateway.planning.planner import Planner
from gateway.planning.residency import Residency
from gateway.planning.units import decide_run
from gateway.settings import load_settings
from tests.unit.test_meaning_fixtures import label_contents, plan, plan_warm, run

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prompts" / "meaning" / "apis"
CASES = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(FIXTURES.glob("*.json"))}
_TEXT_FIELDS = {"text", "content", "system", "instructions", "output", "data", "input"}


def texts(value: Any, into: list[str] | None = None, name: str = "") -> list[str]:
    """Every string a Messages or Responses body holds where a text may sit, in order."""
    out = [] if into is None else into
    if isinstance(value, str) and name in _TEXT_FIELDS:
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            texts(item, out, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            texts(item, out, key)
    return out


def canonical(value: Any) -> Any:
    """The body with every list sorted: equal for two bodies that differ only in the order of list items."""
    if isinstance(value, dict):
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted((canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
    return value


def test_both_routes_have_negative_fixtures_and_positive_controls() -> None:
    for route in ("/v1/messages", "/v1/responses"):
        cases = [case for case in CASES.values() if case["route"] == route]
        assert sum(case["expect"] != "reordered" for case in cases) >= 5
        assert any(case["expect"] == "reordered" for case in cases)
    assert sum(case["expect"] != "reordered" for case in CASES.values()) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_keeps_its_meaning(name: str) -> None:
    case = CASES[name]
    body = msgspec.json.encode(case["request"])
    sent, result = plan(case["route"], body)
    assert result["groups"] >= 1, "the fixture must hold a group or a run, or it proves nothing"
    for key in ("kept_labels", "left_alone", "mapped"):
        assert result.get(key, {}) == case["header"].get(key, {}), key
    if case["expect"] == "identical":
        assert sent == body
        return
    if sent == body and result.get("kept_labels"):
        # labels kept: moving the blocks gains nothing on a cold index, so they stay; they move once it wins
        assert result["reordered"] is False
        sent, result = plan_warm(case["route"], body)
        for key in ("kept_labels", "left_alone", "mapped"):
            assert result.get(key, {}) == case["header"].get(key, {}), key
    assert sent != body, "the blocks must move for the fixture to test anything"
    assert result["reordered"] is True
    before, after = json.loads(body), json.loads(sent)
    if case["expect"] == "reordered":
        assert canonical(after) == canonical(before)  # only moved
        return
    checked = 0
    for original, rewritten in zip(texts(before), texts(after), strict=True):
        labels_before, labels_after = label_contents(original, rewritten)
        if labels_before:
            checked += 1
            assert sorted(rewritten) == sorted(original) and labels_after == labels_before
    assert checked


def test_a_question_in_a_later_turn_stops_the_documents_moving_and_the_memo_does_not_hide_it() -> None:
    """Turn 1 moves the documents; turn 2 asks about "document 3": the client's order; turn 3 is turn 1 again."""
    planner = Planner(load_settings(environ={}), Residency(max_requests=100, stateless=False), Metrics())
    request = CASES["control_msg_documents"]["request"]
    content = request["messages"][0]["content"]

    def turn(question: str) -> tuple[bytes, dict[str, Any]]:
        body = {
            **request,
            "messages": [{"role": "user", "content": [*content[:-1], {"type": "text", "text": question}]}],
        }
        return run(planner, "/v1/messages", msgspec.json.encode(body))

    first, result1 = turn("Which landmark is in Spain?")
    assert result1["reordered"] is True
    second, result2 = turn("What does document 3 say?")
    assert result2["left_alone"] == {"referenced": 1} and result2["reordered"] is False
    assert json.loads(second)["messages"][0]["content"][:4] == content[:4]
    third, _ = turn("Which landmark is in Spain?")
    assert third == first


def cues_of(*texts: str) -> Any:
    return RequestCues((i, scan(text)) for i, text in enumerate(texts)).others(None)


UNITS = [msgspec.json.encode({"type": "document", "source": {"type": "text", "data": f"Text {i}."}}) for i in range(4)]


@pytest.mark.parametrize(
    ("question", "first", "expected"),
    [
        ("Which is tallest?", 0, Decision("renumber")),
        ("What does document 3 say?", 0, Decision("leave_alone", "referenced")),
        ("What does document 3 say?", 4, Decision("leave_alone", "referenced")),  # a later run moves under it
        ("What does document 9 say?", 0, Decision("renumber")),  # past the run: the run's order is not named
        ("Compare the last two documents.", 0, Decision("leave_alone", "referenced")),
        ("Cite them as [n].", 0, Decision("leave_alone", "cite_by_position")),
        ("Cite the document ids you use.", 0, Decision("leave_alone", "cite_by_position")),
        ("They are listed in chronological order.", 0, Decision("leave_alone", "chronological")),
    ],
)
def test_run_decisions(question: str, first: int, expected: Decision) -> None:
    assert decide_run(UNITS, cues_of("Answer from the documents.", question), first) == expected


def test_a_run_cited_by_id_moves_only_when_every_block_names_itself() -> None:
    titled = [msgspec.json.encode({**msgspec.json.decode(unit), "title": f"t{i}"}) for i, unit in enumerate(UNITS)]
    cues = cues_of("Cite the document ids you use.")
    assert decide_run(titled, cues) == Decision("renumber")
    assert decide_run([*titled[:3], UNITS[3]], cues) == Decision("leave_alone", "cite_by_position")


def test_search_results_dated_in_order_stay_in_order() -> None:
    def result(day: str) -> bytes:
        return msgspec.json.encode({"type": "search_result", "source": "s", "title": f"{day} notes",
                                    "content": [{"type": "text", "text": "Minutes of the meeting."}]})  # fmt: skip

    dated = [result(day) for day in ("Monday", "Tuesday", "Wednesday")]
    assert decide_run(dated, cues_of("What changed?")) == Decision("leave_alone", "chronological")
    shuffled = [dated[1], dated[0], dated[2]]
    assert decide_run(shuffled, cues_of("What changed?")) == Decision("renumber")


def test_past_the_budget_no_run_moves() -> None:
    """The texts could not all be read: nothing is known to be safe, so the documents go out as sent."""
    settings = load_settings(environ={}, intercept_budget_ms=0.000001)
    planner = Planner(settings, Residency(max_requests=100, stateless=False), Metrics())
    request = dict(CASES["control_msg_documents"]["request"])
    request["system"] = "Sources:\n" + "\n".join(f"[{i}] Landmark note {i} " + "word " * 400 for i in range(1, 5))
    body = msgspec.json.encode(request)
    sent, result = run(planner, "/v1/messages", body)
    assert result["skipped"] == "budget" and sent == body


_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth"]
_WORDS = ["tower", "bell", "river", "bridge", "castle", "museum", "harbour", "garden", "market", "library"]


@settings(max_examples=40, deadline=None)
@given(
    words=st.lists(st.lists(st.sampled_from(_WORDS), min_size=6, max_size=12), min_size=2, max_size=6, unique_by=tuple),
    place=st.sampled_from(["question", "system", "assistant", "later_turn", "tool_result"]),
    data=st.data(),
)
def test_any_document_named_anywhere_in_a_messages_request_keeps_every_block_in_place(
    words: list[list[str]], place: str, data: Any
) -> None:
    docs = [{"type": "document", "source": {"type": "text", "media_type": "text/plain",
             "data": " ".join(ws).capitalize() + "."}} for ws in words]  # fmt: skip
    k = data.draw(st.integers(1, len(docs)))
    reference = data.draw(st.sampled_from([f"What does document {k} say?", f"Summarize the {_ORDINALS[k - 1]} "
                                           "document only.", f"Is [{k}] right?", "Compare the last two documents."]))  # fmt: skip
    question = reference if place == "question" else "Which one is about water?"
    request: dict[str, Any] = {"model": "m", "max_tokens": 8, "system": reference if place == "system" else "Hi."}
    if place == "tool_result":
        tool = {"type": "tool_result", "tool_use_id": "t", "content": docs}
        turn = [{"role": "user", "content": [tool, {"type": "text", "text": question}]}]
        request["messages"] = [{"role": "user", "content": "Search."},
                               {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "s",
                                                                  "input": {}}]}, *turn]  # fmt: skip
        request["system"] = reference
    else:
        request["messages"] = [{"role": "user", "content": [*docs, {"type": "text", "text": question}]}]
    if place in ("assistant", "later_turn"):
        said = reference if place == "assistant" else "Here is what I found."
        asked = reference if place == "later_turn" else "Go on."
        request["messages"] += [{"role": "assistant", "content": said}, {"role": "user", "content": asked}]
    body = msgspec.json.encode(request)
    sent, result = plan("/v1/messages", body)
    assert sent == body
    assert result["left_alone"] == {"referenced": 1}
