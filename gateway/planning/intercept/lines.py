"""Line-oriented scanning shared by the line-based formats: line-anchored patterns, paragraphs, cue lines,
and the rule that decides where the *last* block of a group ends.

Line-anchored patterns are compiled twice, once for offset 0 and once behind a literal ``\\n``: CPython's ``re``
scans for a literal first character in C, which is an order of magnitude faster than ``(?m)^``.

The last block of a numbered list (or of a separator-joined run, or of markdown sections) has no closing
delimiter, so its end is inferred from the shape of the other blocks:

- a *hard* cue line ends it: ``Question:``/``Answer:``-style labels, a heading (for markdown sections: one
  at the section's level or above), a closing tag or a prompt tag such as ``<question>``, a separator line;
  unless lines of that kind occur inside the other blocks, in which case they are document content;
- if the others are one paragraph each, the last one is its first paragraph; if they are also one line each
  (and not blank-line separated), its first line;
- if the others have up to N paragraphs, the last one takes up to N, stopping early at a hard cue, or at a
  *soft* cue (a line that reads like an instruction or a question) once it has N;
- a soft cue inside what would be the last block makes the end ambiguous;
- a last block that would need more than :func:`scan_window` characters (eight times the longest other block,
  at least 4 KiB) to decide its end is ambiguous too.
- a block's extent includes its *continuation*: a paragraph after a blank line that is indented code (four
  columns deeper than the block's first line) or a table (``|`` rows) belongs to the block before it, so the
  block takes it (and the instruction after it must then be a cue line, or the end is ambiguous). A line
  right after the block's end that looks like a continuation (indented, a table row, a list item) or a
  ``===``/``---`` line under its last line (a heading's underline, or a separator glued to the text: the two
  cannot be told apart) makes the end ambiguous: cutting there would leave part of the document behind to
  sit under another block once blocks move. This bounds the cost per group by the size of the group
  itself, so a text with many candidate lists is not rescanned to its end once per list.

Ambiguous means ``None``: the caller leaves that block out of the group. A document left in the tail is
untouched, whereas a trailing instruction swallowed into a moving block, or half a document left behind,
would corrupt the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from gateway.planning.intercept.regions import Spans

__all__ = [
    "LinePattern",
    "Shape",
    "context_cue_before",
    "is_cue_line",
    "last_end",
    "line_end",
    "paragraphs",
    "rstrip_end",
    "scan_window",
    "shape_of",
]

_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")
_PARAGRAPH = re.compile(r"\S[^\n]*(?:\n[ \t\r\f\v]*\S[^\n]*)*")
# A hard cue ends a document for sure: a labelled prompt part, a heading, a tag, a separator line.
_HARD = (
    r"[ \t]*(?:(?i:question|query|answer|helpful answer|final answer|instructions?|task|response)[ \t]*:"
    r"|</[A-Za-z]|<(?i:question|query|instructions?|task|context|rules|format|output|answer|user|system|examples?)\b"
    r"|[-=*_]{3,}[ \t\r]*(?=\n|\Z)|(#{1,6})[ \t])"
)
# A soft cue reads like an instruction or a question, but a document may also contain such a line.
_SOFT = (
    r"[ \t]*(?:(?i:answer\b|based on\b|using (?:the|only)\b|use (?:the|only)\b|given the\b|please\b|respond\b"
    r"|cite\b|reply\b|question\b|query\b|now,? (?:answer|respond|using)\b"
    # an instruction to the model: an imperative, or a line that names a block by its label
    r"|summari[sz]e\b|explain\b|describe\b|compare\b|write\b|tell me\b|give\b|provide\b|list the\b|do not\b"
    r"|don't\b|only (?:use|answer)\b|be (?:brief|concise)\b|you (?:are|must|should)\b|make sure\b|ignore\b"
    r"|[^\n]*\b(?:document|doc|source|passage|result|snippet|chunk)s?[ \t]*#?\[?\d+\b"
    r"|(?:the|these|all|each) (?:documents|sources|passages|results|snippets|excerpts|chunks|context)\b)"
    r"|[^\n]*[?\uff1f][ \t\r]*(?=\n|\Z))"
)
_HARD_AT = re.compile(_HARD)
_SOFT_AT = re.compile(_SOFT)
# the look-ahead on the first character lets most lines fail before the alternation is tried
_HARD_LINE = re.compile(r"\n(?=[ \t]*[QqAaHhFfIiTtRr<\-=*_#])" + _HARD)
_SOFT_LINE = re.compile(r"\n" + _SOFT)
# a line that continues the paragraph above it: indented, a table row, a list item, or an underline
_ATTACHED = re.compile(
    r"(?: {2,}|\t|[ \t]*\||[ \t]*(?:[-*+\u2022]|\d{1,3}[.)])[ \t]|[ \t]{0,3}([=\-~^*+#_])\1{2,}[ \t\r]*(?:\n|\Z))"
)
# an introduction: a line ending with a colon, ASCII or fullwidth
_LABEL = re.compile(r"[^\n]*[:\uff1a][ \t\r]*$", re.MULTILINE)
_HEADING_TEXT = re.compile(r"[ \t]*#{1,6}[ \t]+([^\n]*)")
_PROMPT_SECTION = re.compile(
    r"(?i)\W*(?:question|query|answer|instructions?|task|rules|guidelines|format|output|response|context"
    r"|constraints|requirements|examples?|user|system|notes?)\b"
)
# a paragraph that continues the block before it: a table
_TABLE = re.compile(r"[ \t]*\|")
_CONTEXT_CUE = re.compile(
    r"(?i)\b(?:context|contexts|documents?|docs|sources?|passages?|search results?|results|snippets?|excerpts?"
    r"|chunks?|articles?|memories|knowledge|evidence|retrieved[^\n:]*|information)\b[^\n]{0,60}:[ \t\r]*$",
)
_NOT_CONTEXT = re.compile(
    r"(?i)\b(?:steps?|rules?|instructions?|guidelines?|requirements?|tips|follow(?:ing)? these|criteria|format"
    r"|references|bibliography|works cited|footnotes)\b",
)
_CUE_WINDOW = 2048
_WINDOW_FACTOR = 8
_MIN_WINDOW = 4096
_STRIP_CHUNK = 256


class LinePattern:
    """A pattern matched only at the start of a line (offset 0 or just after ``\\n``)."""

    __slots__ = ("_first", "_rest")

    def __init__(self, body: str, flags: int = 0, *, first: str = "") -> None:
        """``first``, a character class, is a cheap test of the line's first character (speed only)."""
        self._first = re.compile(body, flags)
        gate = f"(?={first})" if first else ""
        self._rest = re.compile(rf"\n{gate}(?:{body})", flags)

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
    """What the blocks before the last one look like (``spans`` are those blocks)."""

    blocks: int
    lines: int
    paragraphs: int
    blank_separated: bool
    spans: tuple[tuple[int, int], ...] = ()


