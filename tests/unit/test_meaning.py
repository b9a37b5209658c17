"""The cues of one text and the decisions they lead to (the fixtures in test_meaning_fixtures run whole requests)."""

from __future__ import annotations

import pytest

from gateway.planning.intercept import find_groups
from gateway.planning.intercept.meaning import Decision, RequestCues, decide, decide_request, scan

SOURCES = (
    "Sources:\n"
    "[1] The Eiffel Tower in Paris was completed in 1889 for the World's Fair.\n"
    "[2] The Colosseum in Rome is an oval amphitheatre in the centre of the city.\n"
    "[3] Big Ben is the nickname of the Great Bell of the clock at Westminster.\n"
)


def _decide(question: str, text: str = SOURCES, *, mapping: bool = False) -> Decision:
    cues = RequestCues([(0, scan(text, labels=mapping)), (1, scan(question, labels=mapping))])
    [decision] = decide(text, find_groups(text), cues.others(0), mapping=mapping)
    return decision


@pytest.mark.parametrize(
    ("question", "action", "reason"),
    [
        ("Which is the oldest?", "renumber", ""),
        ("Think step by step and answer in order to be precise.", "renumber", ""),
        ("Use the following documents and the above context.", "renumber", ""),
        ("In 1889 [2023] the first time I went there.", "renumber", ""),
        ("What does source [3] say?", "keep_labels", "referenced"),
        ("Is source 2 right?", "keep_labels", "referenced"),
        ("Compare [1][3].", "keep_labels", "referenced"),
        ("What about document #2?", "keep_labels", "referenced"),
        ("see doc2 and Result No. 1", "keep_labels", "referenced"),
        ("the third source is wrong", "leave_alone", "referenced"),
        ("And what does the second one say?", "leave_alone", "referenced"),
        ("What does [4] say?", "renumber", ""),
        ("Summarize the second result.", "leave_alone", "referenced"),
        ("Cite them as [n].", "keep_labels", "cite_by_number"),
        ("Cite them as [n], e.g. [1] or [2].", "keep_labels", "cite_by_number"),
        ("The results are ranked by relevance.", "leave_alone", "ranked"),
        ("They are in reverse chronological order.", "leave_alone", "chronological"),
    ],
)
def test_decision_from_another_message(question: str, action: str, reason: str) -> None:
    assert _decide(question) == Decision(action, reason)  # type: ignore[arg-type]


def test_citation_mapping_maps_only_unambiguous_cite_by_number_groups() -> None:
    assert _decide("Cite them as [n].", mapping=True) == Decision("map", "cite_by_number")
    assert _decide("What does [2] say? Cite them as [n].", mapping=True) == Decision("keep_labels", "referenced")
    other_list = "Earlier results:\n[1] something else entirely here.\n[2] and another thing entirely.\nCite as [n]."
    assert _decide(other_list, mapping=True) == Decision("keep_labels", "cite_by_number")


def test_references_inside_the_group_itself_do_not_count() -> None:
    text = SOURCES.replace("World's Fair.", "World's Fair, as [2] notes.")
    assert _decide("Which is the oldest?", text) == Decision("renumber")
    assert _decide("Which is the oldest?", text + "\nWhich agrees with [2]?") == Decision("keep_labels", "referenced")


def test_labels_are_not_references() -> None:
    cues = scan("Document 1: alpha\nDocument 2: beta\n[3] gamma\n## Source 4\nSummarize Document 1 only.")
    assert [(kind, value) for kind, value, _ in cues.found] == [("num", 1)]


def test_dates_in_order_and_steps_are_read_from_the_blocks() -> None:
    dated = "Sources:\n" + "\n".join(
        f"[{i}] {day} 09:00 note number {i} about the budget review meeting."
        for i, day in enumerate(("Mon", "Tue", "Wed"), 1)
    )
    assert _decide("What happened?", dated) == Decision("leave_alone", "chronological")
    shuffled = dated.replace("Mon", "Xxx").replace("Tue", "Mon").replace("Xxx", "Tue")  # Tue, Mon, Wed
    assert _decide("What happened?", shuffled) == Decision("renumber")
    steps = "Sources:\n" + "\n".join(
        f"[{i}] {word}, do the {i}th thing described in the repair manual."
        for i, word in enumerate(("First", "Then", "Finally"), 1)
    )
    assert _decide("How?", steps) == Decision("leave_alone", "steps")
    assert _decide("How?", "Follow these steps:\n" + SOURCES) == Decision("leave_alone", "steps")
    for lead in ("Think step by step.\nInstructions: answer from the sources.\n\n", "Follow these steps.\n\nA.\nB.\n"):
        assert _decide("How?", lead + SOURCES) == Decision("renumber")


