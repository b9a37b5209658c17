"""Hostile texts for the detectors: cost bounded by the size of each candidate group, a deadline that stops them,
and label rules that keep meaning (identifiers are never renumbered, tags that do not pair leave groups alone).

Cost is checked by counting the characters the line scanners are asked to read (deterministic), not by timing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.planning.intercept import BudgetExceeded, deadline_in, find_groups, splice
from gateway.planning.intercept import lines as lines_module

PARIS = "Paris is the capital and most populous city of France, on the Seine."
BERLIN = "Berlin is the capital and largest city of Germany, on the Spree."
MADRID = "Madrid is the capital and most populous city of Spain, in the centre."
PROSE = "ordinary words in a line of prose\n" * 6_000


class _Counting:
    """Stands in for a compiled pattern and adds up the length of every range it is asked to scan."""

    def __init__(self, pattern: re.Pattern[str], tally: list[int]) -> None:
        self._pattern = pattern
        self._tally = tally

    def _count(self, text: str, pos: int, endpos: int | None) -> None:
        self._tally[0] += min(len(text), len(text) if endpos is None else endpos) - pos

    def search(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        self._count(text, pos, endpos)
        return self._pattern.search(text, pos, len(text) if endpos is None else endpos)

    def finditer(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        self._count(text, pos, endpos)
        return self._pattern.finditer(text, pos, len(text) if endpos is None else endpos)


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    tally = [0]
    for name in ("_PARAGRAPH", "_SOFT_LINE", "_HARD_LINE", "_BLANK"):
        monkeypatch.setattr(lines_module, name, _Counting(getattr(lines_module, name), tally))
    return tally


def _read_for(text: str, scanned: list[int]) -> int:
    scanned[0] = 0
    find_groups(text)
    return scanned[0]


def test_many_numbering_styles_are_not_each_read_to_the_end(scanned: list[int]) -> None:
    head = "".join(f"Doc{' ' * s}1: some text here\nDoc{' ' * s}2: more text here\n" for s in range(1, 301))
    short, long = head + PROSE, head + PROSE * 5
    # before: every style's last item was read to the end of the text, 300 times the added prose
    assert _read_for(long, scanned) - _read_for(short, scanned) < 4 * (len(long) - len(short))


def test_many_separator_lines_are_not_each_read_to_the_end(scanned: list[int]) -> None:
    parts = [f"document text number {k} with enough characters\n{'-' * (3 + k)}\n" for k in range(200)]
    head = "Here are the retrieved documents:\n" + "".join(parts) + "".join(parts)
    short, long = head + PROSE, head + PROSE * 5
    assert _read_for(long, scanned) - _read_for(short, scanned) < 4 * (len(long) - len(short))


def test_a_long_last_item_is_left_in_the_tail_not_guessed() -> None:
    text = f"Sources:\n[1] {PARIS}\n[2] {BERLIN}\n[3] {MADRID}\n" + PROSE
    group = find_groups(text)[0]
    assert len(group) == 2  # the third item's end lies far beyond what two one-line items justify


def test_a_passed_deadline_stops_detection() -> None:
    text = f"Sources:\n[1] {PARIS}\n[2] {BERLIN}\n[3] {MADRID}\n\nQuestion: which?"
    assert find_groups(text, deadline=deadline_in(60))
    with pytest.raises(BudgetExceeded):
        find_groups(text, deadline=deadline_in(-1))


# --------------------------------------------------------------------------------------------- label rules


def test_article_numbers_stay_with_their_articles() -> None:
    text = f"Context:\nArticle 12: {PARIS}\nArticle 13: {BERLIN}\nArticle 14: {MADRID}\n\nQuestion: which?"
    group = find_groups(text)[0]
    assert group.number_base is None
    moved = splice(text, group, [2, 1, 0])
    assert f"Article 14: {MADRID}" in moved
    assert f"Article 12: {PARIS}" in moved


@pytest.mark.parametrize("style", ["## Document {} annual report\n", "Document {}:\n"])
def test_years_are_never_renumbered(style: str) -> None:
    body = "".join(
        style.format(year) + doc + "\n\n" for year, doc in zip((2021, 2022, 2023), (PARIS, BERLIN, MADRID), strict=True)
    )
    text = "Sources:\n" + body + "Question: which?"
    for group in find_groups(text):
        assert group.number_base is None
        moved = splice(text, group, list(reversed(range(len(group)))))
        for year, doc in zip((2021, 2022, 2023), (PARIS, BERLIN, MADRID), strict=True):
            assert style.format(year) + doc in moved


def test_positions_counted_from_one_are_still_renumbered() -> None:
    text = f"Sources:\nDocument 1: {PARIS}\nDocument 2: {BERLIN}\nDocument 3: {MADRID}\n\nQuestion: which?"
    group = find_groups(text)[0]
    assert group.number_base == 1
    assert splice(text, group, [2, 1, 0]).startswith(f"Sources:\nDocument 1: {MADRID}")


def test_an_index_quoted_inside_another_attribute_is_not_the_index() -> None:
    text = (
        f"""<documents><document title="see index='1'" index="2">{PARIS}</document>"""
        f"""<document title="x" index="3">{BERLIN}</document></documents>"""
    )
    group = find_groups(text)[0]
    assert group.number_base == 2
    moved = splice(text, group, [1, 0])
    assert f"""<document title="see index='1'" index="3">{PARIS}""" in moved
    assert f"""<document title="x" index="2">{BERLIN}""" in moved


def test_an_index_only_inside_another_attribute_is_no_index() -> None:
    text = (
        f"""<documents><document title="index='1'">{PARIS}</document>"""
        f"""<document title="index='2'">{BERLIN}</document></documents>"""
    )
    group = find_groups(text)[0]
    assert group.number_base is None
    assert "index='1'\">" + BERLIN not in splice(text, group, [1, 0])


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_document_that_mentions_its_own_tag_is_not_cut(wrapped: bool) -> None:
    docs = f"<document>In DocBook, the <document> element wraps a whole book.</document>\n<document>{BERLIN}</document>"
    text = f"<documents>{docs}</documents>\nQuestion?" if wrapped else f"{docs}\nQuestion?"
    assert find_groups(text) == []


def test_cleanly_nested_tags_still_group() -> None:
    text = f"<documents><document>{PARIS} <b>bold</b></document>\n<document>{BERLIN}</document></documents>"
    assert len(find_groups(text)[0]) == 2