def shape_of(text: str, spans: list[tuple[int, int]], fences: Spans) -> Shape:
    """Return the shape of the blocks at ``spans`` (in text order); blank lines inside fenced code do not count."""
    lines = 1
    paras = 1
    blank = True
    previous_end = -1
    for start, end in spans:
        if text.find("\n", start, end) >= 0:
            lines = max(lines, text.count("\n", start, end) + 1)
            breaks = sum(1 for m in _BLANK.finditer(text, start, end) if not fences.contains(m.start()))
            paras = max(paras, breaks + 1)
        if previous_end >= 0 and _BLANK.search(text, previous_end, start) is None:
            blank = False
        previous_end = end
    return Shape(len(spans), lines, paras, blank and len(spans) > 1, tuple(spans))


def _hard_inside(text: str, shape: Shape, heading_level: int) -> bool:
    """Whether a line that would end a document (a heading, a tag, ``Answer:``) occurs inside the other blocks;
    lines of that kind are then document content here, not the end of the last block."""
    return any(_next_hard_line(text, start, end, heading_level) >= 0 for start, end in shape.spans)


def rstrip_end(text: str, start: int, end: int) -> int:
    """Return ``end`` moved left past trailing whitespace, not before ``start``.

    Reads only the trailing whitespace (in chunks), never a copy of the whole span: callers strip spans that
    may reach the end of a large text.
    """
    while end > start and text[end - 1].isspace():
        chunk_start = max(start, end - _STRIP_CHUNK)
        kept = len(text[chunk_start:end].rstrip())
        end = chunk_start + kept
        if kept:
            break
    return max(end, start)


