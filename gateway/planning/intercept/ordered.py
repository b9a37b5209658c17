"""Blocks whose order is part of what they say: dated items that run one way, and steps.

``meaning`` leaves such a group alone (``chronological``, ``steps``), and whole-block runs on the Messages and
Responses routes use the same tests (``gateway.planning.units``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import pairwise

from gateway.planning.intercept.groups import BlockGroup

__all__ = ["chronological", "dated_in_order", "read_as_steps", "steps"]

# "Follow these steps", "in the following order", "in order:"; not "instructions", "think step by step"
_STEPS_LEAD = re.compile(
    r"(?i)\b(?:steps|procedure|recipe|walkthrough|sequentially|in[ \t]+(?:this|that|the[ \t]+(?:following|given"
    r"|listed|same))[ \t]+order|one[ \t]+after[ \t]+another)\b|\bin[ \t]+order[ \t]*:",
)
_STEP_START = re.compile(
    r"(?i)[ \t#*>-]*(?:\[?(?:step|phase|stage)[ \t]*#?\d|(?:first(?:ly)?|second(?:ly)?|then|next|after[ \t]+that"
    r"|afterwards|finally|lastly|now)\b[ \t,:])",
)
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_DAYS = {d: i for i, d in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))}
_DATE = re.compile(
    r"(?i)\b(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})"
    r"|\b(?P<mn>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?[ \t]+(?P<md>\d{1,2})(?:st|nd|rd|th)?"
    r"(?:,?[ \t]+(?P<my>\d{4}))?\b"
    r"|\b(?P<dd>\d{1,2})[ \t]+(?P<dm>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?(?:[ \t]+(?P<dy>\d{4}))?"
    r"|\b(?P<wd>mon|tue|wed|thu|fri|sat|sun)(?:day|sday|nesday|rsday|urday)?\b",
)
_DATE_WINDOW = 240
_LEAD_WINDOW = 300


def _date_key(text: str) -> tuple[str, tuple[int, ...]] | None:
    match = _DATE.search(text, 0, _DATE_WINDOW)
    if match is None:
        return None
    if match.group("y"):
        return "ymd", (int(match.group("y")), int(match.group("m")), int(match.group("d")))
    if match.group("mn"):
        return "md", (int(match.group("my") or 0), _MONTHS[match.group("mn").lower()[:3]], int(match.group("md")))
    if match.group("dm"):
        return "md", (int(match.group("dy") or 0), _MONTHS[match.group("dm").lower()[:3]], int(match.group("dd")))
    return "wd", (_DAYS[match.group("wd").lower()[:3]],)


def chronological(text: str, group: BlockGroup) -> bool:
    """Whether every block starts with a date of one kind and the dates run in one direction (not all equal)."""
    return dated_in_order(text[block.start : min(block.end, block.start + _DATE_WINDOW)] for block in group.blocks)


def dated_in_order(heads: Iterable[str]) -> bool:
    """Whether every head (a block's first characters) holds a date of one kind and they run in one direction."""
    keys = []
    for head in heads:
        key = _date_key(head)
        if key is None:
            return False  # most groups stop at their first block
        keys.append(key)
    if len({key[0] for key in keys}) != 1:
        return False
    values = [key[1] for key in keys]
    pairs = list(pairwise(values))
    rising = all(a <= b for a, b in pairs)
    falling = all(a >= b for a, b in pairs)
    return (rising or falling) and len(set(values)) > 1


def steps(text: str, group: BlockGroup, floor: int = 0) -> bool:
    """Whether the group reads as ordered steps: its blocks open like steps, or the text just before says so."""
    if read_as_steps([(text, block.content_start) for block in group.blocks]):
        return True
    # the two lines just before the group introduce it; an instruction further up is about the answer
    start = text.rfind("\n", floor, max(floor, text.rfind("\n", floor, max(floor, group.start - 1))))
    return _STEPS_LEAD.search(text, max(floor, start, group.start - _LEAD_WINDOW), group.start) is not None


def read_as_steps(starts: Sequence[tuple[str, int]]) -> bool:
    """Whether blocks (each a text and where its content starts) open like steps: all, or all but one."""
    openings = sum(_STEP_START.match(text, at) is not None for text, at in starts)
    return openings >= max(2, len(starts) - 1)
