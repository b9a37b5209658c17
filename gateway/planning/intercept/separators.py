"""Documents joined by a separator line: ``---``, ``-----``, ``===`` (or the caller's own) alone on a line.

Separator lines are grouped by their exact text; each chain of one text cuts the prompt into parts. The parts
between two separators are blocks. The part before the first separator contributes a block only when the
block's start is clear: the other blocks are one paragraph each and the last paragraph is not an introduction,
or an introduction line (ending with ``:``) marks where the block starts. The part after the last separator
contributes a block that ends by the rule in :mod:`gateway.planning.intercept.lines`. The separators stay in the gaps.

A ``===``/``---`` line right under a text line at least as long as it (less one) underlines a heading and is
never a separator. Markdown documents use ``---`` as a horizontal rule, so in ``auto`` mode a chain needs at
least three blocks of at least 20 characters, introduced by a line such as ``Here are the retrieved
documents:``; front matter and fenced code never hold separators.

Every distinct separator line is its own chain; only the :data:`MAX_CHAINS` chains with the most separators are
examined (real prompts use one or two), so a text made of many distinct separator lines costs no more than a
text with a few.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import pairwise

from gateway.planning.intercept.budget import check
from gateway.planning.intercept.groups import Block, BlockGroup
from gateway.planning.intercept.lines import (
    LinePattern,
    Shape,
    context_cue_before,
    is_cue_line,
    last_end,
    line_end,
    paragraphs,
    rstrip_end,
    shape_of,
)
from gateway.planning.intercept.regions import Spans

__all__ = ["MAX_CHAINS", "find_separator_groups"]

_DEFAULT = LinePattern(r"(-{3,}|={3,})[ \t\r]*(?=\n|\Z)")
_INTRO = re.compile(r"[^\n]*:[ \t\r]*$|[ \t]*#{1,6}[ \t][^\n]*$")
_MIN_CHARS = 20
_NON_SPACE = re.compile(r"\S")
_MIN_BLOCKS_AUTO = 3
MAX_CHAINS = 4


@lru_cache(maxsize=32)
def _pattern(separator: str) -> LinePattern:
    return LinePattern(rf"({re.escape(separator)})[ \t\r]*(?=\n|\Z)")


def _chains(
    text: str, pattern: LinePattern, fences: Spans, claims: Spans, skip_before: int
) -> dict[str, list[tuple[int, int]]]:
    chains: dict[str, list[tuple[int, int]]] = {}
    for line_start, match in pattern.finditer(text):
        if line_start < skip_before or fences.contains(line_start) or claims.contains(line_start):
            continue
        if _underline(text, line_start, match.group(1)):
            continue
        chains.setdefault(match.group(1), []).append((line_start, match.end()))
    return chains


def _underline(text: str, line_start: int, line: str) -> bool:
    """Whether the line at ``line_start`` underlines the text line right above it (a setext or reST heading):
    at least as long as that line, less one."""
    if line_start < 2 or text[line_start - 2] == "\n":
        return False
    above = text[text.rfind("\n", 0, line_start - 1) + 1 : line_start - 1].strip()
    return bool(above) and above.strip(line[0]) != "" and len(line) >= len(above) - 1


def _part(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The text in ``[start, end)`` from the start of its first non-blank line, trailing whitespace cut."""
    first = _NON_SPACE.search(text, start, end)
    if first is None:
        return None
    line_start = max(text.rfind("\n", start, first.start()) + 1, start)
    return line_start, rstrip_end(text, line_start, end)


def _first_block(text: str, start: int, end: int, shape: Shape) -> tuple[int, int] | None:
    """Return the block at the end of the text before the first separator, if its start is clear.

    An introduction (a line ending with ``:`` or a heading) either opens the last paragraph or stands as a
    paragraph of its own; without one, the last paragraph is the block only when every other block is a
    single paragraph no longer in lines.
    """
    found = list(paragraphs(text, max(start, end - 65536), end))
    if not found:
        return None
    last_start, last_stop = found[-1]
    first_line_end = line_end(text, last_start, last_stop)
    if _INTRO.match(text, last_start, first_line_end):
        if first_line_end == last_stop:
            return None
        block = _part(text, first_line_end, last_stop)
        fits = block is not None and text.count("\n", block[0], block[1]) < shape.lines
        return block if fits and shape.paragraphs == 1 else None
    if shape.paragraphs == 1:
        return (last_start, last_stop) if text.count("\n", last_start, last_stop) < shape.lines else None
    for index in range(len(found) - 2, max(len(found) - 2 - shape.paragraphs, -1), -1):
        para_start, para_end = found[index]
        if line_end(text, para_start, para_end) == para_end and _INTRO.match(text, para_start, para_end):
            return found[index + 1][0], last_stop
    return None


def _blocks(
    text: str, seps: list[tuple[int, int]], fences: Spans, claims: Spans
) -> tuple[list[tuple[int, int]], int] | None:
    """Return the blocks and where the text that introduces them ends (the first block or separator)."""
    middles: list[tuple[int, int]] = []
    for (_, left), (right, _) in pairwise(seps):
        part = _part(text, left, right)
        if part is None:
            return None
        if is_cue_line(text, part[0], part[1]):
            # the separators go on to delimit prompt sections: the documents end here
            return (middles, seps[0][0]) if middles else None
        middles.append(part)
    shape = shape_of(text, middles, fences) if middles else Shape(0, 1 << 30, 1, False)
    blocks = middles
    intro_end = seps[0][0]
    head = _first_block(text, 0, seps[0][0], shape)
    if head is not None and not is_cue_line(text, head[0], head[1]):
        blocks = [head, *blocks]
        intro_end = head[0]
    tail_start = _part(text, seps[-1][1], len(text))
    if tail_start is not None and not is_cue_line(text, tail_start[0], len(text)):
        limit = claims.next_start(tail_start[0], len(text))
        end = last_end(text, tail_start[0], limit, shape, fences)
        if end is not None:
            blocks = [*blocks, (tail_start[0], end)]
    return blocks, intro_end


def find_separator_groups(
    text: str,
    fences: Spans,
    claims: Spans,
    *,
    strict: bool = True,
    separator: str | None = None,
    skip_before: int = 0,
    deadline: float | None = None,
) -> list[BlockGroup]:
    """Return candidate separator groups (they may overlap each other, never ``claims``).

    ``skip_before`` is the end of the front matter, whose delimiters are not separators.
    """
    if separator is None and "-" not in text and "=" not in text:
        return []
    pattern = _DEFAULT if separator is None else _pattern(separator.strip())
    groups = []
    chains = _chains(text, pattern, fences, claims, skip_before)
    busiest = sorted(chains.items(), key=lambda item: (-len(item[1]), item[1][0][0]))[:MAX_CHAINS]
    for label, seps in busiest:
        check(deadline)
        if strict and len(seps) < _MIN_BLOCKS_AUTO - 1:
            continue
        found = _blocks(text, seps, fences, claims)
        if found is None or len(found[0]) < (_MIN_BLOCKS_AUTO if strict else 2):
            continue
        spans, intro_end = found
        if strict and (
            any(len(text[s:e].strip()) < _MIN_CHARS for s, e in spans) or not context_cue_before(text, intro_end)
        ):
            continue
        blocks = tuple(Block(s, e, s, e) for s, e in spans)
        groups.append(BlockGroup("separator", label, blocks, None, blocks[-1].end))
    return groups
