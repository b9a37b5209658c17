"""Text regions that block detection must respect: fenced code, YAML front matter, and spans already claimed.

Fences follow CommonMark closely enough for prompts: an opening line of three or more backticks or tildes
(up to three spaces of indent), closed by a line of the same character at least as long; an unclosed fence
runs to the end of the text. Nothing inside a fence is ever a block marker.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

from gateway.planning.intercept.lines import LinePattern

__all__ = ["Spans", "fenced_spans", "front_matter_end"]

_FENCE = LinePattern(r"[ ]{0,3}(`{3,}|~{3,})([^\n]*)")
_FRONT_MATTER = re.compile(r"---[ \t\r]*\n(?:[^\n]*\n){0,200}?(?:---|\.\.\.)[ \t\r]*(?:\n|\Z)")
_YAML_KEY = re.compile(r"\n[A-Za-z_][\w.-]*:(?:[ \t]|\r?\n)")


class Spans:
    """A set of text positions stored as sorted, merged ``[start, end)`` spans, with logarithmic lookups."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        starts: list[int] = []
        ends: list[int] = []
        for start, end in sorted(span for span in spans if span[0] < span[1]):
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def union(self, spans: Iterable[tuple[int, int]]) -> Spans:
        """Return a new set holding these spans and ``spans``."""
        return Spans([*self, *spans])

    def contains(self, pos: int) -> bool:
        """Whether ``pos`` lies inside a span."""
        index = bisect_right(self._starts, pos) - 1
        return index >= 0 and pos < self._ends[index]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` shares at least one position with a span."""
        index = bisect_right(self._starts, end - 1) - 1
        return index >= 0 and self._ends[index] > start

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the spans that overlap ``[start, end)``."""
        index = max(bisect_right(self._starts, start) - 1, 0)
        found = []
        while index < len(self._starts) and self._starts[index] < end:
            if self._ends[index] > start:
                found.append((self._starts[index], self._ends[index]))
            index += 1
        return found

    def next_start(self, pos: int, default: int) -> int:
        """Return the start of the first span that starts at or after ``pos``, else ``default``."""
        index = bisect_left(self._starts, pos)
        return self._starts[index] if index < len(self._starts) else default


def fenced_spans(text: str, skip: Spans | None = None) -> Spans:
    """Return the spans of fenced code blocks, fence lines included; fence lines inside ``skip`` do not count."""
    spans: list[tuple[int, int]] = []
    if "`" not in text and "~" not in text:
        return Spans()
    open_at = -1
    open_char = ""
    open_len = 0
    for line_start, match in _FENCE.finditer(text):
        if skip is not None and skip.contains(line_start):
            continue
        fence = match.group(1)
        if open_at < 0:
            open_at, open_char, open_len = line_start, fence[0], len(fence)
        elif fence[0] == open_char and len(fence) >= open_len and not match.group(2).strip():
            spans.append((open_at, match.end()))
            open_at = -1
    if open_at >= 0:
        spans.append((open_at, len(text)))
    return Spans(spans)


def front_matter_end(text: str) -> int:
    """Return the end of a leading YAML front matter block (``---`` ... ``---``), or 0 if there is none."""
    match = _FRONT_MATTER.match(text)
    if match is None or _YAML_KEY.search(text, 0, match.end()) is None:
        return 0
    return match.end()