def scan_window(shape: Shape) -> int:
    """How far past its start the last block of a group with ``shape`` may be read to decide where it ends."""
    longest = max((end - start for start, end in shape.spans), default=0)
    return max(_WINDOW_FACTOR * longest, _MIN_WINDOW)


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


def _hard_at(text: str, start: int, end: int, heading_level: int) -> bool:
    match = _HARD_AT.match(text, start, line_end(text, start, end))
    return match is not None and (match.group(1) is None or len(match.group(1)) <= heading_level)


def _soft_at(text: str, start: int, end: int) -> bool:
    return _SOFT_AT.match(text, start, line_end(text, start, end)) is not None


def is_cue_line(text: str, start: int, end: int) -> bool:
    """Whether the line at ``start`` reads like an instruction to the model or a new section, not a document."""
    return _hard_at(text, start, end, 6) or _soft_at(text, start, end)


def _next_hard_line(text: str, start: int, end: int, heading_level: int) -> int:
    """Return the start of the first line after the first in ``[start, end)`` that is a hard cue, or -1."""
    match = _HARD_LINE.search(text, start, end)
    while match is not None and match.group(1) is not None and len(match.group(1)) > heading_level:
        match = _HARD_LINE.search(text, match.end(), end)
    return -1 if match is None else match.start() + 1


def last_end(text: str, start: int, limit: int, shape: Shape, fences: Spans, *, heading_level: int = 6) -> int | None:
    """Return where the last block of a group ends, or ``None`` if that is ambiguous.

    ``start`` is where the last block starts, ``limit`` the furthest it may reach, ``shape`` the shape of the
    group's other blocks. A fenced code block counts as part of the paragraph it starts in. Headings deeper than
    ``heading_level`` belong to the block (markdown subsections), and so does any line shaped like one that
    occurs inside the other blocks.
    """
    want = max(shape.paragraphs, 1)
    trusted: bool | None = None  # whether hard cues end the block; computed only when one is met
    found: list[tuple[int, int]] = []
    truncated = limit - start > scan_window(shape)
    if truncated:
        limit = start + scan_window(shape)
    decided = False  # whether the scan stopped on its own, before the end of the (possibly truncated) range
    for para in paragraphs(text, start, limit):
        if found and fences.contains(found[-1][1]):
            if any(end >= len(text) for _, end in fences.within(found[-1][1], found[-1][1] + 1)):
                return None  # a fence left open runs to the end of the text: where the block ends is unknown
            found[-1] = (found[-1][0], para[1])
            continue
        if found and want == 1:
            decided = True
            break
        if found and _hard_at(text, para[0], limit, heading_level):
            trusted = not _hard_inside(text, shape, heading_level) if trusted is None else trusted
            if trusted:
                decided = True
                break
        if len(found) == want and _soft_at(text, para[0], limit):
            decided = True
            break  # the block already has as many paragraphs as any other, and an instruction follows
        found.append(para)
        if len(found) > want:
            return None
    if not found or (truncated and not decided):
        return None  # the end lies beyond what may be read for a group of this size: ambiguous
    end = found[-1][1]
    hard = _next_hard_line(text, start, end, heading_level)
    if hard >= 0 and (trusted if trusted is not None else not _hard_inside(text, shape, heading_level)):
        if any(para_start < hard for para_start, _ in found[1:]) and all(p != hard for p, _ in found):
            return None  # a later paragraph runs into "Question:": its first lines may be the prompt's, not ours
        end = rstrip_end(text, start, hard - 1)
    if want > 1:
        soft = any(_soft_at(text, para_start, end) for para_start, _ in found[1:] if para_start < end)
        return None if soft else _continued(text, start, end, limit, fences)
    cut = _cut_lines(text, start, end, shape)
    return None if cut is None else _continued(text, start, cut, limit, fences)


