"""Text regions that block detection must respect: fenced code, YAML front matter, and spans already claimed.

Fences follow CommonMark closely enough for prompts: an opening line of three or more backticks or tildes
(up to three spaces of indent), closed by a line of the same character at least as long; an unclosed fence
runs to the end of the text. Nothing inside a fence is ever a block marker.
"""

from __future__ import annotations

import re
from bisect import bisect_right, insort

from gateway.intercept.lines import LinePattern

__all__ = ["Spans", "fenced_spans", "front_matter_end"]

_FENCE = LinePattern(r"[ ]{0,3}(`{3,}|~{3,})([^\n]*)")
_FRONT_MATTER = re.compile(r"---[ \t\r]*\n(?:[^\n]*\n){0,200}?(?:---|\.\.\.)[ \t\r]*(?:\n|\Z)")
_YAML_KEY = re.compile(r"\n[A-Za-z_][\w.-]*:(?:[ \t]|\r?\n)")


class Spans:
    """Sorted, pairwise disjoint ``[start, end)`` spans with logarithmic lookups."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, spans: list[tuple[int, int]] | None = None) -> None:
        ordered = sorted(spans or [])
        self._starts = [start for start, _ in ordered]
        self._ends = [end for _, end in ordered]

    def __bool__(self) -> bool:
        return bool(self._starts)

    def add(self, start: int, end: int) -> None:
        """Add a span that overlaps none of the present ones."""
        index = bisect_right(self._starts, start)
        insort(self._starts, start)
        self._ends.insert(index, end)

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
        index = bisect_right(self._starts, pos - 1)
        return self._starts[index] if index < len(self._starts) else default


def fenced_spans(text: str) -> Spans:
    """Return the spans of fenced code blocks, fence lines included."""
    spans: list[tuple[int, int]] = []
    open_at = -1
    open_char = ""
    open_len = 0
    for line_start, match in _FENCE.finditer(text):
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
