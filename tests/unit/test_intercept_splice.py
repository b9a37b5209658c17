"""Splicing semantics: positional gaps, renumbering, several groups, block keys, relevance annotation."""

from __future__ import annotations

import json

import pytest

from gateway.planning.intercept import Block, BlockGroup, NumberSpan, find_groups, relevance_line, splice, splice_all

DOCS = [
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital and largest city of Germany.",
    "Madrid is the capital and most populous city of Spain.",
]


def numbered(order: list[int], start: int = 1, gaps: tuple[str, str] = ("\n", "\n\n")) -> str:
    items = [f"[{start + pos}] {DOCS[index]}" for pos, index in enumerate(order)]
    return f"Sources:\n{items[0]}{gaps[0]}{items[1]}{gaps[1]}{items[2]}\n\nQuestion: which?"


def test_gaps_stay_in_place_and_numbers_follow_positions() -> None:
    text = numbered([0, 1, 2])
    (group,) = find_groups(text)
    assert splice(text, group, [2, 0, 1]) == numbered([2, 0, 1])
    assert splice(text, group, [0, 1, 2]) == text


def test_same_block_renders_identically_whatever_its_original_number() -> None:
    first = numbered([0, 1, 2])
    second = numbered([2, 1, 0])
    (g1,) = find_groups(first)
    (g2,) = find_groups(second)
    assert sorted(g1.keys(first)) == sorted(g2.keys(second))
    # the scheduler picks the same canonical order (by key) for both requests
    canonical_1 = sorted(range(3), key=lambda i: g1.blocks[i].key(first))
    canonical_2 = sorted(range(3), key=lambda i: g2.blocks[i].key(second))
    assert splice(first, g1, canonical_1) == splice(second, g2, canonical_2)


def test_key_and_content() -> None:
    text = numbered([0, 1, 2], start=9)
    (group,) = find_groups(text)
    block = group.blocks[1]
    assert block.number == NumberSpan(text.index("[10]") + 1, text.index("[10]") + 3, 10)
    assert block.key(text) == f"[] {DOCS[1]}"
    assert block.content(text) == DOCS[1]
    assert block.render(text) == f"[10] {DOCS[1]}"
    assert block.render(text, 1) == f"[1] {DOCS[1]}"
    assert group.preamble(text) == "Sources:\n"
    assert group.tail(text) == "\n\nQuestion: which?"
    assert group.gaps(text) == ["\n", "\n\n"]


@pytest.mark.parametrize("order", [[0, 1], [0, 1, 1], [0, 1, 3], [2, 1, 0, 3], []])
def test_invalid_orders_are_rejected(order: list[int]) -> None:
    text = numbered([0, 1, 2])
    (group,) = find_groups(text)
    with pytest.raises(ValueError, match="permutation"):
        splice(text, group, order)


def test_splice_all_rewrites_several_groups_and_rejects_overlaps() -> None:
    xml = "\n".join(f"<doc>{doc}</doc>" for doc in DOCS)
    text = f"{xml}\n\nMore:\n{numbered([0, 1, 2])}"
    xml_group, numbered_group = find_groups(text)
    out = splice_all(text, [(numbered_group, [2, 1, 0]), (xml_group, [1, 2, 0])])
    # the later group first, so the earlier group's spans still hold
    assert out == splice(splice(text, numbered_group, [2, 1, 0]), xml_group, [1, 2, 0])
    assert out.startswith(f"<doc>{DOCS[1]}</doc>\n<doc>{DOCS[2]}</doc>\n<doc>{DOCS[0]}</doc>")
    with pytest.raises(ValueError, match="overlap"):
        splice_all(text, [(xml_group, [0, 1, 2]), (xml_group, [0, 1, 2])])


def test_handmade_group_with_numbers_not_starting_at_one() -> None:
    text = "a=7;b=8;"
    group = BlockGroup(
        "numbered",
        "x=#",
        (Block(0, 3, 2, 3, NumberSpan(2, 3, 7)), Block(4, 7, 6, 7, NumberSpan(6, 7, 8))),
        7,
        7,
    )
    assert splice(text, group, [1, 0]) == "b=7;a=8;"
    assert group.keys(text) == ["a=", "b="]


