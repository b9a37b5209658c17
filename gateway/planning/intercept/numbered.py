"""Numbered items at line starts: ``[1] ...``, ``1. ...``, ``Document 1:``, ``Doc 1:``, ``Source [1]:``,
``Passage 1 (title):``, ``[Doc 1]``.

A marker counts only at the very start of a line and outside fenced code, so citations in prose ("as [1] and
[2] show") are never markers. Markers of one shape (the *style*: the marker with its number replaced by ``#``)
must count up by one; a style that holds several runs (several lists) is accepted only when each list starts
at 0 or 1, which rejects lists whose numbering jumps. Items must look like documents: ``[N]`` items carry at
least 20 characters; ``N.`` and ``N)`` items, the usual shape of instructions and steps, carry at least 40 and
must follow a line that introduces retrieved content (``Sources:``, ``Here are the search results:``) unless
the caller asked for this format explicitly. A ``[N]`` list is left alone when the text around it cites its
numbers in prose (not at a line start) three times or more, or when it sits under a ``References`` heading:
renumbering would break those citations.

Numbers are rewritten by position only when they are positions: the run counts up by one from its first label
and is not an identifier scheme. Article numbers (``Article 12:``) and year-like numbers (1000 and above:
``Document 2021:``) name their item, so such a group keeps each label attached to its item (``number_base`` is
``None`` and the label is part of the block's identity).

Each item runs to the next marker of its run; the last one ends by the rule in :mod:`gateway.planning.intercept.lines`,
and is left out of the group when that rule finds its end ambiguous.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from itertools import pairwise
from typing import NamedTuple

from gateway.planning.intercept.budget import check
from gateway.planning.intercept.groups import Block, BlockGroup, NumberSpan
from gateway.planning.intercept.lines import LinePattern, context_cue_before, last_end, rstrip_end, shape_of
from gateway.planning.intercept.regions import Spans

__all__ = ["FIRST_IDENTIFIER", "find_numbered_groups"]

_NUM = r"0|[1-9]\d{0,5}"
# document words in lower, Title and UPPER case, written as a trie: an alternation of fourteen case-insensitive
# words costs more than the rest of the line scan put together
_WORDS = (
    r"(?:[Dd]oc(?:ument)?|[Ss](?:ource|nippet|earch result)|[Pp]assage|[Cc](?:hunk|ontext)|[Rr]e(?:sult|ference)"
    r"|[Ee](?:xcerpt|vidence)|[Aa]rticle|[Mm]emory|DOC(?:UMENT)?|S(?:OURCE|NIPPET|EARCH RESULT)|PASSAGE"
    r"|C(?:HUNK|ONTEXT)|RE(?:SULT|FERENCE)|E(?:XCERPT|VIDENCE)|ARTICLE|MEMORY)"
)
_MARKER = LinePattern(
    rf"\[(?P<b>{_NUM})\](?=[ \t]|\r?\n|\Z)"
    rf"|(?P<d>{_NUM})[.)](?=[ \t])"
    rf"|\[{_WORDS}[ \t]*(?P<lw>{_NUM})\](?=[ \t:]|\r?\n|\Z)"
    rf"|{_WORDS}[ \t]+(?:\[(?P<wb>{_NUM})\]|#?(?P<wn>{_NUM}))"
    r"(?=[ \t]*(?:\([^()\n]{0,200}\)[ \t]*)?(?::|\.|[ \t]+[-\u2013\u2014|][ \t]|\r?\n|\Z))",
)
_CONTENT_LEAD = re.compile(r"[ \t]*[:.]?\s*")
_CITATION = re.compile(rf"\[({_NUM})\]")
_BIBLIOGRAPHY = re.compile(
    r"(?i)^[ \t#*]*(?:references|bibliography|works cited|citations|footnotes|notes|endnotes)[ \t*:]*$",
)
_MIN_CHARS = {"b": 20, "d": 40, "lw": 8, "wb": 8, "wn": 8}
_MAX_PROSE_CITATIONS = 3
FIRST_IDENTIFIER = 1000
"""A numbering that starts at or above this is not a position (years, article and statute numbers)."""
_IDENTIFIER_WORDS = ("article",)


class _Marker(NamedTuple):
    line_start: int
    content_start: int
    number: NumberSpan
    style: str
    kind: str


def _markers(text: str, fences: Spans, claims: Spans) -> dict[str, list[_Marker]]:
    by_style: dict[str, list[_Marker]] = {}
    for line_start, match in _MARKER.finditer(text):
        if fences.contains(line_start) or claims.contains(line_start):
            continue
        kind = match.lastgroup or ""
        digits_start, digits_end = match.span(kind)
        style = f"{text[line_start:digits_start]}#{text[digits_end : match.end()]}"
        lead = _CONTENT_LEAD.match(text, match.end())
        content_start = lead.end() if lead is not None else match.end()
        number = NumberSpan(digits_start, digits_end, int(match.group(kind)))
        by_style.setdefault(style, []).append(_Marker(line_start, content_start, number, style, kind))
    return by_style


def _runs(markers: list[_Marker]) -> list[tuple[list[_Marker], int]]:
    """Split one style's markers into runs that count up by one; return each with the next marker's start."""
    runs: list[list[_Marker]] = [[markers[0]]]
    for marker in markers[1:]:
        if marker.number.value == runs[-1][-1].number.value + 1:
            runs[-1].append(marker)
        else:
            runs.append([marker])
    single = len(runs) == 1
    accepted = []
    for index, run in enumerate(runs):
        after = runs[index + 1][0] if index + 1 < len(runs) else None
        restarts = run[0].number.value <= 1 and (after is None or after.number.value <= 1)
        if len(run) >= 2 and (single or restarts):
            accepted.append((run, after.line_start if after is not None else -1))
    return accepted


def _blocks(text: str, run: list[_Marker], limit: int, fences: Spans) -> list[Block]:
    blocks = []
    for marker, following in pairwise(run):
        end = rstrip_end(text, marker.line_start, following.line_start)
        blocks.append(Block(marker.line_start, end, marker.content_start, end, marker.number))
    last = run[-1]
    spans = [(b.start, b.end) for b in blocks]
    last_stop = last_end(text, last.line_start, limit, shape_of(text, spans, fences), fences)
    if last_stop is not None and last_stop > last.content_start:
        blocks.append(Block(last.line_start, last_stop, last.content_start, last_stop, last.number))
    return blocks


def _positional(first: _Marker) -> bool:
    """Whether a run's numbers are positions a splice may rewrite, judged by its first marker."""
    style = first.style.lower()
    return first.number.value < FIRST_IDENTIFIER and not any(word in style for word in _IDENTIFIER_WORDS)


