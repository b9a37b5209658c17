"""Multi-turn dedup (ContextPilot /deduplicate semantics)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.dedup import DEFAULT_HINT_TEMPLATE, ConversationTracker, render_hint


def test_first_turn_is_all_new() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    result = tracker.deduplicate("t1", [1, 2, 3])
    assert result.is_new_conversation and result.turn_number == 1
    assert result.new_docs == result.deduplicated_docs == [1, 2, 3]
    assert result.overlapping_docs == [] and result.reference_hints == []


def test_chain_overlap_and_default_hints() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    tracker.deduplicate("t1", [1, 2])
    tracker.deduplicate("t2", [2, 3], parent_request_id="t1")
    result = tracker.deduplicate("t3", [3, 4, 1], parent_request_id="t2")
    assert not result.is_new_conversation and result.turn_number == 3
    assert result.overlapping_docs == [3, 1] and result.new_docs == [4]
    assert result.original_docs == [3, 4, 1]
    assert result.reference_hints == [
        "Please refer to [Doc 3] from the previous conversation turn.",
        "Please refer to [Doc 1] from the previous conversation turn.",
    ]


def test_template_placeholders_name_the_turn_and_request_that_first_sent_the_doc() -> None:
    tracker: ConversationTracker[str] = ConversationTracker()
    tracker.deduplicate("a", ["x"])
    tracker.deduplicate("b", ["y"], parent_request_id="a")
    result = tracker.deduplicate("c", ["x", "y"], "b", "see {doc_id} (turn {turn_number}, {source_request})")
    assert result.reference_hints == ["see x (turn 1, a)", "see y (turn 2, b)"]


def test_templates_are_not_str_format() -> None:
    hint = render_hint("{doc_id.__class__} {other} {{doc_id}} {doc_id}", 5, 1, "r")
    assert hint == "{doc_id.__class__} {other} {doc_id} 5"
    assert render_hint(DEFAULT_HINT_TEMPLATE, "d", 1, "r") == (
        "Please refer to [Doc d] from the previous conversation turn."
    )


def test_unknown_or_forgotten_parent_starts_a_new_conversation() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    tracker.deduplicate("t1", [1])
    assert tracker.deduplicate("x", [1], parent_request_id="missing").is_new_conversation
    assert tracker.clear("t1") and not tracker.clear("t1")
    result = tracker.deduplicate("t2", [1], parent_request_id="t1")
    assert result.is_new_conversation and result.new_docs == [1]


def test_clearing_an_ancestor_keeps_descendants_history() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    tracker.deduplicate("t1", [1])
    tracker.deduplicate("t2", [2], parent_request_id="t1")
    tracker.clear("t1")
    assert tracker.deduplicate("t3", [1, 2, 3], parent_request_id="t2").overlapping_docs == [1, 2]


def test_branches_do_not_see_each_other() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    tracker.deduplicate("root", [1])
    tracker.deduplicate("left", [2], parent_request_id="root")
    right = tracker.deduplicate("right", [2, 1], parent_request_id="root")
    assert right.overlapping_docs == [1] and right.new_docs == [2]


def test_duplicates_within_a_turn_are_both_new() -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    tracker.deduplicate("t1", [1])
    result = tracker.deduplicate("t2", [2, 2, 1], parent_request_id="t1")
    assert result.new_docs == [2, 2] and result.overlapping_docs == [1]


def test_bounded_lru() -> None:
    tracker: ConversationTracker[int] = ConversationTracker(max_requests=3)
    for number in range(10):
        tracker.deduplicate(f"t{number}", [number], parent_request_id=f"t{number - 1}" if number else None)
    assert len(tracker) == 3
    assert "t9" in tracker and "t0" not in tracker
    assert tracker.deduplicate("next", [0, 9], parent_request_id="t9").overlapping_docs == [0, 9]
    tracker.reset()
    assert len(tracker) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 12), max_size=6), min_size=1, max_size=12))
def test_matches_a_chain_walk(turns: list[list[int]]) -> None:
    tracker: ConversationTracker[int] = ConversationTracker()
    sent: set[int] = set()
    for number, docs in enumerate(turns):
        result = tracker.deduplicate(f"t{number}", docs, parent_request_id=f"t{number - 1}" if number else None)
        assert result.overlapping_docs == [doc for doc in docs if doc in sent]
        assert result.new_docs == [doc for doc in docs if doc not in sent]
        assert result.turn_number == number + 1 == tracker.turn_number(f"t{number}")
        sent.update(docs)