def test_relevance_line_in_the_group_numbering() -> None:
    text = numbered([0, 1, 2])
    (group,) = find_groups(text)
    # the most relevant document (originally first) now sits at position 2 and is labelled [2]
    assert relevance_line(group, [2, 0, 1]) == "Relevance order: [2] > [3] > [1]"
    docs = "Documents:\n" + "\n".join(f"Document {i + 1}: {doc}" for i, doc in enumerate(DOCS)) + "\n\nQ?"
    (labelled,) = find_groups(docs)
    assert relevance_line(labelled, [1, 2, 0]) == "Relevance order: Document 3 > Document 1 > Document 2"
    xml = "<docs>\n" + "\n".join(f"<doc>{doc}</doc>" for doc in DOCS) + "\n</docs>\nQ?"
    (unnumbered,) = find_groups(xml)
    assert relevance_line(unnumbered, [1, 2, 0]) == "Relevance order (by position): 3 > 1 > 2"


def test_annotation_goes_after_the_group_or_its_wrapper_and_only_when_reordered() -> None:
    text = numbered([0, 1, 2])
    (group,) = find_groups(text)
    assert splice(text, group, [0, 1, 2], annotate=True) == text
    out = splice(text, group, [2, 0, 1], annotate=True)
    assert out == numbered([2, 0, 1]).replace("\n\nQuestion", "\nRelevance order: [2] > [3] > [1]\n\nQuestion")
    xml = "<docs>\n" + "\n".join(f"<doc>{doc}</doc>" for doc in DOCS) + "\n</docs>\nQ?"
    (wrapped,) = find_groups(xml)
    assert splice(xml, wrapped, [1, 2, 0], annotate=True).endswith(
        "</doc>\n</docs>\nRelevance order (by position): 3 > 1 > 2\nQ?"
    )


def test_json_groups_are_never_annotated() -> None:
    text = json.dumps({"results": [{"t": doc} for doc in DOCS]})
    (group,) = find_groups(text)
    out = splice(text, group, [2, 1, 0], annotate=True)
    assert json.loads(out)["results"] == [{"t": doc} for doc in reversed(DOCS)]


def test_renumber_false_keeps_numbers_on_their_blocks() -> None:
    text = numbered([0, 1, 2])
    (group,) = find_groups(text)
    out = splice(text, group, [2, 0, 1], renumber=False)
    assert out == f"Sources:\n[3] {DOCS[2]}\n[1] {DOCS[0]}\n\n[2] {DOCS[1]}\n\nQuestion: which?"
    assert relevance_line(group, [2, 0, 1], renumber=False) == "Relevance order: [1] > [2] > [3]"
    assert splice(text, group, [2, 0, 1], renumber=False, annotate=True).endswith(
        f"[2] {DOCS[1]}\nRelevance order: [1] > [2] > [3]\n\nQuestion: which?"
    )


def test_one_edit_keeps_its_labels_while_another_is_renumbered() -> None:
    """Per-edit ``(group, order, renumber)``: a referenced list moves with its labels, the other is renumbered."""
    text = numbered([0, 1, 2]) + "\n\nContext:\n" + numbered([0, 1, 2]).removeprefix("Sources:\n")
    first, second = find_groups(text)
    out = splice_all(text, [(first, [2, 0, 1], False), (second, [2, 0, 1])])
    kept, renumbered = out.split("\n\nContext:\n")
    assert kept == numbered([0, 1, 2]).replace(f"[1] {DOCS[0]}\n[2] {DOCS[1]}\n\n[3] {DOCS[2]}",
                                               f"[3] {DOCS[2]}\n[1] {DOCS[0]}\n\n[2] {DOCS[1]}")  # fmt: skip
    assert renumbered == numbered([2, 0, 1]).removeprefix("Sources:\n")
    assert splice_all(text, [(first, [2, 0, 1], True)], renumber=False) == splice(text, first, [2, 0, 1])


def test_annotation_keeps_the_following_text_on_its_own_line() -> None:
    xml = "<docs>" + "".join(f"<doc>{doc}</doc>" for doc in DOCS) + "</docs>Question?"
    (group,) = find_groups(xml)
    out = splice(xml, group, [2, 1, 0], annotate=True)
    assert out.endswith("</docs>\nRelevance order (by position): 3 > 2 > 1\nQuestion?")