def _labels_attached(group: BlockGroup) -> BlockGroup:
    """The group with its numbers treated as part of each block: they travel with the blocks, never rewritten."""
    blocks = tuple(Block(b.start, b.end, b.content_start, b.content_end) for b in group.blocks)
    return BlockGroup(group.format, group.label, blocks, None, group.after)


def _document_like(text: str, blocks: list[Block], kind: str) -> bool:
    minimum = _MIN_CHARS[kind]
    return all(len(text[b.content_start : b.content_end].strip()) >= minimum for b in blocks)


class _Citations:
    """Where the text cites ``[N]`` in prose (not at a line start), by number; built once per text."""

    __slots__ = ("_at",)

    def __init__(self, text: str) -> None:
        self._at: dict[int, list[int]] = {}
        for match in _CITATION.finditer(text):
            at = match.start()
            if at > 0 and text[at - 1] != "\n":
                self._at.setdefault(int(match.group(1)), []).append(at)

    def around(self, group: BlockGroup) -> int:
        """Count the citations of the group's numbers outside the group."""
        low = group.number_base or 0
        cited = 0
        for value in range(low, low + len(group)):
            positions = self._at.get(value, [])
            cited += len(positions) - (bisect_left(positions, group.end) - bisect_left(positions, group.start))
        return cited


def _under_bibliography(text: str, pos: int) -> bool:
    window = text[max(0, pos - 512) : pos].rstrip()
    return _BIBLIOGRAPHY.match(window[window.rfind("\n") + 1 :]) is not None


def _accept(text: str, group: BlockGroup, kind: str, strict: bool, citations: _Citations | None) -> bool:
    if not _document_like(text, list(group.blocks), kind):
        return False
    if kind == "d" and strict and not context_cue_before(text, group.start):
        return False
    if citations is not None:
        return citations.around(group) < _MAX_PROSE_CITATIONS and not _under_bibliography(text, group.start)
    return True


def find_numbered_groups(
    text: str, fences: Spans, claims: Spans, strict: bool = True, *, deadline: float | None = None
) -> list[BlockGroup]:
    """Return candidate numbered groups in ``text`` (they may overlap each other, never ``claims``)."""
    groups = []
    citations: _Citations | None = None
    for markers in _markers(text, fences, claims).values():
        check(deadline)
        for run, next_start in _runs(markers):
            limit = claims.next_start(run[-1].line_start, len(text) if next_start < 0 else next_start)
            if next_start >= 0:
                limit = min(limit, next_start)
            blocks = _blocks(text, run, limit, fences)
            if len(blocks) < 2:
                continue
            group = BlockGroup("numbered", run[0].style, tuple(blocks), run[0].number.value, blocks[-1].end)
            if not _positional(run[0]):
                group = _labels_attached(group)
            if run[0].kind == "b" and citations is None:
                citations = _Citations(text)
            if _accept(text, group, run[0].kind, strict, citations if run[0].kind == "b" else None):
                groups.append(group)
    return groups
