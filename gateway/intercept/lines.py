"""Line-oriented scanning shared by the line-based formats: line-anchored patterns, paragraphs, cue lines,
and the rule that decides where the *last* block of a group ends.

Line-anchored patterns are compiled twice, once for offset 0 and once behind a literal ``\\n``: CPython's ``re``
scans for a literal first character in C, which is an order of magnitude faster than ``(?m)^``.

The last block of a numbered list (or of a separator-joined run) has no closing delimiter, so its end is
inferred from the shape of the other blocks. A ``Question:``-style line always ends it. If the other blocks are
separated by blank lines and are one paragraph each, the last one ends at the next blank line. If they are one
line each, the last one is one line. When the shape leaves the end ambiguous the rule answers ``None`` and the
caller leaves that block out of the group: a document left in the tail is untouched, whereas a trailing
instruction swallowed into a moving block (or half a document left behind) would corrupt the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

__all__ = [
    "LinePattern",
    "Shape",
    "context_cue_before",
    "is_cue_line",
    "last_end",
    "line_end",
    "paragraphs",
    "rstrip_end",
    "shape_of",
]

_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")
_PARAGRAPH = re.compile(r"\S[^\n]*(?:\n[ \t\r\f\v]*\S[^\n]*)*")
_CUE = (
    r"[ \t]*(?:(?i:answer\b|based on\b|using (?:the|only)\b|use (?:the|only)\b|given the\b|please\b|respond\b"
    r"|cite\b|reply\b|question\b|query\b|instructions?\b|task\b|now,? (?:answer|respond|using)\b)"
    r"|#{1,6}[ \t]|</?[A-Za-z]|[-=*_]{3,}[ \t\r]*(?=\n|\Z)|```|~~~)"
)
_CUE_LINE = re.compile(_CUE)
_NEXT_CUE_LINE = re.compile(r"\n" + _CUE)
_STRONG_CUE_LINE = re.compile(
    r"\n[ \t]*(?i:question|query|answer|helpful answer|final answer|instructions?|task|response)[ \t]*:",
)
_CONTEXT_CUE = re.compile(
    r"(?i)\b(?:context|contexts|documents?|docs|sources?|passages?|search results?|results|snippets?|excerpts?"
    r"|chunks?|articles?|memories|knowledge|evidence|retrieved[^\n:]*|information)\b[^\n]{0,60}:[ \t\r]*$",
)
_NOT_CONTEXT = re.compile(
    r"(?i)\b(?:steps?|rules?|instructions?|guidelines?|requirements?|tips|follow(?:ing)? these|criteria|format"
    r"|references|bibliography|works cited|footnotes)\b",
)
_CUE_WINDOW = 2048


class LinePattern:
    """A pattern matched only at the start of a line (offset 0 or just after ``\\n``)."""

    __slots__ = ("_first", "_rest")

    def __init__(self, body: str, flags: int = 0) -> None:
        self._first = re.compile(body, flags)
        self._rest = re.compile(rf"\n(?:{body})", flags)

    def finditer(self, text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, re.Match[str]]]:
        """Yield ``(line_start, match)`` for each line in ``[start, end)`` that the pattern matches."""
        stop = len(text) if end is None else end
        if start == 0 or (0 < start <= len(text) and text[start - 1] == "\n"):
            first = self._first.match(text, start, stop)
            if first is not None:
                yield start, first
        for match in self._rest.finditer(text, start, stop):
            yield match.start() + 1, match


class Shape(NamedTuple):
    """What the blocks before the last one look like."""

    count: int
    lines: int
    paragraphs: int
    blank_separated: bool


def shape_of(text: str, spans: list[tuple[int, int]]) -> Shape:
    """Return the shape of the blocks at ``spans`` (in text order)."""
    lines = 1
    paras = 1
    blank = True
    previous_end = -1
    for start, end in spans:
        lines = max(lines, text.count("\n", start, end) + 1)
        paras = max(paras, sum(1 for _ in _BLANK.finditer(text, start, end)) + 1)
        if previous_end >= 0 and _BLANK.search(text, previous_end, start) is None:
            blank = False
        previous_end = end
    return Shape(len(spans), lines, paras, blank and len(spans) > 1)


def rstrip_end(text: str, start: int, end: int) -> int:
    """Return ``end`` moved left past trailing whitespace, not before ``start``."""
    return start + len(text[start:end].rstrip())


def line_end(text: str, pos: int, limit: int) -> int:
    """Return the end of the line containing ``pos`` (before its ``\\n``), at most ``limit``."""
    found = text.find("\n", pos, limit)
    return limit if found < 0 else found


def paragraphs(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of each paragraph (maximal run of non-blank lines) in ``[start, end)``.

    A paragraph starts at the start of its first line (indentation kept) but not before ``start``, and ends
    after its last non-whitespace character.
    """
    for match in _PARAGRAPH.finditer(text, start, end):
        line_start = max(text.rfind("\n", start, match.start()) + 1, start)
        yield line_start, rstrip_end(text, match.start(), match.end())


def is_cue_line(text: str, start: int, end: int) -> bool:
    """Whether the line at ``start`` reads like an instruction to the model or a new section, not a document."""
    return _CUE_LINE.match(text, start, line_end(text, start, end)) is not None


def last_end(text: str, start: int, limit: int, shape: Shape) -> int | None:
    """Return where the last block of a group ends, or ``None`` if that is ambiguous.

    ``start`` is where the last block starts, ``limit`` the furthest it may reach, ``shape`` the shape of the
    group's other blocks.
    """
    want = max(shape.paragraphs, 1)
    found: list[tuple[int, int]] = []
    for para in paragraphs(text, start, limit):
        if found and is_cue_line(text, para[0], limit):
            break
        found.append(para)
        if len(found) > want:
            break
    if not found or (want > 1 and len(found) > want):
        return None
    end = found[0][1] if want == 1 else found[-1][1]
    strong = _STRONG_CUE_LINE.search(text, start, end)
    if strong is not None:
        return rstrip_end(text, start, strong.start())
    if want > 1:
        return end
    return _cut_lines(text, start, end, shape)


def _cut_lines(text: str, start: int, end: int, shape: Shape) -> int | None:
    if text.count("\n", start, end) + 1 <= shape.lines:
        return end
    cue = _NEXT_CUE_LINE.search(text, start, end)
    if cue is not None:
        return rstrip_end(text, start, cue.start())
    if shape.blank_separated:
        # the blank line is the separator: a longer last paragraph is a longer document, unless all are one-liners
        return end if shape.lines > 1 else None
    if shape.lines == 1 and shape.count >= 2:
        return rstrip_end(text, start, line_end(text, start, end))
    return None


def context_cue_before(text: str, pos: int) -> bool:
    """Whether the last non-blank line before ``pos`` introduces retrieved content (``Sources:``, ``Context:``)."""
    window = text[max(0, pos - _CUE_WINDOW) : pos].rstrip()
    line = window[window.rfind("\n") + 1 :]
    return bool(_CONTEXT_CUE.search(line)) and not _NOT_CONTEXT.search(line)