def _lead(text: str, line_start: int) -> int:
    """The columns of indentation of the line at ``line_start`` (a tab counts as four)."""
    columns = 0
    for char in text[line_start : line_start + 64]:
        if char == " ":
            columns += 1
        elif char == "\t":
            columns += 4
        else:
            break
    return columns


def _opens_sentence(text: str, line_start: int) -> bool:
    """Whether the line's first letter is not a lowercase one: an instruction opens a sentence, whereas a
    document's wrapped line ("query cache ...") may go on in lowercase."""
    stripped = text[line_start : line_start + 64].lstrip()
    return not stripped or not stripped[0].islower()


def _continued(text: str, start: int, end: int, limit: int, fences: Spans) -> int | None:
    """Return ``end`` extended over the block's continuation paragraphs, or None where the end is ambiguous.

    ``start`` is the block's start (its first line's indentation is the reference), ``end`` where the rules
    above ended it.
    """
    newline = text.find("\n", end, limit)
    if newline < 0 or text[end:newline].strip():
        return end
    if _ATTACHED.match(text, newline + 1, limit) is not None:
        return None  # the next line continues this one: the block would be cut in the middle
    block_lead = _lead(text, text.rfind("\n", 0, start) + 1)
    stop = min(limit, start + _MIN_WINDOW + 2 * (end - start))
    extended = end
    for para_start, para_end in paragraphs(text, end, stop):
        if fences.contains(para_start) or _lead(text, para_start) >= block_lead + 4 or _TABLE.match(text, para_start):
            extended = para_end
            continue
        # what follows must read as the prompt's own text (a question, an instruction, a heading, a tag), or it
        # may be the rest of this document, and the end is in doubt
        line_stop = line_end(text, para_start, stop)
        heading = _HEADING_TEXT.match(text, para_start, line_stop)
        if heading is not None:  # a section of the prompt, or a subsection of this document?
            return extended if _PROMPT_SECTION.match(heading.group(1)) else None
        # an introduction line ("Knowledge base:") is the prompt's own only where the next group starts under it
        intro = _LABEL.match(text, para_start, line_stop) is not None and not text[line_stop:limit].strip()
        cue = _hard_at(text, para_start, stop, 6) or (
            _soft_at(text, para_start, stop) and _opens_sentence(text, para_start)
        )
        return extended if intro or cue else None
    return extended if stop == limit else None


def _cut_lines(text: str, start: int, end: int, shape: Shape) -> int | None:
    """Decide the end of a one-paragraph last block from the line counts of the others."""
    first_line = line_end(text, start, end)
    soft = _SOFT_LINE.search(text, start, end)
    if soft is not None:
        # one-line documents followed by an instruction line; otherwise the line may be the document's own
        instruction = shape.lines == 1 and soft.start() == first_line and _opens_sentence(text, first_line + 1)
        return rstrip_end(text, start, first_line) if instruction else None
    if text.count("\n", start, end) + 1 <= shape.lines:
        return end
    if shape.lines == 1:
        return rstrip_end(text, start, first_line) if shape.blocks >= 2 and not shape.blank_separated else None
    # the blank line is the separator: a longer last paragraph is a longer document
    return end if shape.blank_separated else None


def context_cue_before(text: str, pos: int) -> bool:
    """Whether the last non-blank line before ``pos`` introduces retrieved content (``Sources:``, ``Context:``)."""
    window = text[max(0, pos - _CUE_WINDOW) : pos].rstrip()
    line = window[window.rfind("\n") + 1 :]
    return bool(_CONTEXT_CUE.search(line)) and not _NOT_CONTEXT.search(line)