def test_the_signature_ignores_own_cues_and_order() -> None:
    def cues(*texts: tuple[int, str]) -> RequestCues:
        return RequestCues((key, scan(text)) for key, text in texts)

    a = cues((0, SOURCES), (1, "What does [2] say?"), (2, "and [3]?"))
    b = cues((0, SOURCES), (2, "and [3]?"), (1, "What does [2] say?"))
    assert a.others(0).signature == b.others(0).signature
    assert a.others(0).signature != cues((0, SOURCES), (1, "Hi")).others(0).signature
    assert cues((0, SOURCES), (1, "Hi")).others(0).signature == b""


def test_skipped_spans_are_not_read() -> None:
    text = "Rank them.\n[1] a document ranked by relevance to the topic.\nWhat does [2] say?"
    assert {kind for kind, _, _ in scan(text).found} == {"ranked", "num"}
    start = text.index("[1]")
    assert {kind for kind, _, _ in scan(text, skip=[(start, text.index("\nWhat"))]).found} == {"num"}


def test_decide_request_reads_every_text() -> None:
    texts = {"system": SOURCES, "tool": "Search results:\n" + SOURCES.split("\n", 1)[1], "user": "Is [2] right?"}
    groups = {key: find_groups(text) for key, text in texts.items()}
    decisions = decide_request(texts, groups)
    assert set(decisions) == {"system", "tool"}
    assert decisions["system"] == decisions["tool"] == [Decision("keep_labels", "referenced")]
    assert decide_request({**texts, "user": "Which?"}, groups) == {"system": [Decision("renumber")],
                                                                    "tool": [Decision("renumber")]}  # fmt: skip


def test_citing_by_id_moves_blocks_that_carry_their_id() -> None:
    def xml(with_ids: bool) -> str:
        head = '<document id="d{i}">' if with_ids else "<document>"
        items = "\n".join(head.format(i=i) + f"{doc}</document>" for i, doc in enumerate(SOURCES.splitlines()[1:]))
        return f"<documents>\n{items}\n</documents>"

    def decision(system: str, docs: str) -> Decision:
        return decide_request({"s": system, "u": docs}, {"u": find_groups(docs)})["u"][0]

    assert decision("Cite document ids.", xml(True)) == Decision("renumber")
    assert decision("Cite document ids.", xml(False)) == Decision("leave_alone", "cite_by_position")
    assert decision("Cite each claim as [doc_id].", SOURCES) == Decision("keep_labels", "cite_by_number")
    assert decision("Cite them by number.", xml(True)) == Decision("leave_alone", "cite_by_position")


UNNUMBERED = "Docs:\n" + "\n".join(f"<document>Landmark {n} stands in a city.</document>" for n in range(4))


@pytest.mark.parametrize(
    ("question", "positions"),
    [
        ("What does the first document say?", {1}),
        ("Compare the last two results.", {-1, -2}),
        ("Summarize the first three retrieved documents and the penultimate one.", {1, 2, 3, -2}),
        ("Is the 2nd source right?", {2}),
        ("What does [2] say?", {2}),  # an unnumbered group: the number can only be a position
        ("Read the first few documents.", None),  # positions not told
    ],
)
def test_a_reference_by_position_carries_the_positions(question: str, positions: set[int] | None) -> None:
    decision = _decide(question, UNNUMBERED)
    assert (decision.action, decision.reason) == ("leave_alone", "referenced")
    assert decision.positions == (frozenset(positions) if positions is not None else None)


def test_labels_referenced_in_a_numbered_group_carry_no_positions() -> None:
    """A numbered group's "[2]" names a label, and "the first source" a position among labelled ones: which block
    an earlier order put there is not told by the positions alone."""
    assert _decide("the first source is wrong").positions is None
